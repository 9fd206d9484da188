"""Attention kernels over the paged KV cache (layout in anygpt_engine/runtime/kv_cache.py):

  rope_kv_append   RoPE on q and k (in place), then k and v written to their cache slots
  varlen_attention flash attention for a packed batch of variable-length query runs (prefill,
                   prompts extending cached prefixes, SoundStorm's bidirectional blocks);
                   K/V either paged (block tables) or packed contiguous (cu_seqlens_k)
  paged_decode     one query per sequence, split along the context (flash-decoding), GQA-aware:
                   a program serves every q head of one kv head, so each K/V page is read once
                   per group; a second kernel merges the splits

Softmax and accumulation are float32; outputs are rounded once (kernels.common.round_to).
Causal masking is bottom-right aligned: query i of a run of q_len queries over kv_len keys sits
at position kv_len - q_len + i and sees keys 0..that position.
"""

import torch
import triton
import triton.language as tl

from anygpt_engine.kernels.common import round_to

_LOG2E = 1.4426950408889634


@triton.jit
def _cos_sin(angle):
    """cos and sin of float32 angles of any size (positions x inv_freq reach thousands of
    radians), accurate to ~1e-6: Cody-Waite reduction to [-pi, pi] with 2*pi split into three
    parts, the first two with at most 11 significant bits so k * part is exact in float32 for
    |k| < 2^13 (angles below ~51,000), then the short-range functions (on a GPU these may be
    approximations that are only accurate near zero)."""
    k = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = angle - k * 6.28125
    r = r - k * 0.0019350051879882812
    r = r - k * 3.019916050561733e-07
    return tl.cos(r), tl.sin(r)


@triton.jit
def _rope_kv_append_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, inv_freq_ptr,
                           q_stride, k_stride, v_stride, num_q_heads, num_kv_heads, num_slots,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr, Q_HEADS: tl.constexpr,
                           KV_HEADS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, HALF)
    angle = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + j)
    cos, sin = _cos_sin(angle)
    cos, sin = cos[None, :], sin[None, :]

    qh = tl.arange(0, Q_HEADS)[:, None]
    q_mask = (qh < num_q_heads) & (j[None, :] < HALF)  # explicit 2-D mask
    q_row = q_ptr + token * q_stride + qh * HEAD_DIM + j[None, :]
    q1 = tl.load(q_row, mask=q_mask).to(tl.float32)
    q2 = tl.load(q_row + HALF, mask=q_mask).to(tl.float32)
    dtype = q_ptr.dtype.element_ty
    tl.store(q_row, round_to(q1 * cos - q2 * sin, dtype), mask=q_mask)
    tl.store(q_row + HALF, round_to(q2 * cos + q1 * sin, dtype), mask=q_mask)

    slot = tl.load(slot_ptr + token)
    kh = tl.arange(0, KV_HEADS)[:, None]
    head_mask = (kh < num_kv_heads) & (j[None, :] < HALF)
    # k is rotated in place whatever its slot; a slot outside the cache (slot < 0 marks padding)
    # stores nothing there.
    slots = kh * 0 + slot
    kv_mask = head_mask & (slots >= 0) & (slots < num_slots)
    k_row = k_ptr + token * k_stride + kh * HEAD_DIM + j[None, :]
    k1 = tl.load(k_row, mask=head_mask).to(tl.float32)
    k2 = tl.load(k_row + HALF, mask=head_mask).to(tl.float32)
    k_rot1 = round_to(k1 * cos - k2 * sin, dtype)
    k_rot2 = round_to(k2 * cos + k1 * sin, dtype)
    tl.store(k_row, k_rot1, mask=head_mask)
    tl.store(k_row + HALF, k_rot2, mask=head_mask)
    cache_row = slot * num_kv_heads * HEAD_DIM + kh * HEAD_DIM + j[None, :]
    tl.store(k_cache_ptr + cache_row, k_rot1, mask=kv_mask)
    tl.store(k_cache_ptr + cache_row + HALF, k_rot2, mask=kv_mask)
    v_row = v_ptr + token * v_stride + kh * HEAD_DIM + j[None, :]
    tl.store(v_cache_ptr + cache_row, tl.load(v_row, mask=kv_mask), mask=kv_mask)
    tl.store(v_cache_ptr + cache_row + HALF, tl.load(v_row + HALF, mask=kv_mask), mask=kv_mask)


def rope_kv_append(q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq, num_warps=4):
    """q [T, Hq, D] and k [T, Hkv, D] (both rotated in place), v [T, Hkv, D]: token-strided,
    head-contiguous views."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if tokens == 0:
        return
    _rope_kv_append_kernel[(tokens,)](
        q, k, v, positions, slot_mapping, k_cache, v_cache, inv_freq, q.stride(0), k.stride(0), v.stride(0),
        num_q_heads, num_kv_heads, k_cache.shape[0] * k_cache.shape[1], HEAD_DIM=head_dim, HALF=head_dim // 2,
        Q_HEADS=triton.next_power_of_2(num_q_heads), KV_HEADS=triton.next_power_of_2(num_kv_heads),
        num_warps=num_warps)


@triton.jit
def _key_offsets(keys, key_mask, seq, kv_head, k_start, block_tables_ptr, bt_stride, num_kv_heads, kv_token_stride,
                 HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr):
    """Element offset of key/value row `keys` (positions in the sequence) for one kv head; the
    block table is read only where key_mask holds (never past the row's last block)."""
    if PAGED:
        if MASKED:
            block = tl.load(block_tables_ptr + seq * bt_stride + keys // PAGE, mask=key_mask, other=0)
        else:
            block = tl.load(block_tables_ptr + seq * bt_stride + keys // PAGE)
        row = block * PAGE + keys % PAGE
        return row * (num_kv_heads * HEAD_DIM) + kv_head * HEAD_DIM
    return (k_start + keys) * kv_token_stride + kv_head * HEAD_DIM


@triton.jit
def _attend_keys(acc, m, l, q, q_pos, row_mask, k_ptr, v_ptr, first, last, kv_len, seq, kv_head, k_start,
                 block_tables_ptr, bt_stride, num_kv_heads, kv_token_stride, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                 CAUSAL: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over keys [first, last) in BLOCK_N steps. MASKED=False is the hot loop:
    the caller guarantees every key is in range and visible to every row, so there are no
    masks, and m is finite after the first step (no -inf guard). With TMA, k_ptr and v_ptr are
    descriptors of packed K/V as [tokens, kv_heads * HEAD_DIM] in [BLOCK_N, HEAD_DIM] boxes:
    rows past a run's keys belong to the next run or are zero-filled, and are masked here."""
    d = tl.arange(0, HEAD_DIM)
    for start in range(first, last, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < kv_len
        if TMA:
            box = [(k_start + start).to(tl.int32), kv_head * HEAD_DIM]
            k = k_ptr.load(box)
        else:
            offs = _key_offsets(keys, key_mask, seq, kv_head, k_start, block_tables_ptr, bt_stride, num_kv_heads,
                                kv_token_stride, HEAD_DIM, PAGED, PAGE, MASKED)
            if MASKED:
                k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=key_mask[:, None], other=0.0)
            else:
                k = tl.load(k_ptr + offs[:, None] + d[None, :])
        # float32 inputs stay float32 on tensor cores (ieee), not tf32: fp32 engines match the reference.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = key_mask[None, :] & row_mask[:, None]
            if CAUSAL:
                visible &= keys[None, :] <= q_pos[:, None]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # Rows that have seen no key yet keep m = -inf; shift by 0 there to avoid inf - inf.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shift = m_new
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m - shift)
        l = l * alpha + tl.sum(p, axis=1)
        if TMA:
            v = v_ptr.load(box)
            if MASKED:  # rows past the run (padding, the next run) may hold inf/NaN: 0 * inf is NaN
                v = tl.where(key_mask[:, None], v, 0.0)
        elif MASKED:
            v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=key_mask[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + offs[:, None] + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return acc, m, l


@triton.jit(do_not_specialize=["bt_stride", "bt_width", "num_tiles"])  # vary with the batch: no recompile
def _varlen_attention_kernel(out_ptr, q_ptr, k_ptr, v_ptr, cu_q_ptr, kv_len_ptr, cu_k_ptr, block_tables_ptr,
                             q_stride, out_stride, kv_token_stride, bt_stride, bt_width, num_q_heads, num_kv_heads,
                             scale, num_tiles, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             CAUSAL: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                             PADDED_KEYS: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    head = tl.program_id(0)
    # Causal tiles further down a run see more keys: launch them first so the last wave is short.
    tile = num_tiles - 1 - tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    kv_head = head // (num_q_heads // num_kv_heads)
    q_start = tl.load(cu_q_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    if PAGED:
        # Clamped to the table (as in decode), so a wrong length can never read past the row's block table.
        kv_len = tl.minimum(tl.load(kv_len_ptr + seq), bt_width * PAGE)
        k_start = 0
    else:
        k_start = tl.load(cu_k_ptr + seq).to(tl.int64)
        if PADDED_KEYS:  # runs of a padded batch: keys past kv_lens[seq] are padding
            kv_len = tl.load(kv_len_ptr + seq)
        else:
            kv_len = tl.load(cu_k_ptr + seq + 1) - k_start

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + rows)[:, None] * q_stride + head * HEAD_DIM + d[None, :], mask=row_mask[:, None],
                other=0.0)
    q_pos = kv_len - q_len + rows  # bottom-right aligned
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    if CAUSAL:
        # Keys 0..q_pos[first row] are visible to every row of the tile; the rest up to the last
        # row's position form the diagonal band.
        full = tl.maximum(kv_len - q_len + tile * BLOCK_M + 1, 0) // BLOCK_N * BLOCK_N
        end = kv_len - q_len + tl.minimum((tile + 1) * BLOCK_M, q_len)
    else:
        full = kv_len // BLOCK_N * BLOCK_N
        end = kv_len
    acc, m, l = _attend_keys(acc, m, l, q, q_pos, row_mask, k_ptr, v_ptr, 0, full, kv_len, seq, kv_head, k_start,
                             block_tables_ptr, bt_stride, num_kv_heads, kv_token_stride, qk_scale, HEAD_DIM, BLOCK_N,
                             PAGED, PAGE, CAUSAL, False, TMA, DOT_PRECISION)
    acc, m, l = _attend_keys(acc, m, l, q, q_pos, row_mask, k_ptr, v_ptr, full, end, kv_len, seq, kv_head, k_start,
                             block_tables_ptr, bt_stride, num_kv_heads, kv_token_stride, qk_scale, HEAD_DIM, BLOCK_N,
                             PAGED, PAGE, CAUSAL, True, TMA, DOT_PRECISION)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # rows without keys: zeros
    tl.store(out_ptr + (q_start + rows)[:, None] * out_stride + head * HEAD_DIM + d[None, :],
             round_to(out, out_ptr.dtype.element_ty), mask=row_mask[:, None])


def tma_rows_ok(t) -> bool:
    """Packed K/V [T, H, D] (heads and elements contiguous) that TMA can read as [T, H * D] rows:
    at least one token, 16-byte aligned base and token pitch."""
    return t.shape[0] > 0 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def varlen_attention(out, q, k, v, cu_seqlens_q, max_q_len, scale, causal, *, kv_lens=None, block_tables=None,
                     cu_seqlens_k=None, block_m=64, block_n=64, num_warps=4, num_stages=2, tma=False):
    """q, out [Tq, Hq, D]. Paged: k, v are caches [blocks, page, Hkv, D] with kv_lens [B] (each
    clamped to nb * page) and block_tables [B, nb]. Contiguous: k, v [Tk, Hkv, D] packed by
    cu_seqlens_k [B + 1], each run holding kv_lens[b] valid keys when kv_lens is given (key padding), else all of them.
    tma (packed K/V only; the caller checks tma_rows_ok): K/V tiles arrive by TMA."""
    batch = cu_seqlens_q.shape[0] - 1
    _, num_q_heads, head_dim = q.shape
    paged = block_tables is not None
    num_kv_heads = k.shape[-2]
    if batch == 0 or max_q_len == 0:
        return
    kv_token_stride = 0 if paged else k.stride(0)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k, v = (TensorDescriptor(t, [t.shape[0], num_kv_heads * head_dim], [t.stride(0), 1], [block_n, head_dim])
                for t in (k, v))
    num_tiles = triton.cdiv(max_q_len, block_m)
    _varlen_attention_kernel[(num_q_heads, num_tiles, batch)](
        out, q, k, v, cu_seqlens_q, kv_lens if kv_lens is not None else cu_seqlens_q,
        cu_seqlens_k if not paged else cu_seqlens_q, block_tables if paged else cu_seqlens_q,
        q.stride(0), out.stride(0), kv_token_stride, block_tables.stride(0) if paged else 0,
        block_tables.shape[1] if paged else 0, num_q_heads, num_kv_heads, scale, num_tiles,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, PAGED=paged,
        PAGE=k.shape[1] if paged else 1, PADDED_KEYS=not paged and kv_lens is not None, TMA=tma,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)


@triton.jit(do_not_specialize=["bt_stride", "bt_width", "num_splits"])  # vary with the batch
def _paged_decode_kernel(part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                         q_stride, bt_stride, bt_width, num_kv_heads, num_splits, scale,
                         HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Clamped to the table, so a wrong length can never read past the row's block table.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq), bt_width * PAGE)
    pages = tl.cdiv(seq_len, PAGE)
    per_split = tl.cdiv(pages, num_splits)
    first, last = split * per_split, tl.minimum((split + 1) * per_split, pages)

    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * q_stride + heads[:, None] * HEAD_DIM + d[None, :], mask=g_mask[:, None],
                other=0.0).to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    t = tl.arange(0, PAGE)
    for page in range(first, last):
        block = tl.load(block_tables_ptr + seq * bt_stride + page)
        keys = page * PAGE + t
        key_mask = keys < seq_len
        offs = (block * PAGE + t)[:, None] * (num_kv_heads * HEAD_DIM) + kv_head * HEAD_DIM + d[None, :]
        k = tl.load(k_cache_ptr + offs, mask=key_mask[:, None], other=0.0).to(tl.float32)
        # [GROUP, PAGE] scores without tl.dot: the group is small and decode is bandwidth-bound.
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * qk_scale
        s = tl.where(key_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + offs, mask=key_mask[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    part = (seq * num_kv_heads * GROUP + heads) * num_splits + split
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / tl.where(l == 0.0, 1.0, l)[:, None],
             mask=g_mask[:, None])
    # log-sum-exp in the exp2 domain; -inf for a split without keys.
    tl.store(part_lse_ptr + part, tl.where(l == 0.0, float("-inf"), m + tl.log2(tl.where(l == 0.0, 1.0, l))),
             mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])  # varies with the batch
def _merge_splits_kernel(out_ptr, part_out_ptr, part_lse_ptr, num_splits,
                         HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (sequence, q head)
    s = tl.arange(0, SPLITS)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None],
                    other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * HEAD_DIM + d, round_to(out, out_ptr.dtype.element_ty))


def paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, scale, part_out, part_lse, num_splits,
                 num_warps=4):
    """q [B, Hq, D] (token-strided), out [B, Hq, D] contiguous; caches [blocks, page, Hkv, D];
    part_out [B, Hq, splits, D] and part_lse [B, Hq, splits] float32 workspaces."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if batch == 0:
        return
    group = num_q_heads // num_kv_heads
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        part_out, part_lse, q, k_cache, v_cache, block_tables, seq_lens, q.stride(0), block_tables.stride(0),
        block_tables.shape[1], num_kv_heads,
        num_splits, scale, HEAD_DIM=head_dim, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1),
        PAGE=k_cache.shape[1], num_warps=num_warps)
    _merge_splits_kernel[(batch * num_q_heads,)](
        out, part_out, part_lse, num_splits, HEAD_DIM=head_dim, SPLITS=triton.next_power_of_2(num_splits),
        num_warps=num_warps)
