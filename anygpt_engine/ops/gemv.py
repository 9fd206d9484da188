"""The backbone's linear layers: y = x @ W^T with the work around them fused, for 16-bit and
weight-only quantized weights (anygpt_engine/quantization.py).

  linear(x, W, norm_weight=None, activation=None, residual=None)
      h = rms_norm(x, norm_weight) when given (HF rounding, as ops.rms_norm), y = h @ W^T
      (float32 accumulation, rounded once to x's dtype); activation "silu_mul" over a stacked
      [gate; up] weight gives silu(gate) * up (each rounded as torch's 16-bit ops round); with
      residual, residual <- residual + y in place (rounded once) and residual is returned.
  linear_rope_kv_append(x, Wqkv, positions, slot_mapping, k_cache, v_cache, inv_freq, num_heads)
      the qkv projection followed by ops.rope_kv_append: q rotated into a [M, Hq, D] buffer
      (returned), k rotated and v written to their cache slots.

Faces: the torch reference (float32 accumulation: F.linear for 16-bit weights, quantized ones
dequantized a block of rows at a time; the CPU path and the oracle), Triton (every M; the
decode GEMV and, for quantized weights, the tiled GEMM that dequantizes tile by tile) and CUDA
C++ (GEMV for M <= 16 without the RoPE epilogue). Dispatch by M: 16-bit weights use the GEMV
kernels up to the crossover `max_m` of the tuning table and cuBLAS (F.linear, with the
prologue and epilogue as separate ops) above it; quantized weights always use the kernels,
so no dequantized copy ever exists. The tuning table names the GPU faces in order and the
tile sizes per M.

Split-K (tuning table, anygpt_engine/tuning/gemv.json): when the output tiles of a launch give
fewer than `split_waves` programs per SM (`sms`: 0 reads the device's SM count; the CPU entry
fixes one), the Triton kernels split K into up to `split_max` ranges of at least `split_min_k`
elements, so a batch-1 step (or a tensor-parallel shard) keeps every SM streaming weights;
`split_k` holds measured counts per "<op> <N_OUT>x<K>" and M (benchmarks/bench_gemv.py
--write-tuning), which win over the rule. The reduction runs in the same launch and in a fixed
order (kernels/gemv.py), so results are deterministic, replay for replay; the float32 partials
and tile counters live in a per-device workspace made outside CUDA graph capture (split GEMVs
on one device are stream-ordered: the engine runs its steps on one stream at a time). The CUDA
face splits each output row's K across `cuda_row_warps` warps of its block instead (an in-block
reduction in warp order), chosen by the same rule in warps: `cuda_warps_per_sm` wanted per SM.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import torch
import torch.nn.functional as F

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import (as_rows, check_same, check_tensor, cuda_stream_handle, dtype_code, extension,
                                          on_tensor_device)
from anygpt_engine.ops.launches import record
from anygpt_engine.ops.rms_norm import rms_norm, rms_norm_reference
from anygpt_engine.quantization import INT4_GROUP, QuantizedWeight

ACTIVATIONS = (None, "silu_mul")
CUDA_MAX_M = 16  # rows the CUDA GEMV instantiates (its accumulators live in registers)
_FORMATS = {None: 0, "int8": 1, "fp8": 2, "int4": 3}  # kernels.gemv and the C ABI's codes
_EPILOGUES = {None: 0, "residual": 1, "silu_mul": 2}
_REFERENCE_ROWS = 4096  # weight rows the reference dequantizes at a time


# -- reference ----------------------------------------------------------------------------------
def _matmul_reference(x: torch.Tensor, weight) -> torch.Tensor:
    """x @ W^T in x's dtype, accumulated in float32."""
    if not isinstance(weight, QuantizedWeight):
        return F.linear(x, weight)
    x32 = x.float()
    parts = [F.linear(x32, weight.dequantize(start, min(start + _REFERENCE_ROWS, weight.out_features)))
             for start in range(0, weight.out_features, _REFERENCE_ROWS)]
    return torch.cat(parts, dim=-1).to(x.dtype)


def silu_mul_reference(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of y = [gate, up] along the last dimension, rounded as torch's ops do."""
    gate, up = y.chunk(2, dim=-1)
    return (F.silu(gate.float()).to(y.dtype).float() * up.float()).to(y.dtype)


def linear_reference(x, weight, norm_weight=None, eps: float = 1e-5, activation=None,
                     residual=None) -> torch.Tensor:
    """Readable torch version; returns y, or the new residual (inputs untouched)."""
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)[0]
    y = _matmul_reference(x, weight)
    if activation == "silu_mul":
        y = silu_mul_reference(y)
    if residual is not None:
        return (y.float() + residual.float()).to(y.dtype)
    return y


def linear_rope_kv_append_reference(x, weight, positions, slot_mapping, k_cache, v_cache, inv_freq, num_heads: int,
                                    norm_weight=None, eps: float = 1e-5) -> torch.Tensor:
    """linear_reference then ops.attention's rope_kv_append reference; returns q [M, Hq, D]."""
    from anygpt_engine.ops.attention import rope_kv_append_reference

    qkv = linear_reference(x, weight, norm_weight, eps)
    head_dim = k_cache.shape[3]
    q_size, kv_size = num_heads * head_dim, k_cache.shape[2] * head_dim
    q = qkv[:, :q_size].reshape(-1, num_heads, head_dim).clone()
    k = qkv[:, q_size:q_size + kv_size].reshape(-1, k_cache.shape[2], head_dim).clone()
    v = qkv[:, q_size + kv_size:].reshape(-1, k_cache.shape[2], head_dim)
    rope_kv_append_reference(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq)
    return q


# -- checks -------------------------------------------------------------------------------------
def _check_weight(weight, x: torch.Tensor) -> tuple[int, int]:
    k = x.shape[-1]
    if isinstance(weight, QuantizedWeight):
        if weight.in_features != k:
            raise ValueError(f"weight.shape={weight.shape} ({weight.mode}), expected [N, {k}] to match x.shape[-1]")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device}, expected {x.device} like x")
        return weight.shape
    check_tensor("weight", weight, 2)
    check_same("weight", weight, "x", x)
    if weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"weight.shape={tuple(weight.shape)}, expected a contiguous [N, {k}] matrix")
    return tuple(weight.shape)


def _check(x, weight, norm_weight, eps, activation) -> tuple[int, int, int]:
    """(rows M, output features, K) after checking x, the weight and the prologue/epilogue."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x.shape={tuple(x.shape)}, expected [..., K] with K > 0")
    dtype_code("x", x)
    n, k = _check_weight(weight, x)
    if norm_weight is not None:
        if norm_weight.shape != (k,):
            raise ValueError(f"norm_weight.shape={tuple(norm_weight.shape)}, expected ({k},) to match x.shape[-1]")
        check_same("norm_weight", norm_weight, "x", x)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={eps!r}, expected a finite number >= 0")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}, expected one of {ACTIVATIONS}")
    if activation == "silu_mul" and n % 2:
        raise ValueError(f"activation='silu_mul' needs a stacked [gate; up] weight with an even row count, got {n}")
    return x.numel() // k, n // 2 if activation == "silu_mul" else n, k


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_output(name, t, shape, x):
    check_same(name, t, "x", x)
    if tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {tuple(shape)} tensor, got {tuple(t.shape)} with strides "
                         f"{t.stride()}")
    (start, end), (x_start, x_end) = _byte_range(t), _byte_range(x)
    if start < x_end and x_start < end:  # the kernels write rows while other programs still read x
        raise ValueError(f"{name} overlaps x in memory; the GEMV kernels need them apart")


# -- dispatch -----------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cuda_supports(x2: torch.Tensor, weight, m: int) -> bool:
    """Shapes the CUDA GEMV takes: M <= 16 and weight rows it reads as aligned 16-byte vectors."""
    qweight = weight.qweight if isinstance(weight, QuantizedWeight) else weight
    values = {None: 16 // x2.element_size(), "int8": 16, "fp8": 16, "int4": INT4_GROUP}[
        weight.mode if isinstance(weight, QuantizedWeight) else None]
    return m <= CUDA_MAX_M and x2.shape[1] % values == 0 and qweight.data_ptr() % 16 == 0


def _face(op: str, x2, weight, m: int, backend: str | None, rope: bool = False) -> str:
    """'torch', 'cublas' (16-bit weights above the crossover), 'triton' or 'cuda'."""
    params = tuning.params("gemv", x2.device)
    faces = tuple(params["faces"])
    if rope:
        faces = tuple(f for f in faces if f != "cuda")
    face = _backend.choose(op, x2.device, backend, faces, ("torch", "triton") if rope else ("torch", "triton", "cuda"))
    if face == "torch":
        return face
    if not isinstance(weight, QuantizedWeight) and m > params["max_m"]:
        return _backend.ran_instead(op, face, "cublas")
    if face == "cuda" and not _cuda_supports(x2, weight, m):
        if backend == "cuda":
            raise ValueError(f"backend='cuda' for {op}: the CUDA GEMV takes M <= {CUDA_MAX_M} rows and K a multiple "
                             f"of its 16-byte vectors, got M={m}, K={x2.shape[1]}")
        return _backend.ran_instead(op, face, "triton")
    return face


def linear(x: torch.Tensor, weight, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
           activation: str | None = None, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """y [..., N] (N / 2 with activation="silu_mul") of x [..., K] and weight [N, K] (a 16-bit
    tensor of x's dtype or a QuantizedWeight); see the module docstring. With `residual`
    ([..., N_out], contiguous) the result is added into it in place and it is returned."""
    m, n_out, k = _check(x, weight, norm_weight, eps, activation)
    shape = (*x.shape[:-1], n_out)
    if residual is not None:
        if out is not None:
            raise ValueError("give out or residual, not both: with residual the result is written into it")
        _check_output("residual", residual, shape, x)
    elif out is not None:
        _check_output("out", out, shape, x)
    x2 = as_rows(x)
    face = _face("linear", x2, weight, m, backend)
    if face == "torch":
        result = linear_reference(x, weight, norm_weight, eps, activation, residual)
        target = residual if residual is not None else out
        return result if target is None else target.copy_(result)
    if face == "cublas":
        return _library_linear(x, weight, norm_weight, eps, activation, residual, out)
    target = residual if residual is not None else out
    if target is None:
        target = torch.empty(shape, dtype=x.dtype, device=x.device)
    epilogue = "residual" if residual is not None else activation
    qweight, scales, zeros, fmt = _unpack(weight)
    _linear_kernel(target.view(-1, n_out), x2, qweight, scales, zeros, norm_weight, float(eps), fmt, epilogue or "",
                   face)
    return target


def _library_linear(x, weight, norm_weight, eps, activation, residual, out):
    """16-bit weights above the crossover: F.linear (cuBLAS) with the prologue and epilogue as
    separate ops (prefill is compute bound; their launches do not matter there)."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if out is not None and activation is None and residual is None:  # straight into out, no copy
        torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out=out.view(-1, out.shape[-1]))
        record("linear", 1)
        return out
    y = F.linear(x, weight)
    record("linear", 1)
    if activation == "silu_mul":
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate).mul_(up)
        record("linear", 2)
    target = residual if residual is not None else out
    if target is None:
        return y
    record("linear", 1)
    return target.add_(y) if residual is not None else target.copy_(y)


def _unpack(weight):
    if isinstance(weight, QuantizedWeight):
        return weight.qweight, weight.scales, weight.zeros, weight.mode or ""
    return weight, None, None, ""


def _blocks(params: dict, m: int, fmt: str, k: int | None = None) -> dict:
    """Tile sizes and inner product for M rows (the tuning table's per-M choices); the K step
    is never longer than K itself needs."""
    if m > params["max_m"]:  # quantized GEMM above the crossover
        block = dict(dot=True, block_m=params["gemm_block_m"], block_n=params["gemm_block_n"],
                     block_k=params["gemm_block_k"], num_warps=params["gemm_warps"], num_stages=params["gemm_stages"])
    elif m >= params["dot_min_m"]:
        block = dict(dot=True, block_m=16, block_n=params["dot_block_n"], block_k=params["dot_block_k"],
                     num_warps=params["dot_warps"], num_stages=params["dot_stages"])
    else:
        block_m = 1 << (m - 1).bit_length()
        block_n = params["fma_block_n"]
        block = dict(dot=False, block_m=block_m, block_n=block_n,
                     block_k=max(16, params["fma_elements"] // (block_m * block_n)), num_warps=params["fma_warps"],
                     num_stages=params["fma_stages"])
    if k is not None:
        block["block_k"] = min(block["block_k"], max(16, 1 << (k - 1).bit_length()))
    if fmt == "int4":  # whole groups per step
        block["block_k"] = max(INT4_GROUP, block["block_k"] // INT4_GROUP * INT4_GROUP)
    return block


def _sm_count(params: dict, device: torch.device) -> int:
    return params["sms"] or _device_sms(device)


@functools.lru_cache(maxsize=None)
def _device_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(params: dict, op: str, device: torch.device, n_out: int, k: int, m: int, tiles: int,
            block_k: int) -> int:
    """K ranges for a launch of `tiles` output tiles: the measured count for the shape when the
    tuning table has one, else enough for split_waves programs per SM (see the module
    docstring); never more than K's BLOCK_K steps, and no range left empty."""
    measured = params["split_k"].get(f"{op} {n_out}x{k}", {}).get(str(m))
    if measured is not None:
        wanted = int(measured)
    else:
        target = params["split_waves"] * _sm_count(params, device)
        if tiles >= target:
            return 1
        wanted = min(math.ceil(target / tiles), params["split_max"], k // params["split_min_k"])
    steps = -(-k // block_k)
    splits = max(1, min(wanted, steps))
    return -(-steps // -(-steps // splits))


def cuda_row_warps(params: dict, device: torch.device, n_out: int) -> int:
    """Warps per output row for the CUDA GEMV (a power of two up to cuda_row_warps, which the
    launcher lowers further when a staged x chunk has fewer vectors): enough that the launch
    has cuda_warps_per_sm warps per SM."""
    target = params["cuda_warps_per_sm"] * _sm_count(params, device)
    most = min(params["cuda_row_warps"], params["cuda_threads"] // 32)
    warps = 1
    while warps < most and n_out * warps < target:
        warps *= 2
    return warps


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_retired: list[tuple[torch.Tensor, torch.Tensor]] = []
_workspace_lock = threading.Lock()


def split_workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's split-K workspace (float32 partials, int32 tile counters that every launch
    leaves at zero), at least this large. It grows only outside CUDA graph capture; outgrown
    buffers stay allocated, as graphs captured earlier still use them."""
    with _workspace_lock:
        current = _workspaces.get(device)
        if current is not None and current[0].numel() >= floats and current[1].numel() >= counters:
            return current
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"ops.linear needs a larger split-K workspace ({floats} floats, {counters} counters) "
                               "while a CUDA graph is being captured: run the step once before capturing it")
        sizes = [max(1 << (need - 1).bit_length(), 1024 if current is None else have.numel())
                 for need, have in zip((floats, counters), current or (None, None))]
        fresh = (torch.empty(sizes[0], dtype=torch.float32, device=device),
                 torch.zeros(sizes[1], dtype=torch.int32, device=device))
        if current is not None:
            _retired.append(current)
        _workspaces[device] = fresh
        return fresh


def _split_args(params: dict, op: str, device: torch.device, n_out: int, k: int, m: int, tiles: int, parts: int,
                blocks: dict) -> dict:
    """splits (and the workspace when > 1) for a Triton launch of `tiles` output tiles."""
    splits = split_k(params, op, device, n_out, k, m, tiles, blocks["block_k"])
    if splits == 1:
        return dict(splits=1)
    from anygpt_engine.kernels.gemv import split_workspace_shape

    workspace, counters = split_workspace(device, *split_workspace_shape(tiles, splits, parts, blocks["block_m"],
                                                                         blocks["block_n"]))
    return dict(splits=splits, workspace=workspace, counters=counters)


@contextlib.contextmanager
def _counters_reset_on_error(split: dict):
    """A launch interrupted part way (the CPU interpreter runs programs one by one) would leave
    tile counters counted up, and every later split launch of those tiles would never find its
    last program: zero them on the way out of an error."""
    try:
        yield
    except BaseException:
        if split["splits"] > 1:
            split["counters"].zero_()
        raise


# Kernel launches on checked arguments, registered so torch.compile and CUDA graphs see them.
@torch.library.custom_op("anygpt_engine::linear_kernel", mutates_args=("out",))
@on_tensor_device
def _linear_kernel(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                   zeros: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float, fmt: str, epilogue: str,
                   face: str) -> None:
    m, k = x.shape
    n_out = out.shape[1]
    params = tuning.params("gemv", x.device)
    record("linear", 1)
    if face == "triton":
        from anygpt_engine.kernels import gemv as kernels

        blocks = _blocks(params, m, fmt or None, k)
        tiles = -(-n_out // blocks["block_n"]) * -(-m // blocks["block_m"])
        split = _split_args(params, "linear", x.device, n_out, k, m, tiles, 2 if epilogue == "silu_mul" else 1,
                            blocks)
        with _counters_reset_on_error(split):
            kernels.gemv(out, x, weight, scales, zeros, norm_weight, eps, weight_format=_FORMATS[fmt or None],
                         epilogue=_EPILOGUES[epilogue or None], n_out=n_out, dot_in_fp32=_interpreting(),
                         group=INT4_GROUP, **blocks, **split)
        return
    extension().gemv_cuda(out.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if scales is None else scales.data_ptr(),
                          0 if zeros is None else zeros.data_ptr(), 0 if norm_weight is None else norm_weight.data_ptr(),
                          m, n_out, k, x.stride(0), out.stride(0), eps, dtype_code("x", x), _FORMATS[fmt or None],
                          _EPILOGUES[epilogue or None], params["cuda_threads"],
                          cuda_row_warps(params, x.device, n_out), cuda_stream_handle(x.device))


@_linear_kernel.register_fake
def _(out, x, weight, scales, zeros, norm_weight, eps, fmt, epilogue, face):
    return None


# -- qkv + RoPE + KV append -------------------------------------------------------------------
def linear_rope_kv_append(x: torch.Tensor, weight, positions: torch.Tensor, slot_mapping: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, inv_freq: torch.Tensor, num_heads: int, *,
                          norm_weight: torch.Tensor | None = None, eps: float = 1e-5, q_out: torch.Tensor | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """q [M, num_heads, D] of x [M, K] through the stacked [q; k; v] weight (N = (Hq + 2 Hkv) D),
    rotated at `positions` [M]; k (rotated) and v go to cache slots `slot_mapping` [M] of the
    caches [blocks, block_size, Hkv, D] (a slot outside the cache writes nothing), as
    ops.rope_kv_append does. The decode step's projection in one launch."""
    from anygpt_engine.ops.attention import _check_cache, _check_heads, _index

    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [tokens, K] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    m, n, k = _check(x, weight, norm_weight, eps, None)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r}, expected a positive int")
    check_tensor("k_cache", k_cache, 4)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    _check_heads(num_heads, num_kv_heads, head_dim)
    _check_cache(k_cache, v_cache, x.dtype, x.device, num_kv_heads, head_dim)
    if n != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"weight has {n} rows, expected (num_heads={num_heads} + 2 x {num_kv_heads} kv heads) x "
                         f"head_dim {head_dim} = {(num_heads + 2 * num_kv_heads) * head_dim}")
    _index("positions", positions, m, x.device)
    _index("slot_mapping", slot_mapping, m, x.device)
    check_tensor("inv_freq", inv_freq, 1, (torch.float32,), x.device)
    if inv_freq.shape[0] != head_dim // 2 or not inv_freq.is_contiguous():
        raise ValueError(f"inv_freq.shape={tuple(inv_freq.shape)}, expected contiguous ({head_dim // 2},)")
    if q_out is None:
        q_out = torch.empty((m, num_heads, head_dim), dtype=x.dtype, device=x.device)
    else:
        _check_output("q_out", q_out, (m, num_heads, head_dim), x)
    x2 = as_rows(x)
    face = _face("linear_rope_kv_append", x2, weight, m, backend, rope=True)
    if face == "triton" and not _rope_tile_ok(tuning.params("gemv", x.device), head_dim, m):
        face = _backend.ran_instead("linear_rope_kv_append", face,
                                    "cublas" if not isinstance(weight, QuantizedWeight) else "triton_unfused")
    if face == "torch":
        return q_out.copy_(linear_rope_kv_append_reference(x, weight, positions, slot_mapping, k_cache, v_cache,
                                                           inv_freq, num_heads, norm_weight, eps))
    if face in ("cublas", "triton_unfused"):  # the projections, then the RoPE + append op
        from anygpt_engine.ops.attention import rope_kv_append

        if norm_weight is not None and face == "cublas":  # once, not per projection
            x, norm_weight = rms_norm(x, norm_weight, eps), None
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        sub_backend = None if face == "cublas" else "triton"
        # q straight into q_out: contiguous for the decode attention, no copy
        linear(x, _weight_rows(weight, 0, q_size), norm_weight=norm_weight, eps=eps, out=q_out.view(m, q_size),
               backend=sub_backend)
        kv = linear(x, _weight_rows(weight, q_size, n), norm_weight=norm_weight, eps=eps, backend=sub_backend)
        k = kv[:, :kv_size].view(m, num_kv_heads, head_dim)
        v = kv[:, kv_size:].view(m, num_kv_heads, head_dim)
        rope_kv_append(q_out, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq)
        return q_out
    qweight, scales, zeros, fmt = _unpack(weight)
    _qkv_rope_kernel(q_out, k_cache, v_cache, x2, qweight, scales, zeros, norm_weight, float(eps), positions,
                     slot_mapping, inv_freq, fmt)
    return q_out


def _weight_rows(weight, start: int, end: int):
    return weight.rows(start, end) if isinstance(weight, QuantizedWeight) else weight[start:end]


def _rope_tile_ok(params: dict, head_dim: int, m: int) -> bool:
    """The fused kernel splits each half head into BLOCK_N row slices (a power of two >= 16)."""
    half = head_dim // 2
    block_n = min(params["rope_block_n"], half)
    return m <= params["max_m"] and half % block_n == 0 and block_n >= 16 and block_n & (block_n - 1) == 0


@torch.library.custom_op("anygpt_engine::qkv_rope_kernel", mutates_args=("q", "k_cache", "v_cache"))
@on_tensor_device
def _qkv_rope_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, x: torch.Tensor,
                     weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
                     norm_weight: torch.Tensor | None, eps: float, positions: torch.Tensor, slot_mapping: torch.Tensor,
                     inv_freq: torch.Tensor, fmt: str) -> None:
    from anygpt_engine.kernels import gemv as kernels

    params = tuning.params("gemv", x.device)
    m = x.shape[0]
    k = x.shape[1]
    blocks = _blocks(params, m, fmt or None, k)
    blocks["block_n"] = min(params["rope_block_n"], q.shape[2] // 2)
    heads = q.shape[1] + 2 * k_cache.shape[2]
    tiles = heads * (q.shape[2] // 2 // blocks["block_n"]) * -(-m // blocks["block_m"])
    split = _split_args(params, "qkv_rope", x.device, heads * q.shape[2], k, m, tiles, 2, blocks)
    record("linear_rope_kv_append", 1)
    with _counters_reset_on_error(split):
        kernels.qkv_rope(q, k_cache, v_cache, x, weight, scales, zeros, norm_weight, eps, positions, slot_mapping,
                         inv_freq, weight_format=_FORMATS[fmt or None], dot_in_fp32=_interpreting(),
                         group=INT4_GROUP, **blocks, **split)


@_qkv_rope_kernel.register_fake
def _(q, k_cache, v_cache, x, weight, scales, zeros, norm_weight, eps, positions, slot_mapping, inv_freq, fmt):
    return None
