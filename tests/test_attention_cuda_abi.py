"""The raw C ABI of the CUDA attention kernels (paged decode attention, fused RoPE + KV append),
called through anygpt_engine._C: argument checks that run on any machine (they come before the
device check), the clear error without a GPU, and small GPU sanity checks against a torch reference.
The ops-level tests (anygpt_engine.ops) live elsewhere."""

import math
import re

import pytest
import torch

from anygpt_engine.ops._extension import extension
from conftest import HAS_GPU, poison

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ext():
    return extension()


def _needs_cuda_build():
    if not _ext().built_with_cuda:
        pytest.skip("extension built without CUDA kernels: the stubs only report NO_CUDA")


# ---- argument sets that pass every check (pointers are only compared with null / alignment) ----


def _decode_args(**overrides):
    buf = torch.empty(1 << 12, dtype=torch.float32)  # 16-byte aligned storage for every pointer
    ptr = buf.data_ptr()
    args = dict(out=ptr, q=ptr, k_cache=ptr, v_cache=ptr, block_tables=ptr, seq_lens=ptr, workspace_out=ptr,
                workspace_lse=ptr, batch=2, num_q_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
                max_blocks=4, block_table_stride=4, num_splits=2, scale=128**-0.5, dtype=DTYPE_CODES[torch.bfloat16],
                threads=128, stream=0)
    args.update(overrides)
    return args, buf


def _rope_args(**overrides):
    buf = torch.empty(1 << 12, dtype=torch.float32)
    ptr = buf.data_ptr()
    args = dict(q=ptr, k=ptr, v=ptr, positions=ptr, slot_mapping=ptr, k_cache=ptr, v_cache=ptr, inv_freq=ptr,
                num_tokens=3, num_q_heads=4, num_kv_heads=2, head_dim=64, q_token_stride=8 * 64,
                k_token_stride=8 * 64, v_token_stride=8 * 64, num_slots=64, dtype=DTYPE_CODES[torch.float16],
                stream=0)
    args.update(overrides)
    return args, buf


def _parameter_names(function):
    """Argument names from pybind11's signature line (its type spelling varies across versions)."""
    signature = function.__doc__.splitlines()[0]
    return re.findall(r"[(,]\s*(\w+):", signature)


def test_bindings_exist_with_documented_argument_names():
    ext = _ext()
    assert _parameter_names(ext.paged_decode_attention_cuda) == [
        "out", "q", "k_cache", "v_cache", "block_tables", "seq_lens", "workspace_out", "workspace_lse", "batch",
        "num_q_heads", "num_kv_heads", "head_dim", "block_size", "max_blocks", "block_table_stride", "num_splits",
        "scale", "dtype", "threads", "stream"]
    assert _parameter_names(ext.rope_kv_append_cuda) == [
        "q", "k", "v", "positions", "slot_mapping", "k_cache", "v_cache", "inv_freq", "num_tokens", "num_q_heads",
        "num_kv_heads", "head_dim", "q_token_stride", "k_token_stride", "v_token_stride", "num_slots", "dtype",
        "stream"]


def test_without_cuda_build_the_stubs_report_it():
    ext = _ext()
    if ext.built_with_cuda:
        pytest.skip("extension built with CUDA kernels")
    args, _ = _decode_args()
    with pytest.raises(RuntimeError, match="paged_decode_attention: .*built without CUDA"):
        ext.paged_decode_attention_cuda(**args)
    args, _ = _rope_args()
    with pytest.raises(RuntimeError, match="rope_kv_append: .*built without CUDA"):
        ext.rope_kv_append_cuda(**args)


DECODE_BAD = [
    (dict(head_dim=96), ValueError, r"head_dim=96, expected 64 or 128"),
    (dict(num_q_heads=6, num_kv_heads=4), ValueError, r"num_q_heads=6, expected a multiple of num_kv_heads=4"),
    (dict(num_q_heads=0), ValueError, r"num_q_heads=0, expected >= 1"),
    (dict(num_kv_heads=0), ValueError, r"num_kv_heads=0, expected >= 1"),
    (dict(batch=-1), ValueError, r"batch=-1, expected 0..65535"),
    (dict(batch=70000), ValueError, r"batch=70000, expected 0..65535"),
    (dict(block_size=12), ValueError, r"block_size=12, expected 8, 16, 32 or 64"),
    (dict(block_size=128), ValueError, r"block_size=128"),
    (dict(max_blocks=0), ValueError, r"max_blocks=0, expected 1\.\."),
    (dict(max_blocks=1 << 27), ValueError, r"max_blocks=134217728, expected 1\.\.67108864"),
    (dict(block_table_stride=3), ValueError, r"block_table_stride=3, expected >= max_blocks=4"),
    (dict(num_splits=0), ValueError, r"num_splits=0, expected 1\.\."),
    (dict(scale=math.inf), ValueError, r"scale=inf, expected a finite value"),
    (dict(scale=math.nan), ValueError, r"scale=nan, expected a finite value"),
    (dict(threads=96), ValueError, r"threads=96, expected 32, 64, 128 or 256"),
    (dict(threads=512), ValueError, r"threads=512"),
    (dict(dtype=7), TypeError, r"dtype code 7, expected float32, float16 or bfloat16"),
    (dict(q=0), ValueError, r"q is a null pointer"),
    (dict(k_cache=0), ValueError, r"k_cache is a null pointer"),
    (dict(block_tables=0), ValueError, r"block_tables is a null pointer"),
    (dict(seq_lens=0), ValueError, r"seq_lens is a null pointer"),
    (dict(out=0), ValueError, r"out is a null pointer"),
    (dict(workspace_lse=0), ValueError, r"workspace_out and workspace_lse must be non-null .* num_splits=2 > 1"),
    (dict(num_q_heads=65536 * 8, num_kv_heads=65536), ValueError, r"num_kv_heads=65536 .* grid limit 65535"),
]


@pytest.mark.parametrize("overrides, error, message", DECODE_BAD)
def test_paged_decode_checks_arguments_before_the_device(overrides, error, message):
    _needs_cuda_build()
    args, _buf = _decode_args(**overrides)
    with pytest.raises(error, match=f"paged_decode_attention: {message}"):
        _ext().paged_decode_attention_cuda(**args)


def test_paged_decode_checks_alignment():
    _needs_cuda_build()
    args, buf = _decode_args()
    args["v_cache"] = buf.data_ptr() + 4
    with pytest.raises(ValueError, match="v_cache=0x[0-9a-f]+ is not 16-byte aligned"):
        _ext().paged_decode_attention_cuda(**args)


ROPE_BAD = [
    (dict(head_dim=63), ValueError, r"head_dim=63, expected an even value in 2\.\.256"),
    (dict(head_dim=258, q_token_stride=8 * 258, k_token_stride=8 * 258, v_token_stride=8 * 258), ValueError,
     r"head_dim=258"),
    (dict(num_tokens=-1), ValueError, r"num_tokens=-1, expected 0\.\."),
    (dict(num_q_heads=0), ValueError, r"num_q_heads=0, expected >= 1"),
    (dict(num_kv_heads=0), ValueError, r"num_kv_heads=0, expected >= 1"),
    (dict(num_q_heads=65535), ValueError, r"num_q_heads=65535 \+ 2 \* num_kv_heads=2, expected at most 65535"),
    (dict(q_token_stride=255), ValueError, r"q_token_stride=255, expected >= num_q_heads \* head_dim = 256"),
    (dict(k_token_stride=127), ValueError, r"k_token_stride=127, expected >= num_kv_heads \* head_dim = 128"),
    (dict(v_token_stride=0), ValueError, r"v_token_stride=0"),
    (dict(num_slots=-1), ValueError, r"num_slots=-1, expected >= 0"),
    (dict(dtype=3), TypeError, r"dtype code 3, expected float32, float16 or bfloat16"),
    (dict(q=0), ValueError, r"q is a null pointer"),
    (dict(slot_mapping=0), ValueError, r"slot_mapping is a null pointer"),
    (dict(inv_freq=0), ValueError, r"inv_freq is a null pointer"),
    (dict(v_cache=0), ValueError, r"v_cache is a null pointer"),
]


@pytest.mark.parametrize("overrides, error, message", ROPE_BAD)
def test_rope_kv_append_checks_arguments_before_the_device(overrides, error, message):
    _needs_cuda_build()
    args, _buf = _rope_args(**overrides)
    with pytest.raises(error, match=f"rope_kv_append: {message}"):
        _ext().rope_kv_append_cuda(**args)


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised on a machine without a GPU")
def test_valid_calls_without_gpu_raise_clear_error():
    _needs_cuda_build()
    ext = _ext()
    for overrides in (dict(), dict(num_splits=1, workspace_out=0, workspace_lse=0), dict(batch=0, q=0, out=0)):
        args, _buf = _decode_args(**overrides)
        with pytest.raises(RuntimeError, match="paged_decode_attention: no usable CUDA device"):
            ext.paged_decode_attention_cuda(**args)
    for overrides in (dict(), dict(num_tokens=0, q=0, k=0)):
        args, _buf = _rope_args(**overrides)
        with pytest.raises(RuntimeError, match="rope_kv_append: no usable CUDA device"):
            ext.rope_kv_append_cuda(**args)


# ---- GPU sanity checks against torch references ----


def _paged_case(lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0):
    """Random paged cache with the sequences' blocks scattered; every slot no sequence owns (the tails
    of last blocks, and a spare block that unused table entries name) holds NaN."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lens)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in lens]
    max_blocks = max(1, max(blocks_per_seq))
    num_blocks = sum(blocks_per_seq) + 1
    spare = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=g)
    stride = max_blocks + 3
    tables = torch.full((batch, stride), spare, dtype=torch.int64)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for b, n in enumerate(lens):
        nb = blocks_per_seq[b]
        tables[b, :nb] = perm[used:used + nb]
        used += nb
        t = torch.arange(n)
        blk, off = tables[b, t // block_size], t % block_size
        k_cache[blk, off] = torch.randn(n, num_kv_heads, head_dim, generator=g)
        v_cache[blk, off] = torch.randn(n, num_kv_heads, head_dim, generator=g)
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=g)
    dev = "cuda"
    return (q.to(dtype).to(dev), k_cache.to(dtype).to(dev), v_cache.to(dtype).to(dev), tables.to(dev),
            torch.tensor(lens, dtype=torch.int64, device=dev), max_blocks, stride)


def _decode_reference(q, k_cache, v_cache, tables, lens, scale):
    """float64 attention of each query over its sequence's cached tokens; also the per-token scores."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64, device=q.device)
    scores = []
    for b in range(batch):
        n = int(lens[b])
        t = torch.arange(n, device=q.device)
        blk = tables[b, t // block_size]
        keys = k_cache[blk, t % block_size].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        values = v_cache[blk, t % block_size].double().repeat_interleave(group, dim=1)
        s = scale * torch.einsum("hd,nhd->hn", q[b].double(), keys)
        scores.append(s)
        if n:
            out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), values)
    return out, scores


def _run_decode(q, k_cache, v_cache, tables, lens, max_blocks, stride, num_splits, threads, scale):
    batch, num_q_heads, head_dim = q.shape
    out = poison(torch.empty_like(q))
    ws_out = poison(torch.empty(batch, num_q_heads, num_splits, head_dim, device=q.device))
    ws_lse = poison(torch.empty(batch, num_q_heads, num_splits, device=q.device))
    _ext().paged_decode_attention_cuda(
        out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        ws_out.data_ptr(), ws_lse.data_ptr(), batch, num_q_heads, k_cache.shape[2], head_dim, k_cache.shape[1],
        max_blocks, stride, num_splits, scale, DTYPE_CODES[q.dtype], threads,
        torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out, ws_out, ws_lse


def _assert_rounded_once(out, expected):
    """A correct kernel is the float64 result up to float32 accumulation and one rounding to the
    output's dtype: per element |out - expected| <= 2 u |expected| (u its unit roundoff) plus
    2^-16 of the largest |expected| in that (sequence, head) row. Flat tolerances cannot do this:
    at 1,000 keys the outputs are ~0.1, and 3e-2 let a kernel lose 1/40 of the context."""
    unit = torch.finfo(out.dtype).eps / 2
    row_max = expected.abs().amax(dim=-1, keepdim=True)
    bound = 2 * unit * expected.abs() + 2**-16 * row_max
    excess = (out.double() - expected).abs() - bound
    assert bool((excess <= 0).all()), f"{int((excess > 0).sum())} elements past the bound, worst by {excess.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rounding_bound_fails_a_decode_that_loses_a_split(dtype):
    """The bound passes the exact result rounded once and fails one that lost a split of 40 (on the
    CPU, with the smallest of the GPU test's cases: 1,000 cached tokens in blocks of 8, 2 kv heads,
    one q head each, head_dim 64, where 3e-2 let such a kernel pass)."""
    g = torch.Generator().manual_seed(40)
    n, block_size, num_splits = 1000, 8, 40
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in ((1, 2, 64), (n, 2, 64), (n, 2, 64)))
    blocks = -(-n // block_size)
    per_split = -(-blocks // num_splits) * block_size  # tokens of a split, as the C ABI cuts them

    def attend(keep):
        weights = torch.softmax(64**-0.5 * torch.einsum("hd,nhd->hn", q[0].double(), k[keep].double()), dim=-1)
        return torch.einsum("hn,nhd->hd", weights, v[keep].double()).unsqueeze(0)

    everything = torch.ones(n, dtype=torch.bool)
    expected = attend(everything)
    _assert_rounded_once(expected.to(dtype), expected)
    lost = everything.clone()
    lost[7 * per_split:8 * per_split] = False
    with pytest.raises(AssertionError):
        _assert_rounded_once(attend(lost).to(dtype), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8, 16])
@pytest.mark.parametrize("block_size", [8, 16, 64])
def test_paged_decode_matches_reference(dtype, head_dim, group, block_size):
    lens = [1, 7, 129, 1000, 0, 16]
    num_kv_heads = 2
    q, kc, vc, tables, seq_lens, max_blocks, stride = _paged_case(lens, num_kv_heads, group, head_dim, block_size,
                                                                  dtype)
    scale = head_dim**-0.5
    expected, _ = _decode_reference(q, kc, vc, tables, seq_lens, scale)
    for num_splits, threads in ((1, 128), (3, 64), (8, 256), (40, 32)):
        out, _, _ = _run_decode(q, kc, vc, tables, seq_lens, max_blocks, stride, num_splits, threads, scale)
        _assert_rounded_once(out, expected)
        assert torch.all(out[4] == 0)  # empty sequence


@pytest.mark.gpu
def test_paged_decode_workspace_holds_split_lse():
    lens, block_size, num_splits = [100, 33], 16, 3
    q, kc, vc, tables, seq_lens, max_blocks, stride = _paged_case(lens, 2, 4, 128, block_size, torch.float32)
    scale = 0.1
    _, scores = _decode_reference(q, kc, vc, tables, seq_lens, scale)
    _, ws_out, ws_lse = _run_decode(q, kc, vc, tables, seq_lens, max_blocks, stride, num_splits, 128, scale)
    for b, n in enumerate(lens):
        blocks = (n + block_size - 1) // block_size
        per_split = (blocks + num_splits - 1) // num_splits
        for s in range(num_splits):
            begin, end = s * per_split * block_size, min((s + 1) * per_split * block_size, n)
            if begin >= end:
                assert torch.all(ws_lse[b, :, s] == -math.inf)
                assert torch.all(ws_out[b, :, s] == 0)
                continue
            expected = torch.logsumexp(scores[b][:, begin:end], dim=-1)
            torch.testing.assert_close(ws_lse[b, :, s].double(), expected, rtol=1e-5, atol=1e-5)


def _rope_reference(x, positions, inv_freq):
    """x [T, H, D] float32 -> rotate-half RoPE in float32, as the C ABI specifies."""
    half = x.shape[-1] // 2
    f = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    c, s = torch.cos(f)[:, None, :], torch.sin(f)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, pad", [(128, 0), (64, 0), (128, 1), (6, 0)])  # pad 1 / D=6: scalar path
def test_rope_kv_append_matches_reference(dtype, head_dim, pad):
    g = torch.Generator().manual_seed(1)
    tokens, hq, hkv, slots = 9, 8, 2, 40
    width = (hq + 2 * hkv) * head_dim + pad
    qkv = torch.randn(tokens, width, generator=g).to(dtype).cuda()
    q = qkv[:, :hq * head_dim]
    k = qkv[:, hq * head_dim:(hq + hkv) * head_dim]
    v = qkv[:, (hq + hkv) * head_dim:(hq + 2 * hkv) * head_dim]
    positions = torch.tensor([0, 1, 5, 17, 100, 4095, 16383, 70000, 3], dtype=torch.int64, device="cuda")
    # -1 is padding and 40 is past the cache: both skip their cache writes.
    slot_mapping = torch.tensor([3, 0, 39, 7, -1, 12, 25, 40, 1], dtype=torch.int64, device="cuda")
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2)))).cuda()
    k_cache = poison(torch.empty(slots, hkv, head_dim, dtype=dtype, device="cuda"))
    v_cache = poison(torch.empty_like(k_cache))
    q_before, k_before, v_before = (t.clone().view(tokens, -1, head_dim) for t in (q, k, v))
    tail_before = qkv[:, (hq + 2 * hkv) * head_dim:].clone()

    _ext().rope_kv_append_cuda(q.data_ptr(), k.data_ptr(), v.data_ptr(), positions.data_ptr(),
                               slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), inv_freq.data_ptr(),
                               tokens, hq, hkv, head_dim, qkv.stride(0), qkv.stride(0), qkv.stride(0), slots,
                               DTYPE_CODES[dtype], torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()

    q_expected = _rope_reference(q_before.float(), positions, inv_freq).to(dtype)
    k_expected = _rope_reference(k_before.float(), positions, inv_freq).to(dtype)
    # Same float32 formula and one rounding: equal up to a last-ulp difference in cos/sin.
    tol = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(q.view(tokens, hq, head_dim).float(), q_expected.float(), rtol=tol, atol=tol)
    # k is rotated in place too (the C ABI's contract: packed prefill attends to it where the
    # projection wrote it), padding and out-of-cache tokens included; the cache holds exactly it.
    k_rotated = k.view(tokens, hkv, head_dim)
    torch.testing.assert_close(k_rotated.float(), k_expected.float(), rtol=tol, atol=tol)
    keep = (slot_mapping >= 0) & (slot_mapping < slots)
    assert torch.equal(k_cache[slot_mapping[keep]], k_rotated[keep])
    assert torch.equal(v_cache[slot_mapping[keep]], v_before[keep])  # bit-exact copy
    assert torch.equal(v.view(tokens, hkv, head_dim), v_before)  # v is only read
    untouched = torch.ones(slots, dtype=torch.bool, device="cuda")
    untouched[slot_mapping[keep]] = False
    assert torch.isnan(k_cache[untouched].float()).all() and torch.isnan(v_cache[untouched].float()).all()
    assert torch.equal(qkv[:, (hq + 2 * hkv) * head_dim:], tail_before)  # columns past v are never written
