// The fused CPU latent update of CDUL (paper eq. 7-8, supplement 6.2): the C++ twin of
// cdul_fast.ops.reference.latent_update_ (the oracle) and of the Triton kernel in cdul_fast/ops/kernels/latent.py.
// Per element: p = clamp(pred, eps, 1 - eps), grad = latent - log(p / (1 - p)), w = psi(sigmoid(latent)) (or 1),
// latent -= lr * w * grad, labels = sigmoid(latent). One pass: latent and pred are read once, latent and labels
// written once, where the torch twin streams the matrix about ten times through temporaries.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cdul {

// The step's parameters as the Python twins take them (validated there: finite, sigma > 0, 0 < eps < 0.5).
struct LatentStep {
  double c1, sigma, c2, lr, eps;
  bool use_psi;
};

// In place on `latent` (n float32 values); `pred` holds n float32 or n IEEE half values (converted exactly);
// `labels` (n float32, or null) gets sigmoid of the new latent. Runs on up to `threads` threads (0: one per
// hardware thread); the result does not depend on the thread count. With `allow_avx2` the AVX2 + FMA build of the
// loop runs where the CPU has both (has_avx2_fma); otherwise, or with allow_avx2 false, the baseline one.
void latent_update(float* latent, const void* pred, bool pred_is_half, float* labels, size_t n, const LatentStep& step,
                   unsigned threads, bool allow_avx2);

// True on x86-64 CPUs with AVX2 and FMA (the run-time choice of latent_update); false elsewhere.
bool has_avx2_fma();

}  // namespace cdul
