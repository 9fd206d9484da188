"""Attention over the paged KV cache (layout: anygpt_engine/runtime/kv_cache.py).

  rope_kv_append(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq)
      rotate-half RoPE on q and k (both in place: packed prefill attends to them directly),
      computed in float32 and rounded once; rotated k and v written to their cache slots
      (kernels skip slots < 0: padding tokens).
  varlen_attention(q, k, v, cu_seqlens_q, max_q_len, causal=..., kv_lens/block_tables | cu_seqlens_k)
      packed variable-length queries over paged or packed-contiguous K/V; causal masking is
      bottom-right aligned (a run of q_len queries over kv_len keys ends at key kv_len - 1),
      so prompts that extend a cached prefix attend to it; causal=False with cu_seqlens_k is
      bidirectional attention with key padding (SoundStorm).
  paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens)
      one query per sequence over its first seq_lens[b] cached tokens; split along the
      context (flash-decoding) with the split count from the tuning table.

Faces: the torch reference (float32 math; the CPU path and oracle), Triton, and CUDA C++ for
decode and the RoPE append; ops.backend.choose picks, in the order the tuning table lists.
The decode and append references are graph-safe (no host reads: the engine's decode graphs
can hold them); the varlen reference loops over sequences on the host, so a graph holding
varlen attention (SoundStorm's) needs the Triton face.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import (FLOAT_TYPES, check_tensor, cuda_stream_handle, dtype_code, extension,
                                          on_tensor_device)
from anygpt_engine.ops.launches import record



CUDA_DECODE_HEAD_DIMS = (64, 128)  # the CUDA decode kernel's instantiations (Triton: any power of two)
CUDA_DECODE_BLOCK_SIZES = (8, 16, 32, 64)


# -- argument checks -----------------------------------------------------------------------------
def _heads_view(name, t):
    """A [tokens, heads, head_dim] view whose heads and elements are contiguous."""
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
        raise ValueError(f"{name} strides {t.stride()} must be contiguous within each token (heads x head_dim)")


def _power_of_two(n) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _check_cache(k_cache, v_cache, dtype, device, num_kv_heads, head_dim):
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, 4, (dtype,), device)
        if not c.is_contiguous():
            raise ValueError(f"{name} must be contiguous [blocks, block_size, kv_heads, head_dim]")
        if c.shape[2:] != (num_kv_heads, head_dim):
            raise ValueError(f"{name}.shape={tuple(c.shape)}, expected [blocks, block_size, {num_kv_heads}, "
                             f"{head_dim}]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache.shape={tuple(v_cache.shape)}, expected {tuple(k_cache.shape)} like k_cache")
    if not _power_of_two(k_cache.shape[1]):  # the Triton kernels tile a block whole (tl.arange)
        raise ValueError(f"k_cache.shape={tuple(k_cache.shape)}: block_size={k_cache.shape[1]}, expected a power "
                         "of two")


def _check_heads(num_q_heads, num_kv_heads, head_dim):
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q has {num_q_heads} heads, not a multiple of the {num_kv_heads} kv heads")
    # The Triton kernels tile a head (and its rotated halves) whole: tl.arange needs a power of two.
    if not 2 <= head_dim <= 256 or not _power_of_two(head_dim):
        raise ValueError(f"head_dim={head_dim}, expected a power of two in 2..256")


def _index(name, t, length, device):
    check_tensor(name, t, 1, (torch.int64,), device)
    if t.shape[0] != length:
        raise ValueError(f"{name}.shape={tuple(t.shape)}, expected ({length},)")
    if length > 1 and t.stride(0) != 1:  # the kernels index it as a plain array
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


# -- RoPE + KV append ----------------------------------------------------------------------------
def rope_kv_append_reference(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq) -> None:
    half = q.shape[-1] // 2
    angle = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rotate(x):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    q.copy_(rotate(q))
    k.copy_(rotate(k))
    # Graph-safe skipping of slots outside the cache: they write to slot 0, whose value is then
    # restored (or set by the first valid token that really targets it).
    valid = (slot_mapping >= 0) & (slot_mapping < k_cache.shape[0] * k_cache.shape[1])
    slots = torch.where(valid, slot_mapping, 0)
    hits_zero = valid & (slots == 0)
    for cache, new in ((k_cache, k), (v_cache, v)):
        rows = cache.view(-1, *cache.shape[2:])
        # index_select, not new[tensor]: indexing by a 0-d tensor reads it on the host (a sync)
        first_hit = new.index_select(0, hits_zero.int().argmax().view(1))[0]
        slot_zero = torch.where(hits_zero.any(), first_hit, rows[0])
        rows.index_copy_(0, slots, new.contiguous())
        rows[0] = slot_zero


def rope_kv_append(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq, *, backend=None) -> None:
    """q [T, Hq, D] and k [T, Hkv, D] are rotated in place; k and v then written into the caches
    [blocks, block_size, Hkv, D] at flat slots slot_mapping [T]. inv_freq: float32 [D / 2]."""
    check_tensor("q", q, 3, FLOAT_TYPES)
    tokens, num_q_heads, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, 3, (q.dtype,), q.device)
        if t.shape[0] != tokens or t.shape[2] != head_dim:
            raise ValueError(f"{name}.shape={tuple(t.shape)}, expected [{tokens}, kv_heads, {head_dim}]")
    if v.shape != k.shape:
        raise ValueError(f"v.shape={tuple(v.shape)}, expected {tuple(k.shape)} like k")
    num_kv_heads = k.shape[1]
    _check_heads(num_q_heads, num_kv_heads, head_dim)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _heads_view(name, t)
    _index("positions", positions, tokens, q.device)
    _index("slot_mapping", slot_mapping, tokens, q.device)
    _check_cache(k_cache, v_cache, q.dtype, q.device, num_kv_heads, head_dim)
    check_tensor("inv_freq", inv_freq, 1, (torch.float32,), q.device)
    if inv_freq.shape[0] != head_dim // 2 or not inv_freq.is_contiguous():
        raise ValueError(f"inv_freq.shape={tuple(inv_freq.shape)}, expected contiguous ({head_dim // 2},)")
    params = tuning.params("attention", q.device)
    face = _backend.choose("rope_kv_append", q.device, backend, tuple(params["rope_faces"]),
                           ("torch", "triton", "cuda"))
    if face == "torch":
        rope_kv_append_reference(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq)
    else:
        _rope_kv_append_kernel(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq, face)


# Kernel launches on checked arguments, registered so torch.compile and graphs see them.
@torch.library.custom_op("anygpt_engine::rope_kv_append_kernel", mutates_args=("q", "k", "k_cache", "v_cache"))
@on_tensor_device
def _rope_kv_append_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           inv_freq: torch.Tensor, face: str) -> None:
    record("rope_kv_append")
    if face == "triton":
        from anygpt_engine.kernels import attention as kernels

        kernels.rope_kv_append(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq,
                               num_warps=tuning.params("attention", q.device)["rope_warps"])
        return
    tokens, num_q_heads, head_dim = q.shape
    extension().rope_kv_append_cuda(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), positions.data_ptr(), slot_mapping.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), inv_freq.data_ptr(), tokens, num_q_heads, k.shape[1], head_dim,
        q.stride(0), k.stride(0), v.stride(0), k_cache.shape[0] * k_cache.shape[1], dtype_code("q", q),
        cuda_stream_handle(q.device))


@_rope_kv_append_kernel.register_fake
def _(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq, face):
    return None


# -- variable-length (prefill) attention --------------------------------------------------------
def _gather_pages(cache, table, length):
    """The first `length` tokens of a sequence from its block table: [length, Hkv, D]."""
    return cache[table].flatten(0, 1)[:length]


def varlen_attention_reference(q, k, v, cu_seqlens_q, causal, scale, kv_lens=None, block_tables=None,
                               cu_seqlens_k=None) -> torch.Tensor:
    out = torch.zeros_like(q)
    starts = cu_seqlens_q.tolist()
    paged = block_tables is not None
    if kv_lens is not None:
        lengths = kv_lens.tolist()
    else:
        lengths = [b - a for a, b in zip(cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])]
    k_starts = None if paged else cu_seqlens_k.tolist()
    for b in range(len(starts) - 1):
        q_len, kv_len = starts[b + 1] - starts[b], lengths[b]
        if q_len == 0 or kv_len == 0:
            continue
        if paged:
            keys, values = _gather_pages(k, block_tables[b], kv_len), _gather_pages(v, block_tables[b], kv_len)
        else:
            keys, values = k[k_starts[b]:k_starts[b] + kv_len], v[k_starts[b]:k_starts[b] + kv_len]
        qb = q[starts[b]:starts[b + 1]].float().transpose(0, 1)  # [Hq, q_len, D]
        mask = None
        if causal:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(qb, keys.float().transpose(0, 1), values.float().transpose(0, 1),
                                           attn_mask=mask, scale=scale,
                                           enable_gqa=q.shape[1] != keys.shape[1])
        if causal and kv_len < q_len:  # queries before the first key see nothing
            o[:, : q_len - kv_len] = 0
        out[starts[b]:starts[b + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


def varlen_attention_face(device: torch.device, backend: str | None = None) -> str:
    """The face varlen_attention runs on `device`. The torch reference reads the run lengths
    on the host, so a CUDA graph can hold the kernel face only."""
    return _backend.choose("varlen_attention", device, backend, ("triton",), ("torch", "triton"))


def varlen_attention(q, k, v, cu_seqlens_q, max_q_len: int, *, causal: bool = True, kv_lens=None,
                     block_tables=None, cu_seqlens_k=None, scale: float | None = None, out=None,
                     backend: str | None = None) -> torch.Tensor:
    """Attention of packed queries q [Tq, Hq, D] (runs given by cu_seqlens_q [B + 1], int64,
    longest `max_q_len`) over paged K/V (k, v caches with kv_lens [B] and block_tables [B, nb])
    or packed K/V (k, v [Tk, Hkv, D] with cu_seqlens_k [B + 1]; with kv_lens too, run b's keys
    past kv_lens[b] are padding, as in a padded batch). Paged kv_lens past the table's
    nb * block_size are clamped to it, on the device (as paged decode does), so a wrong length
    never reads past a row's table. Returns out [Tq, Hq, D]."""
    check_tensor("q", q, 3, FLOAT_TYPES)
    _heads_view("q", q)
    tokens, num_q_heads, head_dim = q.shape
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1, (torch.int64,), q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q is empty, expected [batch + 1] offsets starting at 0")
    paged = block_tables is not None
    if paged == (cu_seqlens_k is not None):
        raise ValueError("give either block_tables with kv_lens (paged K/V) or cu_seqlens_k (packed K/V)")
    if paged:
        if kv_lens is None:
            raise ValueError("kv_lens is required with block_tables")
        _check_cache(k, v, q.dtype, q.device, k.shape[2] if k.dim() == 4 else -1, head_dim)
        _index("kv_lens", kv_lens, batch, q.device)
        check_tensor("block_tables", block_tables, 2, (torch.int64,), q.device)
        if block_tables.shape[0] != batch or block_tables.stride(1) != 1:
            raise ValueError(f"block_tables.shape={tuple(block_tables.shape)}, expected [{batch}, blocks] with "
                             "contiguous rows")
    else:
        _index("cu_seqlens_k", cu_seqlens_k, batch + 1, q.device)
        if kv_lens is not None:
            _index("kv_lens", kv_lens, batch, q.device)
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, 3, (q.dtype,), q.device)
            _heads_view(name, t)
            if t.shape[2] != head_dim:
                raise ValueError(f"{name}.shape={tuple(t.shape)}, expected head_dim {head_dim}")
        if k.shape != v.shape:
            raise ValueError(f"v.shape={tuple(v.shape)}, expected {tuple(k.shape)} like k")
    _check_heads(num_q_heads, k.shape[-2], head_dim)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}")
    face = varlen_attention_face(q.device, backend)
    if face == "torch":
        if paged:  # the Triton kernel clamps in-kernel
            kv_lens = kv_lens.clamp(max=block_tables.shape[1] * k.shape[1])
        return out.copy_(varlen_attention_reference(q, k, v, cu_seqlens_q, causal, scale, kv_lens, block_tables,
                                                    cu_seqlens_k))
    _varlen_attention_kernel(out, q, k, v, cu_seqlens_q, max_q_len, scale, causal, kv_lens, block_tables,
                             cu_seqlens_k)
    return out


@torch.library.custom_op("anygpt_engine::varlen_attention_kernel", mutates_args=("out",))
@on_tensor_device
def _varlen_attention_kernel(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, max_q_len: int, scale: float, causal: bool,
                             kv_lens: torch.Tensor | None, block_tables: torch.Tensor | None,
                             cu_seqlens_k: torch.Tensor | None) -> None:
    from anygpt_engine.kernels import attention as kernels

    record("varlen_attention")
    params = tuning.params("attention", q.device)
    # float32 tiles (no tensor-core path) need smaller blocks to stay in registers.
    tile = "prefill_fp32_" if q.dtype == torch.float32 else "prefill_"
    # TMA tiles for 16-bit packed K/V (paged blocks are not one box; float32 tiles from TMA's
    # shared-memory layout spill) whose rows TMA can address.
    tma = (params["prefill_tma"] and block_tables is None and q.dtype != torch.float32 and kernels.tma_rows_ok(k)
           and kernels.tma_rows_ok(v))
    kernels.varlen_attention(out, q, k, v, cu_seqlens_q, max_q_len, scale, causal, kv_lens=kv_lens,
                             block_tables=block_tables, cu_seqlens_k=cu_seqlens_k, block_m=params[tile + "block_m"],
                             block_n=params[tile + "block_n"], num_warps=params[tile + "warps"],
                             num_stages=params[tile + "stages"], tma=tma)


@_varlen_attention_kernel.register_fake
def _(out, q, k, v, cu_seqlens_q, max_q_len, scale, causal, kv_lens, block_tables, cu_seqlens_k):
    return None


# -- paged decode attention ---------------------------------------------------------------------
def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """Batched and graph-safe: gathers every row's table (entries past seq_lens are masked)."""
    b, num_q_heads, head_dim = q.shape
    context = block_tables.shape[1] * k_cache.shape[1]
    keys = k_cache[block_tables].view(b, context, *k_cache.shape[2:]).transpose(1, 2).float()
    values = v_cache[block_tables].view(b, context, *v_cache.shape[2:]).transpose(1, 2).float()
    mask = torch.arange(context, device=q.device)[None, None, None, :] < seq_lens.view(b, 1, 1, 1)
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=num_q_heads != k_cache.shape[2])
    return out.squeeze(2).masked_fill((seq_lens == 0).view(b, 1, 1), 0).to(q.dtype)


def decode_face_order(batch: int, context: int, params: dict) -> tuple[str, ...]:
    """Faces to try for a decode shape, fastest first: the first measured rule whose bounds
    hold (rules [max_batch, max_context, face] are written by benchmarks/bench_attention.py
    --write-tuning), else the table's default order."""
    for max_batch, max_context, face in params.get("decode_rules", []):
        if batch <= max_batch and context <= max_context:
            return (face, *[f for f in params["decode_faces"] if f != face])
    return tuple(params["decode_faces"])


def decode_splits(batch: int, num_kv_heads: int, table_width: int, params: dict) -> int:
    """Context splits so batch x kv_heads x splits programs fill the GPU (host-side shapes only)."""
    wanted = -(-params["decode_target_programs"] // max(1, batch * num_kv_heads))
    return max(1, min(wanted, params["decode_max_splits"], table_width))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale: float | None = None, out=None,
                           num_splits: int | None = None, backend: str | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one query per sequence) over the caches [blocks, block_size, Hkv, D],
    reading blocks block_tables[b, :ceil(seq_lens[b] / block_size)]. Returns out [B, Hq, D].
    seq_lens lives on the device and is not checked here (that would sync); the kernels clamp it
    to the table's width, so a wrong length gives wrong numbers, never an out-of-bounds read."""
    check_tensor("q", q, 3, FLOAT_TYPES)
    _heads_view("q", q)
    batch, num_q_heads, head_dim = q.shape
    _check_cache(k_cache, v_cache, q.dtype, q.device, k_cache.shape[2] if k_cache.dim() == 4 else -1, head_dim)
    _check_heads(num_q_heads, k_cache.shape[2], head_dim)
    _index("seq_lens", seq_lens, batch, q.device)
    check_tensor("block_tables", block_tables, 2, (torch.int64,), q.device)
    if block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables.shape={tuple(block_tables.shape)}, expected [{batch}, blocks] with contiguous "
                         "rows")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if out is None:
        out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif (out.shape != (batch, num_q_heads, head_dim) or out.dtype != q.dtype or out.device != q.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({batch}, {num_q_heads}, {head_dim}) {q.dtype} tensor on "
                         f"{q.device}")
    if batch == 0:  # nothing to attend; the kernels would see an empty grid or table
        return out
    params = tuning.params("attention", q.device)
    context = block_tables.shape[1] * k_cache.shape[1]
    faces = decode_face_order(batch, context, params)
    if head_dim not in CUDA_DECODE_HEAD_DIMS or k_cache.shape[1] not in CUDA_DECODE_BLOCK_SIZES:
        faces = tuple(f for f in faces if f != "cuda")  # outside the CUDA kernel's instantiations
    face = _backend.choose("paged_decode_attention", q.device, backend, faces,
                           ("torch", "triton", "cuda"))
    if face == "torch":
        return out.copy_(paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale))
    if num_splits is None:
        num_splits = decode_splits(batch, k_cache.shape[2], block_tables.shape[1], params)
    elif not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits={num_splits!r}, expected a positive int")
    part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    if face == "cuda":
        q = q.contiguous()  # the CUDA kernel reads q as [B, Hq, D]
    _paged_decode_kernel(out, q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse, scale, face)
    return out


@torch.library.custom_op("anygpt_engine::paged_decode_attention_kernel", mutates_args=("out", "part_out", "part_lse"))
@on_tensor_device
def _paged_decode_kernel(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, part_out: torch.Tensor,
                         part_lse: torch.Tensor, scale: float, face: str) -> None:
    record("paged_decode_attention", 2 if face == "triton" or part_lse.shape[2] > 1 else 1)  # + the merge
    params = tuning.params("attention", q.device)
    batch, num_q_heads, head_dim = q.shape
    num_splits = part_lse.shape[2]
    if face == "triton":
        from anygpt_engine.kernels import attention as kernels

        kernels.paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, scale, part_out, part_lse, num_splits,
                             num_warps=params["triton_decode_warps"])
        return
    extension().paged_decode_attention_cuda(
        out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        seq_lens.data_ptr(), part_out.data_ptr(), part_lse.data_ptr(), batch, num_q_heads, k_cache.shape[2], head_dim,
        k_cache.shape[1], block_tables.shape[1], block_tables.stride(0), num_splits, scale, dtype_code("q", q),
        params["cuda_decode_threads"], cuda_stream_handle(q.device))


@_paged_decode_kernel.register_fake
def _(out, q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse, scale, face):
    return None
