"""Attention kernels (Triton under the interpreter on CPU; Triton and CUDA on a GPU) against
float64 references, with FlashAttention's rule: the kernel's max error is at most twice that
of a same-precision torch computation, plus one rounding of the largest output (an atol that
scales with the output, so a long context's small outputs cannot hide a lost split).

Every test here runs on the GPU when one is present (marked gpu_path: scripts/gpu_check.sh
selects them), on the CPU otherwise; the gpu-marked ones need CUDA kernels."""

import math

import pytest
import torch

from anygpt_engine import tuning
from anygpt_engine.ops import attention as A
from conftest import HAS_GPU, poison

pytestmark = pytest.mark.gpu_path

# The rule's absolute slack, relative to the largest expected output: its unit roundoff twice for
# 16-bit outputs (one rounding of the largest value), float32's accumulation noise otherwise.
REL_ATOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
DEV = "cuda" if HAS_GPU else "cpu"


def _paged(seqs_k, seqs_v, block_size, num_blocks=None, seed=0):
    """Scatters per-sequence K/V [len, Hkv, D] into shuffled blocks; returns caches, block tables
    (unused entries point at random blocks: they must be masked) and lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [max(1, -(-k.shape[0] // block_size)) for k in seqs_k]
    total = num_blocks or sum(need) + 3
    order = torch.randperm(total, generator=g).tolist()
    heads, dim = seqs_k[0].shape[1:]
    dtype, device = seqs_k[0].dtype, seqs_k[0].device
    k_cache = torch.randn(total, block_size, heads, dim, generator=g).to(dtype).to(device)  # garbage elsewhere
    v_cache = torch.randn(total, block_size, heads, dim, generator=g).to(dtype).to(device)
    width = max(need) + 1
    tables = torch.tensor([[order[(i * 7 + j) % total] for j in range(width)] for i in range(len(seqs_k))])
    cursor = 0
    for i, (k, v) in enumerate(zip(seqs_k, seqs_v)):
        blocks = order[cursor:cursor + need[i]]
        cursor += need[i]
        tables[i, :need[i]] = torch.tensor(blocks)
        for t in range(k.shape[0]):
            k_cache[blocks[t // block_size], t % block_size] = k[t]
            v_cache[blocks[t // block_size], t % block_size] = v[t]
    lens = torch.tensor([k.shape[0] for k in seqs_k])
    return k_cache, v_cache, tables.to(device), lens.to(device)


def _attend64(q, k, v, causal):
    """float64 oracle for one sequence: q [Lq, Hq, D], k/v [Lk, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.double().transpose(0, 1) for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    scores = qd @ kd.transpose(1, 2) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(lk, device=q.device)[None, :] > pos, float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(0, 1)


def _same_precision(q, k, v, causal):
    """What a plain torch implementation in the input dtype gets (the FlashAttention rule's peer)."""
    group = q.shape[1] // k.shape[1]
    qt, kt, vt = (t.transpose(0, 1) for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    scores = (qt @ kt.transpose(1, 2)) * (1 / math.sqrt(q.shape[-1]))
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(lk, device=q.device)[None, :] > pos, float("-inf"))
    return (scores.float().softmax(-1).to(q.dtype) @ vt).transpose(0, 1)


def _check_rule(got, expected64, peer, dtype):
    err = (got.double() - expected64).abs().max().item()
    peer_err = (peer.double() - expected64).abs().max().item()
    atol = REL_ATOL[dtype] * expected64.abs().max().item()
    assert err <= 2 * peer_err + atol, (err, peer_err, atol)


def _rand(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEV)


CPU_DTYPES = [torch.float32, torch.float16]


# (q_len, kv_len): kv_len > q_len extends a cached prefix; (40, 200) has whole unmasked key
# blocks before its diagonal band, (129, 129) a full block then a band in its second tile.
SHORT_RUNS = [[(7, 7)], [(1, 1), (129, 129)], [(5, 40), (1, 17), (60, 60)], [(40, 200), (3, 3)]]
# One long run per dtype is enough under the interpreter.
PREFILL_CASES = [(heads, block, lens) for heads in [(4, 4), (8, 2), (8, 1)] for block in [16, 32]
                 for lens in SHORT_RUNS] + [((8, 2), 16, [(1000, 1000)])]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("heads,block_size,lens", PREFILL_CASES)
def test_varlen_paged_prefill(dtype, heads, block_size, lens):
    """Runs of q_len queries over kv_len keys (q_len < kv_len: a prompt extending a cached prefix)."""
    g = torch.Generator().manual_seed(len(lens) + heads[0] + block_size)
    hq, hkv = heads
    d = 64
    ks = [_rand((kv, hkv, d), dtype, g) for _, kv in lens]
    vs = [_rand((kv, hkv, d), dtype, g) for _, kv in lens]
    qs = [_rand((q, hq, d), dtype, g) for q, _ in lens]
    k_cache, v_cache, tables, kv_lens = _paged(ks, vs, block_size)
    q = torch.cat(qs)
    cu = torch.tensor([0] + list(torch.tensor([x for x, _ in lens]).cumsum(0)), device=DEV)
    out = poison(torch.empty_like(q))
    A.varlen_attention(q, k_cache, v_cache, cu, max(x for x, _ in lens), causal=True, kv_lens=kv_lens,
                       block_tables=tables, out=out, backend="triton")
    for i, (qi, ki, vi) in enumerate(zip(qs, ks, vs)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        _check_rule(out[rows], _attend64(qi, ki, vi, True), _same_precision(qi, ki, vi, True), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tma", [False, True])
def test_varlen_bidirectional_with_key_padding(dtype, head_dim, tma):
    """SoundStorm's case: packed contiguous K/V, no causal mask, each run sees only its own keys.
    K and V are views into one qkv tensor (strided tokens), read by TMA or by pointers."""
    g = torch.Generator().manual_seed(head_dim)
    lens = [1, 7, 129, 30]
    q = _rand((sum(lens), 4, head_dim), dtype, g)
    qkv = _rand((sum(lens), 3, 4, head_dim), dtype, g)
    k, v = qkv[:, 1], qkv[:, 2]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    out = poison(torch.empty_like(q))
    with tuning.override("attention", prefill_tma=tma):
        A.varlen_attention(q, k, v, cu, max(lens), causal=False, cu_seqlens_k=cu, out=out, backend="triton")
    for i in range(len(lens)):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        _check_rule(out[rows], _attend64(q[rows], k[rows], v[rows], False),
                    _same_precision(q[rows], k[rows], v[rows], False), dtype)


# TMA reads only 16-bit K/V (float32 takes pointers), hence float16 for the TMA cases.
PACKED_FACES = [("torch", False, torch.float32), ("triton", False, torch.float32), ("triton", True, torch.float16)]


@pytest.mark.parametrize("backend,tma,dtype", PACKED_FACES)
def test_varlen_causal_packed_runs_longer_or_shorter_than_their_keys(backend, tma, dtype):
    """Causal masking is bottom-right aligned for any pair of lengths: a run of 70 queries over
    200 keys sees a prefix plus its band (unmasked blocks first); 70 queries over 20 keys leave
    the first 50 with no key at all (zeros), and the rest see their band."""
    g = torch.Generator().manual_seed(9)
    q_lens, k_lens = [70, 70, 1], [200, 20, 1]
    q = _rand((sum(q_lens), 4, 64), dtype, g)
    k = _rand((sum(k_lens), 2, 64), dtype, g)
    v = _rand((sum(k_lens), 2, 64), dtype, g)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(k_lens).cumsum(0).tolist(), device=DEV)
    out = poison(torch.empty_like(q))
    with tuning.override("attention", prefill_tma=tma):
        A.varlen_attention(q, k, v, cu_q, max(q_lens), causal=True, cu_seqlens_k=cu_k, out=out, backend=backend)
    for i in range(len(q_lens)):
        rows, keys = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        expected = _attend64(q[rows], k[keys], v[keys], True).nan_to_num(0.0)  # rows with no key: 0
        _check_rule(out[rows], expected, _same_precision(q[rows], k[keys], v[keys], True).nan_to_num(0.0), dtype)
    assert bool((out[70:120] == 0).all()) and bool((out[:70] != 0).all())


@pytest.mark.parametrize("backend,tma,dtype", PACKED_FACES)
def test_varlen_packed_runs_without_any_key(backend, tma, dtype):
    q = _rand((5, 2, 64), dtype, torch.Generator().manual_seed(6))
    empty = torch.empty((0, 2, 64), dtype=dtype, device=DEV)
    cu_q, cu_k = torch.tensor([0, 2, 5], device=DEV), torch.tensor([0, 0, 0], device=DEV)
    with tuning.override("attention", prefill_tma=tma):
        for causal in (True, False):
            out = A.varlen_attention(q, empty, empty, cu_q, 3, causal=causal, cu_seqlens_k=cu_k, backend=backend)
            assert torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize("backend,tma,dtype", PACKED_FACES)
def test_varlen_padded_batch_key_padding(backend, tma, dtype):
    """A padded batch [B, N]: every frame attends to its own item's first lengths[b] frames;
    padding frames hold NaN (K and V), which must not reach any output."""
    g = torch.Generator().manual_seed(5)
    b, n, lengths = 3, 40, [40, 17, 1]
    q, k, v = (_rand((b * n, 2, 64), dtype, g) for _ in range(3))
    for i, length in enumerate(lengths):
        k[i * n + length:(i + 1) * n] = float("nan")
        v[i * n + length:(i + 1) * n] = float("nan")
    cu = torch.arange(0, (b + 1) * n, n, device=DEV)
    with tuning.override("attention", prefill_tma=tma):
        out = A.varlen_attention(q, k, v, cu, n, causal=False, cu_seqlens_k=cu,
                                 kv_lens=torch.tensor(lengths, device=DEV), backend=backend)
    for i, length in enumerate(lengths):
        rows = slice(i * n, (i + 1) * n)
        keys = slice(i * n, i * n + length)
        _check_rule(out[rows], _attend64(q[rows], k[keys], v[keys], False),
                    _same_precision(q[rows], k[keys], v[keys], False), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_varlen_reference_matches_oracle(dtype):
    g = torch.Generator().manual_seed(3)
    ks, vs = [_rand((33, 2, 64), dtype, g)], [_rand((33, 2, 64), dtype, g)]
    q = _rand((9, 4, 64), dtype, g)
    k_cache, v_cache, tables, kv_lens = _paged(ks, vs, 16)
    got = A.varlen_attention(q, k_cache, v_cache, torch.tensor([0, 9], device=DEV), 9, kv_lens=kv_lens,
                             block_tables=tables, backend="torch")
    _check_rule(got, _attend64(q, ks[0], vs[0], True), _same_precision(q, ks[0], vs[0], True), dtype)


DECODE_LENS = [[1], [7, 129, 1], [1000, 16, 33, 0]]


# The reference never splits.
@pytest.mark.parametrize("backend,num_splits", [("torch", 1), ("triton", 1), ("triton", 3)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("lens", DECODE_LENS)
def test_paged_decode(backend, num_splits, dtype, heads, block_size, lens):
    g = torch.Generator().manual_seed(sum(lens) + heads[1] + block_size)
    hq, hkv = heads
    d = 128 if hq == 4 else 64
    ks = [_rand((n, hkv, d), dtype, g) for n in lens]
    vs = [_rand((n, hkv, d), dtype, g) for n in lens]
    k_cache, v_cache, tables, seq_lens = _paged(ks, vs, block_size)
    q = _rand((len(lens), hq, d), dtype, g)
    out = poison(torch.empty_like(q))
    A.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, out=out, num_splits=num_splits, backend=backend)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i])), "an empty sequence attends to nothing"
            continue
        qi = q[i:i + 1]
        _check_rule(out[i:i + 1], _attend64(qi, ks[i], vs[i], False), _same_precision(qi, ks[i], vs[i], False), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("heads,head_dim", [((4, 4), 64), ((8, 2), 128), ((8, 1), 64)])
@pytest.mark.parametrize("tokens", [1, 7, 129])
def test_rope_kv_append(backend, dtype, heads, head_dim, tokens):
    g = torch.Generator().manual_seed(tokens + head_dim)
    hq, hkv = heads
    qkv = _rand((tokens, (hq + 2 * hkv) * head_dim), dtype, g)  # fused projection: strided views
    q = qkv[:, :hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim:(hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    v = qkv[:, (hq + hkv) * head_dim:].view(tokens, hkv, head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(DEV)
    num_blocks, block_size = 40, 16
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(DEV)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2))).to(DEV)
    k_cache = poison(torch.empty(num_blocks, block_size, hkv, head_dim, dtype=dtype, device=DEV))
    v_cache = poison(torch.empty_like(k_cache))
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
    A.rope_kv_append(q, k, v, positions, slots, k_cache, v_cache, inv_freq, backend=backend)

    # The contract: the angle is a float32 product; cos/sin of it are then computed accurately.
    angle = (positions.float()[:, None] * inv_freq[None, :]).double()
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rotate64(x):
        h = head_dim // 2
        x1, x2 = x[..., :h].double(), x[..., h:].double()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    # One rounding of a float32 result: about one ulp of the dtype, plus ~1e-6 absolute from
    # float32 cos/sin of large angles.
    tol = dict(rtol=torch.finfo(dtype).eps, atol=4e-6 if dtype == torch.float32 else torch.finfo(dtype).eps)
    torch.testing.assert_close(q.double(), rotate64(q_in), **tol)
    flat_k, flat_v = k_cache.view(-1, hkv, head_dim), v_cache.view(-1, hkv, head_dim)
    torch.testing.assert_close(k.double(), rotate64(k_in), **tol)
    assert torch.equal(flat_k[slots], k), "the cache holds the in-place rotated k, bit for bit"
    assert torch.equal(flat_v[slots], v_in)
    assert torch.equal(v, v_in), "v must stay untouched"
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all(), "wrote outside its slots"


def test_rope_faces_agree_and_skip_slots_outside_the_cache():
    g = torch.Generator().manual_seed(0)
    q = _rand((5, 4, 64), torch.float32, g)
    k, v = _rand((5, 2, 64), torch.float32, g), _rand((5, 2, 64), torch.float32, g)
    positions = torch.tensor([0, 1, 2, 700, 3], device=DEV)
    slots = torch.tensor([3, -1, 17, 0, 32], device=DEV)  # -1 padding, 32 past the 2 x 16 slots
    inv_freq = (1.0 / 10000 ** (torch.arange(32, dtype=torch.float32) / 32)).to(DEV)
    results = []
    for backend in ("torch", "triton"):
        kc = poison(torch.empty(2, 16, 2, 64, device=DEV))
        vc = poison(torch.empty_like(kc))
        qq, kk = q.clone(), k.clone()
        A.rope_kv_append(qq, kk, v, positions, slots, kc, vc, inv_freq, backend=backend)
        results.append((qq, kc, vc, kk))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    # every token's k is rotated in place, padding and out-of-cache slots included
    torch.testing.assert_close(results[0][3], results[1][3], rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[1][3][[1, 4]], k[[1, 4]])
    for (_, kc, vc, _) in results:
        assert kc.view(-1, 2, 64).isnan().all(-1).all(-1).sum() == 32 - 3  # only slots 0, 3, 17 written
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_decode_face_order_follows_measured_rules():
    params = {"decode_faces": ["cuda", "triton"], "decode_rules": [[4, 2048, "triton"], [64, 16384, "cuda"]]}
    assert A.decode_face_order(1, 512, params) == ("triton", "cuda")
    assert A.decode_face_order(4, 4096, params) == ("cuda", "triton")
    assert A.decode_face_order(128, 512, params) == ("cuda", "triton")  # no rule: the default order
    assert A.decode_face_order(1, 512, {"decode_faces": ["triton"]}) == ("triton",)


def test_attention_argument_errors():
    q = torch.randn(3, 4, 64)
    kc = torch.randn(4, 16, 2, 64)
    tables = torch.zeros(3, 2, dtype=torch.int64)
    lens = torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="seq_lens.dtype=torch.int32"):
        A.paged_decode_attention(q, kc, kc, tables, lens.int())
    with pytest.raises(ValueError, match="not a multiple of the 3 kv heads"):
        A.paged_decode_attention(q, torch.randn(4, 16, 3, 64), torch.randn(4, 16, 3, 64), tables, lens)
    with pytest.raises(TypeError, match="k_cache.dtype=torch.float16"):
        A.paged_decode_attention(q, kc.half(), kc.half(), tables, lens)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        A.paged_decode_attention(q, kc.transpose(0, 1), kc.transpose(0, 1), tables, lens)
    with pytest.raises(ValueError, match=r"block_tables.shape=\(2, 2\)"):
        A.paged_decode_attention(q, kc, kc, tables[:2], lens)
    with pytest.raises(ValueError, match="num_splits=0"):
        A.paged_decode_attention(q, kc, kc, tables, lens, num_splits=0, backend="triton")
    with pytest.raises(ValueError, match="either block_tables with kv_lens"):
        A.varlen_attention(q, kc, kc, torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="head_dim=63"):
        A.rope_kv_append(torch.randn(2, 2, 63), torch.randn(2, 2, 63), torch.randn(2, 2, 63), torch.zeros(2).long(),
                         torch.zeros(2).long(), torch.randn(2, 16, 2, 63), torch.randn(2, 16, 2, 63), torch.ones(31))
    with pytest.raises(ValueError, match="positions.shape=\\(3,\\), expected \\(2,\\)"):
        A.rope_kv_append(torch.randn(2, 2, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64), torch.zeros(3).long(),
                         torch.zeros(2).long(), torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64), torch.ones(32))


def test_rule_fails_a_decode_that_loses_one_split_of_32():
    """At 16,384 keys bfloat16 outputs are a few hundredths at most, so a flat atol of 1e-2 passed a
    kernel that dropped one of 32 splits (512 keys): here error 0.0080 against 0.0104 allowed.
    With the slack scaled to the output (0.0007 allowed) the rule fails that kernel, and still
    passes one that rounds the exact result once (the most a correct bfloat16 kernel may be off)."""
    g = torch.Generator().manual_seed(32)
    n, splits = 16384, 32
    q, k, v = (torch.randn(shape, generator=g).to(torch.bfloat16) for shape in ((1, 4, 128), (n, 4, 128), (n, 4, 128)))
    expected = _attend64(q, k, v, False)
    peer = _same_precision(q, k, v, False)
    _check_rule(expected.to(torch.bfloat16), expected, peer, torch.bfloat16)
    kept = torch.ones(n, dtype=torch.bool)
    kept[17 * n // splits:18 * n // splits] = False
    lost_split = _attend64(q, k[kept], v[kept], False).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        _check_rule(lost_split, expected, peer, torch.bfloat16)


# -- argument checks: each names the argument, its value and what was expected ----------------------
def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _decode(q=None, k_cache=None, v_cache=None, lens=None, **kw):
    q = _q(3, 4, 64) if q is None else q
    k_cache = _q(4, 16, 2, 64) if k_cache is None else k_cache
    return A.paged_decode_attention(q, k_cache, k_cache if v_cache is None else v_cache,
                                    torch.zeros(3, 2, dtype=torch.int64),
                                    torch.tensor([1, 2, 3]) if lens is None else lens, **kw)


def _rope(k=None, v=None, inv_freq=None):
    k = _q(2, 2, 64) if k is None else k
    return A.rope_kv_append(_q(2, 4, 64), k, k.clone() if v is None else v, torch.zeros(2, dtype=torch.int64),
                            torch.zeros(2, dtype=torch.int64), _q(2, 16, 2, 64), _q(2, 16, 2, 64),
                            torch.ones(32) if inv_freq is None else inv_freq)


def _packed(k=None, v=None, cu=None, **kw):
    k = _q(3, 2, 64) if k is None else k
    return A.varlen_attention(_q(3, 4, 64), k, k.clone() if v is None else v,
                              torch.tensor([0, 3]) if cu is None else cu, 3,
                              cu_seqlens_k=torch.tensor([0, k.shape[0]]), **kw)


def _paged_prefill(k=None, **kw):
    k = _q(4, 16, 2, 64) if k is None else k
    return A.varlen_attention(_q(3, 4, 64), k, k.clone(), torch.tensor([0, 3]), 3, **kw)


ARGUMENT_ERRORS = [
    (lambda: _decode(q=torch.randn(3, 64, 4).transpose(1, 2)), ValueError,
     r"q strides \(256, 1, 4\) must be contiguous within each token"),
    (lambda: _decode(k_cache=_q(4, 16, 128)), ValueError, r"k_cache.shape=\(4, 16, 128\), expected 4 dimensions"),
    (lambda: _decode(k_cache=_q(4, 16, 2, 32)), ValueError,
     r"k_cache.shape=\(4, 16, 2, 32\), expected \[blocks, block_size, 2, 64\]"),
    (lambda: _decode(v_cache=_q(5, 16, 2, 64)), ValueError,
     r"v_cache.shape=\(5, 16, 2, 64\), expected \(4, 16, 2, 64\) like k_cache"),
    (lambda: _decode(q=_q(3, 4, 258), k_cache=_q(4, 16, 2, 258)), ValueError,
     r"head_dim=258, expected a power of two in 2\.\.256"),
    # The Triton kernels tile a head, its halves and a cache block whole: powers of two only
    # (a ValueError here, not a compile error on the GPU).
    (lambda: _decode(q=_q(3, 4, 96), k_cache=_q(4, 16, 2, 96)), ValueError, "head_dim=96, expected a power of two"),
    (lambda: _decode(k_cache=_q(4, 12, 2, 64)), ValueError,
     r"k_cache.shape=\(4, 12, 2, 64\): block_size=12, expected a power of two"),
    (lambda: A.rope_kv_append(_q(2, 4, 80), _q(2, 2, 80), _q(2, 2, 80), torch.zeros(2, dtype=torch.int64),
                              torch.zeros(2, dtype=torch.int64), _q(2, 16, 2, 80), _q(2, 16, 2, 80), torch.ones(40)),
     ValueError, "head_dim=80, expected a power of two"),
    (lambda: A.rope_kv_append(_q(2, 4, 64), _q(2, 2, 64), _q(2, 2, 64), torch.zeros(2, dtype=torch.int64),
                              torch.zeros(2, dtype=torch.int64), _q(2, 24, 2, 64), _q(2, 24, 2, 64), torch.ones(32)),
     ValueError, "block_size=24, expected a power of two"),
    (lambda: A.varlen_attention(_q(3, 4, 96), _q(3, 2, 96), _q(3, 2, 96), torch.tensor([0, 3]), 3,
                                cu_seqlens_k=torch.tensor([0, 3])), ValueError, "head_dim=96, expected a power of two"),
    (lambda: A.varlen_attention(_q(3, 4, 80), _q(4, 16, 2, 80), _q(4, 16, 2, 80), torch.tensor([0, 3]), 3,
                                kv_lens=torch.tensor([3]), block_tables=torch.zeros(1, 2, dtype=torch.int64)),
     ValueError, "head_dim=80, expected a power of two"),
    (lambda: _paged_prefill(k=_q(4, 48, 2, 64), kv_lens=torch.tensor([3]), block_tables=torch.zeros(1, 2).long()),
     ValueError, "block_size=48, expected a power of two"),
    (lambda: _decode(lens=torch.arange(6)[::2]), ValueError, "seq_lens must be contiguous, got stride 2"),
    (lambda: _decode(out=torch.empty(3, 4, 64, dtype=torch.float16)), ValueError,
     r"out must be a contiguous \(3, 4, 64\) torch.float32 tensor on cpu"),
    (lambda: _rope(k=_q(3, 2, 64)), ValueError, r"k.shape=\(3, 2, 64\), expected \[2, kv_heads, 64\]"),
    (lambda: _rope(v=_q(2, 1, 64)), ValueError, r"v.shape=\(2, 1, 64\), expected \(2, 2, 64\) like k"),
    (lambda: _rope(k=_q(2, 2, 64, dtype=torch.float16)), TypeError,
     r"k.dtype=torch.float16, expected one of \['torch.float32'\]"),
    (lambda: _rope(k=torch.empty(2, 2, 64, device="meta")), ValueError, "k is on meta, expected cpu"),
    (lambda: _rope(inv_freq=torch.ones(16)), ValueError, r"inv_freq.shape=\(16,\), expected contiguous \(32,\)"),
    (lambda: _packed(cu=torch.zeros(0, dtype=torch.int64)), ValueError, "cu_seqlens_q is empty"),
    (lambda: _packed(k=_q(3, 2, 32)), ValueError, r"k.shape=\(3, 2, 32\), expected head_dim 64"),
    (lambda: _packed(v=_q(4, 2, 64)), ValueError, r"v.shape=\(4, 2, 64\), expected \(3, 2, 64\) like k"),
    (lambda: _packed(out=torch.empty(3, 4, 64)[:, :2]), ValueError, r"out must be a contiguous \(3, 4, 64\)"),
    (lambda: _paged_prefill(block_tables=torch.zeros(1, 2, dtype=torch.int64)), ValueError,
     "kv_lens is required with block_tables"),
    (lambda: _paged_prefill(block_tables=torch.zeros(2, 2, dtype=torch.int64), kv_lens=torch.tensor([3])),
     ValueError, r"block_tables.shape=\(2, 2\), expected \[1, blocks\] with contiguous rows"),
]


@pytest.mark.parametrize("call,error,message", ARGUMENT_ERRORS)
def test_attention_argument_checks(call, error, message):
    with pytest.raises(error, match=message):
        call()


# -- paged decode: seq_lens clamped to the table; CUDA only for its instantiated shapes -------------
def _tables_before_nan(g, batch, width, page):
    """Random caches [batch * width + 1, page, 2, 64] whose last block is NaN, and block tables
    [batch, width] (a permutation of the other blocks) sliced from wider rows that go on naming
    the NaN block: a kernel reading past a row's width shows as NaN."""
    nan_block = batch * width
    k_cache = torch.randn(nan_block + 1, page, 2, 64, generator=g)
    v_cache = torch.randn(nan_block + 1, page, 2, 64, generator=g)
    k_cache[nan_block] = float("nan")
    v_cache[nan_block] = float("nan")
    wide = torch.full((batch, width + 5), nan_block, dtype=torch.int64)
    wide[:, :width] = torch.randperm(nan_block, generator=g).view(batch, width)
    return k_cache.to(DEV), v_cache.to(DEV), wide.to(DEV)[:, :width]


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_clamps_seq_lens_to_the_block_table(backend):
    """seq_lens stays on the device unchecked (checking would sync); every face clamps it to the
    table's width, so an over-long length attends to the row's whole table and reads nothing past
    it. The table is a column slice of a wider one whose further entries name a block of NaN."""
    g = torch.Generator().manual_seed(5)
    batch, width, page = 3, 3, 16
    k_cache, v_cache, tables = _tables_before_nan(g, batch, width, page)
    seq_lens = torch.tensor([width * page + 1, 10**6, 2**62], device=DEV)
    q = _rand((batch, 8, 64), torch.float32, g)
    for num_splits in ((None, 2) if backend != "torch" else (None,)):
        out = poison(torch.empty_like(q))
        A.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, out=out, num_splits=num_splits,
                                 backend=backend)
        for b in range(batch):
            keys = k_cache[tables[b]].flatten(0, 1)  # the row's whole table: width * page tokens
            values = v_cache[tables[b]].flatten(0, 1)
            _check_rule(out[b:b + 1], _attend64(q[b:b + 1], keys, values, False),
                        _same_precision(q[b:b + 1], keys, values, False), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_paged_prefill_clamps_kv_lens_to_the_block_table(backend, causal):
    """As decode: paged prefill clamps kv_lens to the table's width * block_size, on the device,
    in every face; an over-long length attends (bottom-right aligned) to the row's whole table and
    reads nothing past it. The table is a column slice of a wider one whose further entries name a
    block of NaN; rows of the next sequence's table would be read as block ids without the clamp."""
    g = torch.Generator().manual_seed(7)
    width, page, q_lens = 3, 16, [3, 1, 5]
    batch = len(q_lens)
    k_cache, v_cache, tables = _tables_before_nan(g, batch, width, page)
    kv_lens = torch.tensor([width * page + 1, 10**6, 2**62], device=DEV)
    q = _rand((sum(q_lens), 4, 64), torch.float32, g)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=DEV)
    out = poison(torch.empty_like(q))
    A.varlen_attention(q, k_cache, v_cache, cu, max(q_lens), causal=causal, kv_lens=kv_lens, block_tables=tables,
                       out=out, backend=backend)
    for b in range(batch):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        keys = k_cache[tables[b]].flatten(0, 1)  # the row's whole table: width * page tokens
        values = v_cache[tables[b]].flatten(0, 1)
        _check_rule(out[rows], _attend64(q[rows], keys, values, causal),
                    _same_precision(q[rows], keys, values, causal), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("width", [0, 2])
def test_paged_decode_of_an_empty_batch_is_a_no_op(backend, width):
    """No sequences (a step whose requests all finished): every face returns the empty out, also
    with a zero-width table, which the CUDA entry rejects for a non-empty batch."""
    k_cache = _rand((3, 16, 2, 64), torch.float32, torch.Generator().manual_seed(8))
    q = torch.empty((0, 4, 64), device=DEV)
    tables = torch.empty((0, width), dtype=torch.int64, device=DEV)
    out = A.paged_decode_attention(q, k_cache, k_cache, tables, torch.empty(0, dtype=torch.int64, device=DEV),
                                   backend=backend)
    assert out.shape == (0, 4, 64)


@pytest.mark.parametrize("head_dim,block_size,cuda_ok", [(32, 16, False), (64, 128, False), (64, 16, True),
                                                         (128, 64, True)])
def test_decode_takes_cuda_only_for_its_instantiated_shapes(monkeypatch, head_dim, block_size, cuda_ok):
    """The CUDA decode kernel exists for head_dim 64 or 128 and blocks of 8 to 64: on a GPU other
    shapes (the tiny preset's head_dim 32, blocks of 128) fall back to Triton. The faces offered
    to the dispatcher are recorded (on the CPU it then takes the reference); on a GPU the chosen
    face runs and is checked against the oracle."""
    offered = []
    choose = A._backend.choose

    def recording(op, device, requested, preferred, supported):
        face = choose(op, device, requested, preferred, supported)
        offered.append((op, preferred, face))
        return face

    monkeypatch.setattr(A._backend, "choose", recording)
    g = torch.Generator().manual_seed(head_dim + block_size)
    ks, vs = [_rand((150, 2, head_dim), torch.float16, g)], [_rand((150, 2, head_dim), torch.float16, g)]
    k_cache, v_cache, tables, seq_lens = _paged(ks, vs, block_size)
    q = _rand((1, 4, head_dim), torch.float16, g)
    with tuning.override("attention", decode_faces=["cuda", "triton"]):
        out = A.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens)
    [(op, preferred, face)] = offered
    assert op == "paged_decode_attention"
    # A measured rule (decode_rules) may order the two faces either way; CUDA is offered or not.
    assert sorted(preferred) == (["cuda", "triton"] if cuda_ok else ["triton"])
    if DEV == "cuda":
        assert face == preferred[0]
    _check_rule(out, _attend64(q, ks[0], vs[0], False), _same_precision(q, ks[0], vs[0], False), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(32, 32), (32, 8), (32, 4)])
@pytest.mark.parametrize("lens", [[1, 7, 129, 1000, 4097], [16384] * 2, [513] * 64])
def test_decode_faces_agree_on_gpu(dtype, heads, lens):
    g = torch.Generator().manual_seed(len(lens))
    hq, hkv = heads
    ks = [_rand((n, hkv, 128), dtype, g) for n in lens]
    vs = [_rand((n, hkv, 128), dtype, g) for n in lens]
    k_cache, v_cache, tables, seq_lens = _paged(ks, vs, 16)
    q = _rand((len(lens), hq, 128), dtype, g)
    outs = {b: A.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, backend=b) for b in ("cuda", "triton")}
    for i, n in enumerate(lens[:8]):
        expected = _attend64(q[i:i + 1], ks[i], vs[i], False)
        peer = _same_precision(q[i:i + 1], ks[i], vs[i], False)
        for out in outs.values():
            _check_rule(out[i:i + 1], expected, peer, dtype)
    torch.testing.assert_close(outs["cuda"], outs["triton"], rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_and_rope_on_gpu(dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    lens = [(1, 1), (7, 300), (1000, 1000), (129, 2000)]
    ks = [_rand((kv, 8, head_dim), dtype, g) for _, kv in lens]
    vs = [_rand((kv, 8, head_dim), dtype, g) for _, kv in lens]
    qs = [_rand((q, 32, head_dim), dtype, g) for q, _ in lens]
    k_cache, v_cache, tables, kv_lens = _paged(ks, vs, 16)
    cu = torch.tensor([0] + torch.tensor([x for x, _ in lens]).cumsum(0).tolist(), device=DEV)
    out = A.varlen_attention(torch.cat(qs), k_cache, v_cache, cu, 1000, kv_lens=kv_lens, block_tables=tables)
    for i, (qi, ki, vi) in enumerate(zip(qs, ks, vs)):
        _check_rule(out[int(cu[i]):int(cu[i + 1])], _attend64(qi, ki, vi, True), _same_precision(qi, ki, vi, True),
                    dtype)
    q = _rand((64, 32, head_dim), dtype, g)
    k, v = _rand((64, 8, head_dim), dtype, g), _rand((64, 8, head_dim), dtype, g)
    positions = torch.randint(0, 8192, (64,), generator=g).to(DEV)
    slots = torch.randperm(4096, generator=g)[:64].to(DEV)
    inv_freq = (1.0 / 10000 ** (torch.arange(head_dim // 2, dtype=torch.float32) / (head_dim // 2))).to(DEV)
    results = []
    for backend in ("torch", "triton", "cuda"):
        qq, kk, kc = q.clone(), k.clone(), torch.zeros(256, 16, 8, head_dim, dtype=dtype, device=DEV)
        vc = torch.zeros_like(kc)
        A.rope_kv_append(qq, kk, v, positions, slots, kc, vc, inv_freq, backend=backend)
        results.append((qq, kc, vc, kk))
    for qq, kc, vc, kk in results[1:]:
        torch.testing.assert_close(qq, results[0][0], rtol=torch.finfo(dtype).eps * 2, atol=1e-3)
        torch.testing.assert_close(kc, results[0][1], rtol=torch.finfo(dtype).eps * 2, atol=1e-3)
        torch.testing.assert_close(kk, results[0][3], rtol=torch.finfo(dtype).eps * 2, atol=1e-3)
        assert torch.equal(kc.view(-1, 8, head_dim)[slots], kk)
        assert torch.equal(vc, results[0][2])
