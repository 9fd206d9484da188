"""The LM head with the final RMSNorm fused in, over all vocabulary rows or only a range.

    logits = rms_norm(x, norm_weight, eps) @ weight.T     (float32 [B, V])

`rows` is a device tensor (first_row, num_rows): only those weight rows are read and every
other logit is -inf. While a modality span is open (after <sosp>, say), the legal tokens are
a contiguous run (the values, the start token, the end token; the sampler masks the start
token), so the head reads ~1k of AnyGPT's 53.5k rows. Because `rows` lives on the device,
one captured CUDA graph serves every modality and the full vocabulary.

Faces: torch reference (full head, then the mask: legal rows identical by construction) and
Triton (reads only the rows; bit-identical to itself with the full range on those rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import check_same, dtype_code, on_tensor_device
from anygpt_engine.ops.launches import record
from anygpt_engine.ops.rms_norm import rms_norm_reference


def lm_head_reference(x, norm_weight, eps, weight, rows=None) -> torch.Tensor:
    logits = F.linear(rms_norm_reference(x, norm_weight, eps)[0], weight).float()
    if rows is None:
        return logits
    v = torch.arange(weight.shape[0], device=x.device)
    return logits.masked_fill(~((v >= rows[0]) & (v < rows[0] + rows[1])), -math.inf)


def lm_head(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, *,
            rows: torch.Tensor | None = None, out: torch.Tensor | None = None,
            backend: str | None = None) -> torch.Tensor:
    """x [B, H] (pre-norm hidden states, rows may be strided), norm_weight [H], weight [V, H];
    rows: int64 device tensor (first_row, num_rows) or None for all. Returns float32 [B, V]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [batch, hidden] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    dtype_code("x", x)
    batch, hidden = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"x strides {x.stride()} must be contiguous along hidden")
    if norm_weight.shape != (hidden,):
        raise ValueError(f"norm_weight.shape={tuple(norm_weight.shape)}, expected ({hidden},)")
    if weight.dim() != 2 or weight.shape[1] != hidden or not weight.is_contiguous():
        raise ValueError(f"weight.shape={tuple(weight.shape)}, expected a contiguous [vocab, {hidden}] matrix")
    check_same("norm_weight", norm_weight, "x", x)
    check_same("weight", weight, "x", x)
    vocab = weight.shape[0]
    if rows is not None and (rows.shape != (2,) or rows.dtype != torch.int64 or rows.device != x.device):
        raise ValueError(f"rows must be an int64 tensor (first_row, num_rows) on {x.device}, got "
                         f"{rows.dtype} {tuple(rows.shape)} on {rows.device}")
    if out is None:
        out = torch.empty(batch, vocab, dtype=torch.float32, device=x.device)
    elif out.shape != (batch, vocab) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 ({batch}, {vocab}) tensor")
    face = _backend.choose("lm_head", x.device, backend, ("triton",), ("torch", "triton"))
    if face == "torch":
        return out.copy_(lm_head_reference(x, norm_weight, eps, weight, rows))
    if rows is None:  # (0, vocab) made on the device: no host-to-device copy, so graph capture is safe
        rows = torch.arange(2, dtype=torch.int64, device=x.device) * vocab
    _lm_head_kernel(out, x, norm_weight, weight, rows, float(eps))
    return out


@torch.library.custom_op("anygpt_engine::lm_head_kernel", mutates_args=("out",))
@on_tensor_device
def _lm_head_kernel(out: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                    rows: torch.Tensor, eps: float) -> None:
    """The Triton launch on checked arguments (registered so torch.compile and graphs see it)."""
    from anygpt_engine.kernels import lm_head as kernels

    record("lm_head")
    params = tuning.params("lm_head", x.device)
    # float32 tiles (no tensor cores) take a shorter k step to stay in registers.
    block_k = params["fp32_block_k" if x.dtype == torch.float32 else "block_k"]
    kernels.lm_head(out, x, norm_weight, weight, rows, eps, block_v=params["block_v"], block_k=block_k,
                    num_warps=params["num_warps"], num_stages=params["num_stages"])


@_lm_head_kernel.register_fake
def _(out, x, norm_weight, weight, rows, eps):
    return None
