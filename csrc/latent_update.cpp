// The loops below are plain scalar code that GCC vectorises at -O3 for baseline x86-64 (SSE2) or any other target,
// and once more for AVX2 + FMA, chosen at run time. exp and log are branch-free float32 polynomials here rather than
// libm calls, which GCC cannot vectorise without -ffast-math (and whose vector versions, libmvec, would tie the wheel
// to a recent glibc). The selects become SIMD blends only with -fno-trapping-math (CMakeLists.txt), which changes no
// result: it only lets GCC evaluate both sides of a select.
#include "latent_update.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <vector>

namespace cdul {
namespace {

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

constexpr float kLn2Hi = 0.693145751953125f;      // ln 2 to 16 bits, so n * kLn2Hi is exact for |n| < 256
constexpr float kLn2Lo = 1.42860682030941723e-6f;  // ln 2 - kLn2Hi

// e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2: e^r from its Taylor polynomial to r^7 (truncation below
// 1e-8 relative, under the float32 rounding), 2^n written straight into the exponent bits. x is clamped to
// [-87.3, 88.3] so 2^n stays a normal float; below -87.3 the result is ~1e-38 instead of a subnormal or 0, an
// absolute difference of under 1.2e-38 (sigmoid and psi only ever add it to 1 or scale it).
inline float exp_f(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  q = q * r + 1.0f;
  const uint32_t two_n = (to_bits(t) - to_bits(kShift) + 127u) << 23;  // the low bits of t hold n in [-126, 127]
  return q * from_bits(two_n);
}

// ln x = e ln 2 + ln m with x = m 2^e, m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s) with s = (m - 1) / (m + 1),
// |s| < 0.172, by its odd series to s^9 (truncation below 1e-9 relative). Subnormal x is scaled by 2^23 first;
// 0, +inf and negative or NaN inputs give -inf, +inf and NaN as std::log does.
inline float log_f(float x) {
  constexpr float kMinNormal = 1.17549435e-38f;
  constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;
  const bool subnormal = x < kMinNormal;
  const uint32_t b = to_bits(x * (subnormal ? 8388608.0f : 1.0f));
  const int32_t e = static_cast<int32_t>(b - kSqrtHalfBits) >> 23;  // arithmetic shift: floor of the difference
  const float m = from_bits(b - (static_cast<uint32_t>(e) << 23));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float q = 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 0.2f;
  q = q * s2 + 1.0f / 3.0f;
  q = q * s2 + 1.0f;
  const float k = static_cast<float>(e - (subnormal ? 23 : 0));
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float r = k * kLn2Hi + (k * kLn2Lo + 2.0f * s * q);
  r = x == kInf ? kInf : r;
  r = x == 0.0f ? -kInf : r;
  return x >= 0.0f ? r : std::numeric_limits<float>::quiet_NaN();
}

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

// IEEE binary16 -> float32, exact for every input. Normal halves: the exponent re-biased (15 -> 127). Subnormal
// ones: the same bits under the exponent of 2^-14 stand for 2^-14 (1 + m / 1024), and subtracting 2^-14 leaves
// m 2^-24 exactly (normal ones subtract 0). Infinities and NaNs keep their payload.
inline float to_float(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const bool subnormal = em < 0x0400u;
  const float v = from_bits((em << 13) + ((subnormal ? 113u : 112u) << 23)) - (subnormal ? 6.103515625e-05f : 0.0f);
  const uint32_t magnitude = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : to_bits(v);
  return from_bits((static_cast<uint32_t>(h & 0x8000u) << 16) | magnitude);
}

inline float to_float(float f) { return f; }

// The step's constants in float32, rounded as the torch twin rounds its Python-float scalars.
struct Coeffs {
  float coef, sigma, c2, lr, lo, hi;
};

// One thread's share: n elements of each array (pred float32 or half per Job::half; labels may be null).
struct Span {
  float* lat;
  const void* pred;
  float* labels;
  size_t n;
};

struct Job {
  Coeffs k;
  bool half, psi;
};

// The update in blocks of kBlock elements, each block in short passes through two L1-resident scratch arrays. One
// fused loop would chain three exps, a log and four divisions per element: that dependency chain is longer than the
// out-of-order window can hide, and the loop ran at half the speed of these passes. The operation order follows
// reference.latent_update_ (lr * w first, then times grad), so the results differ from torch only in the last bits
// of exp and log. Aliasing (labels == latent, pred == latent) stays correct: each element is read before it is
// written, and GCC checks for overlap before it runs a vector loop.
template <bool kPsi, bool kLabels, typename P>
void update_span(const Span& s, const Coeffs& k) {
  constexpr size_t kBlock = 256;
  float grad[kBlock];
  float w[kBlock];
  const P* pred = static_cast<const P*>(s.pred);
  for (size_t b = 0; b < s.n; b += kBlock) {
    const size_t m = std::min(kBlock, s.n - b);
    float* lat = s.lat + b;
    for (size_t i = 0; i < m; ++i) {
      const float p = std::min(std::max(to_float(pred[b + i]), k.lo), k.hi);
      grad[i] = lat[i] - log_f(p / (1.0f - p));
    }
    if constexpr (kPsi) {
      for (size_t i = 0; i < m; ++i) w[i] = (sigmoid_f(lat[i]) - 0.5f) / k.sigma;
      for (size_t i = 0; i < m; ++i) w[i] = k.coef * exp_f(-0.5f * w[i] * w[i]) + k.c2;
      for (size_t i = 0; i < m; ++i) lat[i] = lat[i] - k.lr * w[i] * grad[i];
    } else {
      for (size_t i = 0; i < m; ++i) lat[i] = lat[i] - k.lr * grad[i];
    }
    if constexpr (kLabels) {
      float* labels = s.labels + b;
      for (size_t i = 0; i < m; ++i) labels[i] = sigmoid_f(lat[i]);
    }
  }
}

template <typename P>
inline void update_typed(const Span& s, const Job& j) {
  if (j.psi) {
    s.labels ? update_span<true, true, P>(s, j.k) : update_span<true, false, P>(s, j.k);
  } else {
    s.labels ? update_span<false, true, P>(s, j.k) : update_span<false, false, P>(s, j.k);
  }
}

// Everything inlined (flatten) into one function per instruction set: the baseline one for any CPU of the target,
// and on x86-64 a copy compiled for AVX2 + FMA, picked at run time (no -march in the build, so a wheel runs
// anywhere). Fused multiply-adds round once where the baseline rounds twice, so the two copies may differ in the
// last bit; both stay within the tests' tolerance of the torch twin.
__attribute__((flatten)) void update_baseline(const Span& s, const Job& j) {
  j.half ? update_typed<uint16_t>(s, j) : update_typed<float>(s, j);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"), flatten)) void update_avx2(const Span& s, const Job& j) {
  j.half ? update_typed<uint16_t>(s, j) : update_typed<float>(s, j);
}
#endif

// Contiguous parts of at least kGrain elements (starting a thread costs tens of microseconds, about what 16K
// elements take), split on multiples of 16 elements (64 bytes of float32) so threads never share a cache line of
// the outputs. The caller runs the first part; a part whose thread cannot start runs on the caller too, so the
// update is always complete.
void run_parts(void (*kernel)(const Span&, const Job&), const Span& all, const Job& job, unsigned threads) {
  constexpr size_t kGrain = 16384;
  const size_t n = all.n;
  const size_t want = std::max<size_t>(1, std::min<size_t>(threads, (n + kGrain - 1) / kGrain));
  const size_t step = ((n + want - 1) / want + 15) / 16 * 16;
  const size_t parts = (n + step - 1) / step;
  const size_t pred_size = job.half ? sizeof(uint16_t) : sizeof(float);
  auto part = [&](size_t i) {
    const size_t b = i * step;
    const Span s{all.lat + b, static_cast<const char*>(all.pred) + b * pred_size, all.labels ? all.labels + b : nullptr,
                 std::min(step, n - b)};
    kernel(s, job);
  };
  std::vector<std::thread> pool;
  pool.reserve(parts - 1);
  size_t started = 1;
  for (; started < parts; ++started) {
    try {
      pool.emplace_back(part, started);
    } catch (const std::system_error&) {
      break;
    }
  }
  part(0);
  for (size_t i = started; i < parts; ++i) part(i);
  for (auto& t : pool) t.join();
}

}  // namespace

bool has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void latent_update(float* latent, const void* pred, bool pred_is_half, float* labels, size_t n, const LatentStep& step,
                   unsigned threads, bool allow_avx2) {
  if (n == 0) return;
  const double sqrt_2pi = std::sqrt(2.0 * 3.141592653589793);  // as Python's math.sqrt(2.0 * math.pi)
  const Job job{{static_cast<float>(step.c1 / (step.sigma * sqrt_2pi)), static_cast<float>(step.sigma),
                 static_cast<float>(step.c2), static_cast<float>(step.lr), static_cast<float>(step.eps),
                 static_cast<float>(1.0 - step.eps)},
                pred_is_half,
                step.use_psi};
  auto kernel = &update_baseline;
#if defined(__x86_64__) && defined(__GNUC__)
  if (allow_avx2 && has_avx2_fma()) kernel = &update_avx2;
#endif
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  run_parts(kernel, Span{latent, pred, labels, n}, job, threads);
}

}  // namespace cdul
