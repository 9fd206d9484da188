"""RMSNorm with an optional fused residual add: the backbone's normalisation op.

    out = weight * round(h * rsqrt(mean(h^2) + eps)),   h = float(x)
    with residual:  residual <- x + residual (in place, rounded to the dtype);  h = float(residual)

The rounding points are HF LlamaRMSNorm's, so every face matches transformers bit-for-bit up
to the order of the sum of squares. Faces: torch reference (CPU path and oracle), C++ CPU
twin ("cpp"), Triton ("triton") and CUDA C++ ("cuda"); ops.backend.choose picks.
"""

from __future__ import annotations

import torch

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import (as_rows, check_same, cuda_stream_handle, dtype_code, extension,
                                          on_tensor_device)
from anygpt_engine.ops.launches import record

_SUPPORTED = ("torch", "cpp", "triton", "cuda")
_PREFERRED_ON_GPU = ("cuda", "triton")
MAX_TRITON_HIDDEN = 16384


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Readable torch version; returns (out, new residual) without touching its inputs."""
    if residual is not None:
        residual = (x.float() + residual.float()).to(x.dtype)
        x = residual
    h = x.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype), residual


def _check(x, weight, eps, residual, out):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x.shape={tuple(x.shape)}, expected [..., hidden] with hidden > 0")
    dtype_code("x", x)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight.shape={tuple(weight.shape)}, expected ({hidden},) to match x.shape[-1]")
    check_same("weight", weight, "x", x)
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps={eps!r}, expected a finite number >= 0")
    for name, t in (("residual", residual), ("out", out)):
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name}.shape={tuple(t.shape)}, expected {tuple(x.shape)} like x")
        check_same(name, t, "x", x)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place), got strides {t.stride()}")
    if residual is not None and out is not None and out.data_ptr() == residual.data_ptr():
        raise ValueError("out and residual must be different tensors")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of x's last dimension; with `residual`, adds x into it in place first.

    Returns `out` (allocated when not given). Shapes [..., hidden]; x may be strided.
    """
    _check(x, weight, eps, residual, out)
    face = _backend.choose("rms_norm", x.device, backend, _PREFERRED_ON_GPU, _SUPPORTED)
    if face == "triton" and x.shape[-1] > MAX_TRITON_HIDDEN:
        if backend == "triton":
            raise ValueError(f"x.shape[-1]={x.shape[-1]}: the Triton rms_norm holds a row in registers, "
                             f"expected <= {MAX_TRITON_HIDDEN}")
        face = _backend.ran_instead("rms_norm", face, "cuda" if _backend.cuda_kernels_built() else "torch")
    if face == "torch":
        result, new_residual = rms_norm_reference(x, weight, eps, residual)
        if residual is not None:
            residual.copy_(new_residual)
        if out is None:
            return result
        return out.copy_(result)

    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rms_norm_kernel(out, residual, x, weight.contiguous(), float(eps), face)
    return out


@torch.library.custom_op("anygpt_engine::rms_norm_kernel", mutates_args=("out", "residual"))
@on_tensor_device
def _rms_norm_kernel(out: torch.Tensor, residual: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                     eps: float, face: str) -> None:
    """Launches one kernel face on checked arguments (registered so torch.compile sees it)."""
    record("rms_norm")
    hidden = x.shape[-1]
    x2 = as_rows(x)
    out2 = out.view(-1, hidden)
    res2 = residual.view(-1, hidden) if residual is not None else None
    params = tuning.params("rms_norm", x.device)
    if face == "triton":
        from anygpt_engine.kernels import rms_norm as triton_rms_norm

        triton_rms_norm.rms_norm(out2, res2, x2, weight, eps, num_warps=params["triton_num_warps"])
        return
    rows = x2.shape[0]
    res_ptr = res2.data_ptr() if res2 is not None else 0
    if face == "cpp":
        extension().rms_norm_cpu(out2.data_ptr(), res_ptr, x2.data_ptr(), weight.data_ptr(), rows, hidden,
                                 x2.stride(0), eps, dtype_code("x", x))
    else:
        extension().rms_norm_cuda(out2.data_ptr(), res_ptr, x2.data_ptr(), weight.data_ptr(), rows, hidden,
                                  x2.stride(0), eps, dtype_code("x", x), params["cuda_threads"],
                                  cuda_stream_handle(x.device))


@_rms_norm_kernel.register_fake
def _(out, residual, x, weight, eps, face):
    return None
