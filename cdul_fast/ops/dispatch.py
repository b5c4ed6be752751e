"""Dispatching front-ends for CDUL's hot loops: the Triton kernels on CUDA, the pure-torch reference elsewhere.

``backend``: "auto" runs Triton when the tensor is on CUDA and Triton works there, else the torch reference
(``cdul_fast.ops.reference``); "triton" forces the kernel (CUDA, or CPU tensors when TRITON_INTERPRET=1 was set before
the kernels were first imported) and fails clearly otherwise; "torch" always runs the reference. One exception:
``latent_update_stream`` on CPU with "auto" runs the C++ extension's fused loop when it is built.
Triton is imported only when a kernel actually runs, so this module works on installs without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from .._backend import _triton_importable, has_triton, store_ext, triton_interpret
from . import reference
from .checks import OUTPUTS, check_aggregate, check_latent_params, check_latent_tensors, check_outputs

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def _kernel_interpreted() -> bool:
    """Whether the kernels were decorated for the interpreter (decided once, when ``kernels.aggregate`` loads)."""
    from .kernels import aggregate

    return type(aggregate._cdul_aggregate_kernel).__name__ == "InterpretedFunction"


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The implementation ("triton" or "torch") that ``backend`` selects for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton() else "torch"
    if not _triton_importable():
        raise RuntimeError("backend='triton' but Triton is not importable; install triton or use backend='torch'")
    if device.type == "cuda":
        return "triton"  # compiled, or interpreted through host copies when TRITON_INTERPRET=1 (tests)
    if device.type == "cpu" and triton_interpret() and _kernel_interpreted():
        return "triton"
    raise RuntimeError(
        f"backend='triton' cannot run on {device.type} tensors: use CUDA tensors, or set TRITON_INTERPRET=1 before "
        "cdul_fast.ops.kernels is first used to run the kernels on CPU through the Triton interpreter"
    )


# --------------------------------------------------------------------------------------------------- cosine scores


def cosine_scores(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of view embeddings [B, V, K] with class embeddings [C, K] -> [B, V, C].

    On CUDA: normalize and one [B*V, K] x [K, C] cuBLAS GEMM in the input dtype (fp16/bf16 tensor cores; the
    aggregation kernel upcasts to fp32). Elsewhere: the float32 reference math.
    """
    if feats.dim() != 3 or text.dim() != 2 or feats.shape[-1] != text.shape[-1]:
        raise ValueError(f"expected feats [B, V, K] and text [C, K], got {tuple(feats.shape)} and {tuple(text.shape)}")
    if not feats.is_cuda:
        return reference.cosine_scores(feats, text)
    B, V, K = feats.shape
    f = F.normalize(feats, dim=-1).reshape(B * V, K)
    w = F.normalize(text.to(device=feats.device, dtype=feats.dtype), dim=-1)
    return (f @ w.t()).view(B, V, text.shape[0])


# ----------------------------------------------------------------------------------------------------- aggregation


def _twin(impl: str) -> ModuleType:
    """The module that implements ``impl``: both expose ``cdul_aggregate``, ``latent_update_`` and
    ``wta_pairwise_bce`` with one signature and contract, so dispatch is only this choice."""
    if impl == "triton":
        from . import kernels

        return kernels
    return reference


def aggregate_scores(
    cos: torch.Tensor,
    logit_scale: float,
    zeta: float,
    lam: float,
    outputs: Iterable[str] | str = ("cdul",),
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Requested aggregates ("global", "aggregate", "cdul", "avg", "max") of cosine scores [B, V, C], each a
    contiguous float32 [B, C] tensor on the input's device."""
    check_aggregate(cos, logit_scale, zeta, lam)
    names = check_outputs(outputs)
    impl = resolve_backend(cos.device, backend)
    if impl == "triton" and cos.stride(-1) != 1:
        cos = cos.contiguous()  # the kernel reads class rows with unit stride
    return _twin(impl).cdul_aggregate(cos, logit_scale, zeta, lam, names)


# ------------------------------------------------------------------------------------- discovery: WTA pairwise BCE


def wta_pairwise_bce(probs: torch.Tensor, codes: torch.Tensor, mu: int, eps: float = 1e-7,
                     backend: str = "auto") -> torch.Tensor:
    """Mean BCE between the WTA pair labels of ``codes`` [M, H] (eq. 6, threshold ``mu``) and p_i . p_j of the
    novel-head probabilities ``probs`` [M, C] (eq. 7-8): a differentiable float32 scalar. The fused kernel on CUDA
    never forms the M x M matrices."""
    if probs.dim() != 2 or codes.dim() != 2 or probs.shape[0] != codes.shape[0]:
        raise ValueError(f"expected probs [M, C] and codes [M, H], got {tuple(probs.shape)} and {tuple(codes.shape)}")
    if codes.dtype.is_floating_point:
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    if not 1 <= int(mu) <= codes.shape[1]:
        raise ValueError(f"mu must be in [1, H = {codes.shape[1]}], got {mu}")
    if not 0.0 < float(eps) < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    impl = resolve_backend(probs.device, backend)
    return _twin(impl).wta_pairwise_bce(probs, codes.to(probs.device), int(mu), float(eps))


# -------------------------------------------------------------------------------------------------- latent update


def latent_update_inplace(
    latent: torch.Tensor,
    pred: torch.Tensor,
    c1: float,
    sigma: float,
    c2: float,
    lr: float = 1.0,
    use_psi: bool = True,
    eps: float = 1e-6,
    labels_out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Eq. 7-8 on a float32 latent matrix, in place; ``labels_out`` (optional, float32) gets sigmoid(latent_new).

    Returns ``latent``. ``pred`` holds predicted probabilities (fp32/fp16/bf16), same shape and device.
    """
    check_latent_params(c1, sigma, c2, lr, eps)
    check_latent_tensors(latent, pred, labels_out)
    impl = resolve_backend(latent.device, backend)
    return _twin(impl).latent_update_(latent, pred, c1, sigma, c2, lr, use_psi, eps, labels_out)


def _check_stream_arrays(latent_np: np.ndarray, pred_np: np.ndarray, labels_out_np: np.ndarray | None) -> None:
    if not isinstance(latent_np, np.ndarray) or latent_np.ndim != 2 or latent_np.dtype != np.float32:
        raise ValueError("latent_np must be a 2-D float32 numpy array (a numpy.memmap is fine)")
    if not latent_np.flags.c_contiguous or not latent_np.flags.writeable:
        raise ValueError("latent_np must be C-contiguous and writeable (it is updated in place)")
    if not isinstance(pred_np, np.ndarray) or pred_np.shape != latent_np.shape:
        raise ValueError(f"pred_np must be a numpy array shaped {latent_np.shape}")
    if pred_np.dtype not in (np.float32, np.float16) or not pred_np.flags.c_contiguous:
        raise ValueError(f"pred_np must be C-contiguous float32 or float16, got {pred_np.dtype}")
    if labels_out_np is not None:
        ok = isinstance(labels_out_np, np.ndarray) and labels_out_np.shape == latent_np.shape
        if not ok or labels_out_np.dtype != np.float32 or not labels_out_np.flags.c_contiguous:
            raise ValueError(f"labels_out_np must be a C-contiguous float32 array shaped {latent_np.shape}")
        if not labels_out_np.flags.writeable:
            raise ValueError("labels_out_np must be writeable")


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a numpy (memmap) slice; read-only inputs are only read, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def latent_update_stream(
    latent_np: np.ndarray,
    pred_np: np.ndarray,
    c1: float,
    sigma: float,
    c2: float,
    lr: float = 1.0,
    use_psi: bool = True,
    eps: float = 1e-6,
    *,
    device: torch.device | str = "cpu",
    chunk_rows: int = 65536,
    labels_out_np: np.ndarray | None = None,
    backend: str = "auto",
) -> None:
    """Eq. 7-8 on a (possibly memory-mapped, larger than RAM or GPU memory) float32 [M, C] matrix, in place.

    Works in row chunks so memory stays O(chunk_rows * C). On CUDA chunks go through pinned buffers and two
    streams (H2D, kernel and D2H of one chunk overlap the host copies and transfers of the next). On CPU, "auto"
    runs the extension's fused C++ loop (``cdul_fast.store._store.latent_update``) over the whole arrays in place,
    on torch's thread count: it reads and writes each element once, where the torch twin streams the matrix about
    ten times through temporaries. Without the extension, or with "torch" / "triton", that twin runs on zero-copy
    ``torch.from_numpy`` views of each chunk. The caller flushes a memmap.
    """
    check_latent_params(c1, sigma, c2, lr, eps)
    _check_stream_arrays(latent_np, pred_np, labels_out_np)
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    device = torch.device(device)
    impl = resolve_backend(device, backend)
    M = latent_np.shape[0]
    if M == 0 or latent_np.shape[1] == 0:
        return
    args = (c1, sigma, c2, lr, use_psi, eps)
    if device.type == "cuda":
        _stream_cuda(latent_np, pred_np, labels_out_np, args, device, int(chunk_rows), impl)
        return
    if device.type != "cpu":
        raise ValueError(f"latent_update_stream runs on cpu or cuda, got {device}")
    ext = store_ext() if backend == "auto" else None
    if ext is not None:  # validated above, once: the extension only re-checks what memory safety needs
        ext.latent_update(latent_np, pred_np, c1, sigma, c2, lr, bool(use_psi), eps, labels_out_np,
                          torch.get_num_threads())
        return
    for r0 in range(0, M, int(chunk_rows)):
        r1 = min(M, r0 + int(chunk_rows))
        lab = _as_tensor(labels_out_np[r0:r1]) if labels_out_np is not None else None
        _twin(impl).latent_update_(_as_tensor(latent_np[r0:r1]), _as_tensor(pred_np[r0:r1]), *args, lab)


@dataclass
class _Slot:
    """One of two ping-pong pipelines: its own stream, pinned host buffers and device buffers."""

    stream: torch.cuda.Stream
    done: torch.cuda.Event
    h_lat: torch.Tensor
    h_pred: torch.Tensor
    h_lab: torch.Tensor | None
    d_lat: torch.Tensor
    d_pred: torch.Tensor
    d_lab: torch.Tensor | None
    rows: tuple[int, int] | None = None  # the chunk whose results are in flight back to h_lat / h_lab


def _drain(slot: _Slot, latent_np: np.ndarray, labels_out_np: np.ndarray | None) -> None:
    """Wait for the slot's D2H copies and write its chunk back into the numpy matrices."""
    if slot.rows is None:
        return
    r0, r1 = slot.rows
    slot.done.synchronize()
    n = r1 - r0
    np.copyto(latent_np[r0:r1], slot.h_lat[:n].numpy())
    if labels_out_np is not None and slot.h_lab is not None:
        np.copyto(labels_out_np[r0:r1], slot.h_lab[:n].numpy())
    slot.rows = None


def _stream_cuda(
    latent_np: np.ndarray,
    pred_np: np.ndarray,
    labels_out_np: np.ndarray | None,
    args: tuple,
    device: torch.device,
    chunk_rows: int,
    impl: str,
) -> None:
    """Chunk i runs on slot i % 2: while the GPU works on one slot's stream, the host fills the other slot's pinned
    buffers (the memmap -> pinned copy is usually the bottleneck) and the other stream's copies overlap the kernel.
    A slot is reused only after its previous chunk was drained, so no buffer is overwritten while in flight."""
    M, C = latent_np.shape
    rows = min(chunk_rows, M)
    pred_dtype = torch.from_numpy(pred_np[:0]).dtype
    want_labels = labels_out_np is not None

    def pinned(dtype: torch.dtype) -> torch.Tensor:
        return torch.empty((rows, C), dtype=dtype, pin_memory=True)

    def dev(dtype: torch.dtype) -> torch.Tensor:
        return torch.empty((rows, C), dtype=dtype, device=device)

    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        slots = []
        for _ in range(2):
            s = torch.cuda.Stream(device)
            s.wait_stream(current)  # the device buffers were allocated on the current stream
            slots.append(
                _Slot(
                    stream=s,
                    done=torch.cuda.Event(),
                    h_lat=pinned(torch.float32),
                    h_pred=pinned(pred_dtype),
                    h_lab=pinned(torch.float32) if want_labels else None,
                    d_lat=dev(torch.float32),
                    d_pred=dev(pred_dtype),
                    d_lab=dev(torch.float32) if want_labels else None,
                )
            )
        try:
            for i, r0 in enumerate(range(0, M, chunk_rows)):
                r1 = min(M, r0 + chunk_rows)
                n = r1 - r0
                slot = slots[i % 2]
                _drain(slot, latent_np, labels_out_np)
                np.copyto(slot.h_lat[:n].numpy(), latent_np[r0:r1])
                np.copyto(slot.h_pred[:n].numpy(), pred_np[r0:r1])
                with torch.cuda.stream(slot.stream):
                    d_lat, d_pred = slot.d_lat[:n], slot.d_pred[:n]
                    d_lab = slot.d_lab[:n] if slot.d_lab is not None else None
                    d_lat.copy_(slot.h_lat[:n], non_blocking=True)
                    d_pred.copy_(slot.h_pred[:n], non_blocking=True)
                    _twin(impl).latent_update_(d_lat, d_pred, *args, d_lab)
                    slot.h_lat[:n].copy_(d_lat, non_blocking=True)
                    if d_lab is not None and slot.h_lab is not None:
                        slot.h_lab[:n].copy_(d_lab, non_blocking=True)
                    slot.done.record(slot.stream)
                slot.rows = (r0, r1)
            for slot in slots:
                _drain(slot, latent_np, labels_out_np)
        finally:
            for slot in slots:
                slot.stream.synchronize()
            current.wait_stream(slots[0].stream)
            current.wait_stream(slots[1].stream)


__all__ = [
    "BACKENDS",
    "OUTPUTS",
    "aggregate_scores",
    "cosine_scores",
    "latent_update_inplace",
    "latent_update_stream",
    "resolve_backend",
]
