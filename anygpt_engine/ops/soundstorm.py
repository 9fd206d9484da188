"""SoundStorm's fused ops: the pieces of the conformer's fast forward (models/soundstorm.py,
SoundStorm.forward_fast) that are not plain GEMMs or the engine's attention ops.

  code_embedding(codes, semantic, code_embed, semantic_embed) -> x [B, N, D]
      x[b, n] = sum_q code_embed[codes[b, n, q] + q * (V + 1)] + semantic_embed[semantic[b, n]]
  add_layer_norm(residual, y, *, alpha, post_norm, norm, eps) -> out
      s = residual + alpha * y;  s = LN(s; post_norm) if given;  residual <- s;
      out = LN(residual; norm) if given
      (the conformer's residual adds, its post-norm and the next sublayer's pre-norm: one pass)
  conformer_conv(u, lengths, weight, bias, gamma, *, eps) -> [B, N, C]
      g = GLU(u) (out * sigmoid(gate), u = [out | gate]), zero past lengths;
      h = depthwise conv of g over time (K taps, upstream's 'same' padding) + bias, zero past
      lengths; h = Swish(h); channel LayerNorm (no bias, variance clamped at eps) times gamma
  grouped_linear(x, weight, bias) -> out [M, Q, V]
      out[m, q] = x[m, q] @ weight[q] + bias[q]   (the per-level output projection)

Numerics (every face): inputs are widened to float32, everything is computed in float32 and
each output is rounded once to its dtype, except that conformer_conv rounds the GLU output g to
u's dtype (the Triton face stores it between its two kernels) and add_layer_norm's `norm` reads
the rounded residual it stored. LayerNorm statistics are float32 (mean, then the mean square of
the deviations). Weights and biases of the norms and the conv may be any float dtype.

Faces: the torch reference (CPU path and oracle) and Triton; ops.backend.choose picks. All are
pure device work with preallocated or freshly allocated outputs: graph-capturable, no host sync.
Ids are not range-checked here (that would be a host sync): the callers check them, and the
Triton face clamps an id into its table rather than read outside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import FLOAT_TYPES, check_tensor, on_tensor_device
from anygpt_engine.ops.launches import record

_SUPPORTED = ("torch", "triton")
_PREFERRED_ON_GPU = ("triton",)
MAX_TRITON_DIM = 16384  # a row sits in registers
MAX_TRITON_CONV_CHANNELS = 8192  # BLOCK_T frames x all channels sit in registers


# -- checks ---------------------------------------------------------------------------------------
def _vector(name, t, size, device):
    check_tensor(name, t, 1, FLOAT_TYPES, device)
    if t.shape[0] != size or not t.is_contiguous():
        raise ValueError(f"{name}.shape={tuple(t.shape)}, expected contiguous ({size},)")


def _output(name, out, shape, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor(name, out, len(shape), (dtype,), device)
    if tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {tuple(shape)} {dtype} tensor, got {tuple(out.shape)} with "
                         f"strides {out.stride()}")
    return out


def _face(op, device, backend, width, limit=MAX_TRITON_DIM):
    face = _backend.choose(op, device, backend, _PREFERRED_ON_GPU, _SUPPORTED)
    if face == "triton" and width > limit:
        if backend == "triton":
            raise ValueError(f"{op}: width {width} exceeds the Triton kernel's {limit} (held in registers)")
        face = _backend.ran_instead(op, face, "torch")
    return face


# -- code embedding --------------------------------------------------------------------------------
def code_embedding_reference(codes, semantic, code_embed, semantic_embed) -> torch.Tensor:
    q = codes.shape[-1]
    offsets = torch.arange(q, device=codes.device) * (code_embed.shape[0] // q)
    rows = F.embedding(codes + offsets, code_embed.float())  # [B, N, Q, D]
    acc = rows[..., 0, :]
    for level in range(1, q):
        acc = acc + rows[..., level, :]
    return (acc + F.embedding(semantic, semantic_embed.float())).to(code_embed.dtype)


def code_embedding(codes: torch.Tensor, semantic: torch.Tensor, code_embed: torch.Tensor,
                   semantic_embed: torch.Tensor, *, out: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """codes [B, N, Q] int64 in [0, V] (V = the mask id), semantic [B, N] int64 in [0, S),
    code_embed [Q * (V + 1), D] (level q's rows start at q * (V + 1)), semantic_embed [S, D] of
    the same dtype. Returns x [B, N, D] in that dtype."""
    check_tensor("codes", codes, 3, (torch.int64,))
    device = codes.device
    b, n, q = codes.shape
    check_tensor("semantic", semantic, 2, (torch.int64,), device)
    if tuple(semantic.shape) != (b, n):
        raise ValueError(f"semantic.shape={tuple(semantic.shape)}, expected ({b}, {n}) like codes")
    check_tensor("code_embed", code_embed, 2, FLOAT_TYPES, device)
    if q == 0 or code_embed.shape[0] % q or not code_embed.is_contiguous():
        raise ValueError(f"code_embed.shape={tuple(code_embed.shape)}, expected contiguous [{q} * (V + 1), D] "
                         f"({q} levels)")
    dim = code_embed.shape[1]
    check_tensor("semantic_embed", semantic_embed, 2, (code_embed.dtype,), device)
    if semantic_embed.shape[1] != dim or not semantic_embed.is_contiguous():
        raise ValueError(f"semantic_embed.shape={tuple(semantic_embed.shape)}, expected contiguous [S, {dim}]")
    out = _output("out", out, (b, n, dim), code_embed.dtype, device)
    face = _face("code_embedding", device, backend, dim)
    if face == "torch":
        return out.copy_(code_embedding_reference(codes, semantic, code_embed, semantic_embed))
    _code_embedding_kernel(out, codes.contiguous(), semantic.contiguous(), code_embed, semantic_embed)
    return out


@torch.library.custom_op("anygpt_engine::code_embedding_kernel", mutates_args=("out",))
@on_tensor_device
def _code_embedding_kernel(out: torch.Tensor, codes: torch.Tensor, semantic: torch.Tensor, code_embed: torch.Tensor,
                           semantic_embed: torch.Tensor) -> None:
    """Launches the Triton face on checked arguments (registered so torch.compile sees it)."""
    from anygpt_engine.kernels import soundstorm as kernels

    record("code_embedding")
    params = tuning.params("soundstorm", out.device)
    q = codes.shape[-1]
    kernels.code_embedding(out.view(-1, out.shape[-1]), codes.view(-1, q), semantic.view(-1), code_embed,
                           semantic_embed, rows_per_program=params["embed_rows"], num_warps=params["embed_warps"])


@_code_embedding_kernel.register_fake
def _(out, codes, semantic, code_embed, semantic_embed):
    return None


# -- residual add + LayerNorm(s) ------------------------------------------------------------------
def add_layer_norm_reference(residual, y=None, alpha: float = 1.0, post_norm=None, norm=None,
                             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (new residual, out or None) without touching the inputs."""
    dim = residual.shape[-1]
    s = residual.float()
    if y is not None:
        s = s + alpha * y.float()
    if post_norm is not None:
        s = F.layer_norm(s, (dim,), post_norm[0].float(), post_norm[1].float(), eps)
    new_residual = s.to(residual.dtype)
    out = None
    if norm is not None:
        out = F.layer_norm(new_residual.float(), (dim,), norm[0].float(), norm[1].float(), eps).to(residual.dtype)
    return new_residual, out


def add_layer_norm(residual: torch.Tensor, y: torch.Tensor | None = None, *, alpha: float = 1.0,
                   post_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                   norm: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 1e-5,
                   out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor | None:
    """residual [..., D] (contiguous; written in place when y or post_norm is given) += alpha * y,
    then LayerNorm'd in place by post_norm = (weight, bias); returns out = LayerNorm(residual) by
    norm = (weight, bias), or None without norm. eps applies to both norms."""
    check_tensor("residual", residual, None, FLOAT_TYPES)
    device = residual.device
    if residual.dim() < 1 or residual.shape[-1] == 0 or not residual.is_contiguous():
        raise ValueError(f"residual: shape {tuple(residual.shape)}, strides {residual.stride()}: expected a "
                         "contiguous [..., D] tensor with D > 0")
    dim = residual.shape[-1]
    if y is not None:
        check_tensor("y", y, None, (residual.dtype,), device)
        if y.shape != residual.shape or not y.is_contiguous():
            raise ValueError(f"y.shape={tuple(y.shape)}, expected contiguous {tuple(residual.shape)} like residual")
    for name, pair in (("post_norm", post_norm), ("norm", norm)):
        if pair is None:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{name} must be a (weight, bias) pair or None")
        _vector(f"{name} weight", pair[0], dim, device)
        _vector(f"{name} bias", pair[1], dim, device)
    if y is None and post_norm is None and norm is None:
        raise ValueError("add_layer_norm needs at least one of y, post_norm and norm")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha={alpha!r}, expected a number")
    if not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ValueError(f"eps={eps!r}, expected a finite number >= 0")
    if norm is not None:
        out = _output("out", out, residual.shape, residual.dtype, device)
    face = _face("add_layer_norm", device, backend, dim)
    if face == "torch":
        new_residual, result = add_layer_norm_reference(residual, y, alpha, post_norm, norm, eps)
        if y is not None or post_norm is not None:
            residual.copy_(new_residual)
        return None if result is None else out.copy_(result)
    _add_layer_norm_kernel(residual, y, out, None if post_norm is None else post_norm[0],
                           None if post_norm is None else post_norm[1], None if norm is None else norm[0],
                           None if norm is None else norm[1], float(alpha), float(eps))
    return out


@torch.library.custom_op("anygpt_engine::add_layer_norm_kernel", mutates_args=("residual", "out"))
@on_tensor_device
def _add_layer_norm_kernel(residual: torch.Tensor, y: torch.Tensor | None, out: torch.Tensor | None,
                           post_weight: torch.Tensor | None, post_bias: torch.Tensor | None,
                           norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, alpha: float,
                           eps: float) -> None:
    """Launches the Triton face on checked arguments (registered so torch.compile sees it)."""
    from anygpt_engine.kernels import soundstorm as kernels

    record("add_layer_norm")
    params = tuning.params("soundstorm", residual.device)
    dim = residual.shape[-1]
    kernels.add_layer_norm(residual.view(-1, dim), None if y is None else y.view(-1, dim),
                           None if out is None else out.view(-1, dim),
                           None if post_weight is None else (post_weight, post_bias),
                           None if norm_weight is None else (norm_weight, norm_bias), alpha, eps,
                           rows_per_program=params["norm_rows"], num_warps=params["norm_warps"])


@_add_layer_norm_kernel.register_fake
def _(residual, y, out, post_weight, post_bias, norm_weight, norm_bias, alpha, eps):
    return None


# -- the conv module's core -------------------------------------------------------------------------
def conformer_conv_reference(u, lengths, weight, bias, gamma, eps: float) -> torch.Tensor:
    b, n, c2 = u.shape
    c, k = weight.shape
    out, gate = u.float().split(c, dim=-1)
    keep = (torch.arange(n, device=u.device) < lengths.view(b, 1)).unsqueeze(-1)  # [B, N, 1]
    g = (out * gate.sigmoid()).to(u.dtype).float().masked_fill(~keep, 0.0)
    h = F.conv1d(F.pad(g.transpose(1, 2), (k // 2, k // 2 - (k + 1) % 2)), weight.float().unsqueeze(1),
                 bias.float(), groups=c).transpose(1, 2)
    h = h.masked_fill(~keep, 0.0)
    h = h * h.sigmoid()
    var = torch.var(h, dim=-1, unbiased=False, keepdim=True)
    mean = torch.mean(h, dim=-1, keepdim=True)
    return ((h - mean) * var.clamp(min=eps).rsqrt() * gamma.float()).to(u.dtype)


def conformer_conv(u: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   gamma: torch.Tensor, *, eps: float, out: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """u [B, N, 2C] contiguous (the 1x1 conv's output: C 'out' channels, then C gates), lengths
    [B] int64 (frames >= lengths[b] are padding), weight [C, K] depthwise taps (any strides; a
    [K, C]-contiguous tensor's transpose reads fastest), bias and gamma [C]. Returns [B, N, C]
    in u's dtype (padded frames come out as 0)."""
    check_tensor("u", u, 3, FLOAT_TYPES)
    device = u.device
    b, n, c2 = u.shape
    if c2 % 2 or not u.is_contiguous():
        raise ValueError(f"u: shape {tuple(u.shape)}, strides {u.stride()}: expected contiguous [B, N, 2C]")
    c = c2 // 2
    check_tensor("lengths", lengths, 1, (torch.int64,), device)
    if lengths.shape[0] != b:
        raise ValueError(f"lengths.shape={tuple(lengths.shape)}, expected ({b},)")
    check_tensor("weight", weight, 2, FLOAT_TYPES, device)
    if weight.shape[0] != c or weight.shape[1] < 1:
        raise ValueError(f"weight.shape={tuple(weight.shape)}, expected [{c}, K] (depthwise taps per channel)")
    _vector("bias", bias, c, device)
    _vector("gamma", gamma, c, device)
    if not (isinstance(eps, (int, float)) and 0 < eps < float("inf")):
        raise ValueError(f"eps={eps!r}, expected a finite number > 0")
    out = _output("out", out, (b, n, c), u.dtype, device)
    face = _face("conformer_conv", device, backend, c, MAX_TRITON_CONV_CHANNELS)
    if face == "torch":
        return out.copy_(conformer_conv_reference(u, lengths, weight, bias, gamma, eps))
    _conformer_conv_kernel(out, u, lengths, weight, bias, gamma, float(eps))
    return out


@torch.library.custom_op("anygpt_engine::conformer_conv_kernel", mutates_args=("out",))
@on_tensor_device
def _conformer_conv_kernel(out: torch.Tensor, u: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, gamma: torch.Tensor, eps: float) -> None:
    """Launches the Triton face (two kernels; the GLU output lives in a scratch tensor)."""
    from anygpt_engine.kernels import soundstorm as kernels

    record("conformer_conv", 2)  # GLU, then depthwise conv + norm
    params = tuning.params("soundstorm", u.device)
    g = torch.empty(out.shape, dtype=u.dtype, device=u.device)
    kernels.conformer_conv(out, g, u, lengths, weight, bias, gamma, eps, glu_rows=params["glu_rows"],
                           glu_warps=params["glu_warps"], block_t=params["conv_block_t"],
                           num_warps=params["conv_warps"])


@_conformer_conv_kernel.register_fake
def _(out, u, lengths, weight, bias, gamma, eps):
    return None


# -- per-level output projection --------------------------------------------------------------------
def grouped_linear_reference(x, weight, bias) -> torch.Tensor:
    """float32 result [M, Q, V]."""
    return torch.einsum("mqd,qdv->mqv", x.float(), weight.float()) + bias.float()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, out: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """out[m, q] = x[m, q] @ weight[q] + bias[q]: x [M, Q, D] (unit last stride, rows and levels
    may be strided), weight [Q, D, V] contiguous of x's dtype, bias [Q, V]; out [M, Q, V] with
    unit last stride, float32 or x's dtype (out_dtype; default x's). Accumulates in float32."""
    check_tensor("x", x, 3, FLOAT_TYPES)
    device = x.device
    m, q, d = x.shape
    if x.stride(2) != 1:
        raise ValueError(f"x strides {x.stride()}: expected a unit last stride")
    check_tensor("weight", weight, 3, (x.dtype,), device)
    if weight.shape[:2] != (q, d) or not weight.is_contiguous():
        raise ValueError(f"weight.shape={tuple(weight.shape)}, expected contiguous [{q}, {d}, V]")
    v = weight.shape[2]
    check_tensor("bias", bias, 2, FLOAT_TYPES, device)
    if tuple(bias.shape) != (q, v) or not bias.is_contiguous():
        raise ValueError(f"bias.shape={tuple(bias.shape)}, expected contiguous ({q}, {v})")
    if out is None:
        dtype = x.dtype if out_dtype is None else out_dtype
        if dtype not in (torch.float32, x.dtype):
            raise TypeError(f"out_dtype={out_dtype}, expected torch.float32 or {x.dtype} (x's dtype)")
        out = torch.empty((m, q, v), dtype=dtype, device=device)
    else:
        check_tensor("out", out, 3, (torch.float32, x.dtype), device)
        if tuple(out.shape) != (m, q, v) or out.stride(2) != 1:
            raise ValueError(f"out: shape {tuple(out.shape)}, strides {out.stride()}: expected ({m}, {q}, {v}) with "
                             "a unit last stride")
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"out.dtype={out.dtype} but out_dtype={out_dtype}")
    face = _backend.choose("grouped_linear", device, backend, _PREFERRED_ON_GPU, _SUPPORTED)
    if face == "torch":
        return out.copy_(grouped_linear_reference(x, weight, bias))
    _grouped_linear_kernel(out, x, weight, bias)
    return out


@torch.library.custom_op("anygpt_engine::grouped_linear_kernel", mutates_args=("out",))
@on_tensor_device
def _grouped_linear_kernel(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Launches the Triton face on checked arguments (registered so torch.compile sees it)."""
    from anygpt_engine.kernels import soundstorm as kernels

    record("grouped_linear")
    params = tuning.params("soundstorm", x.device)
    # float32 tiles (no tensor cores) take a shorter k step to stay in registers.
    block_k = params["gemm_fp32_block_k" if x.dtype == torch.float32 else "gemm_block_k"]
    kernels.grouped_linear(out, x, weight, bias, block_m=params["gemm_block_m"], block_n=params["gemm_block_n"],
                           block_k=block_k, num_warps=params["gemm_warps"],
                           num_stages=params["gemm_stages"])


@_grouped_linear_kernel.register_fake
def _(out, x, weight, bias):
    return None
