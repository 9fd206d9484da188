"""RVQ encode/decode: the torch reference against the contract's literal evaluation and against
the float32 expanded form speechtokenizer/encodec use; every face against the reference
(codes, quantized sum and residual bit for bit) on the three codec shapes, odd shapes, strided
and low-precision inputs and adversarial near-ties; decode; argument errors; the C ABI.
Other test_rvq_*.py files import the oracles defined here."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from anygpt_engine import ops, tuning
from anygpt_engine.ops import rvq
from anygpt_engine.ops._extension import extension
from conftest import HAS_GPU, poison

# (levels, codebook size, dim) of the three codecs AnyGPT uses.
SHAPES = {"speechtokenizer": (8, 1024, 1024), "encodec": (4, 2048, 128), "seed": (1, 8192, 32)}


def make_codebooks(levels, size, dim, seed=0):
    """Kaiming-uniform codebooks, as speechtokenizer/encodec initialise them with kmeans_init=False."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(levels, size, dim, generator=g) * 2 - 1) * math.sqrt(6.0 / dim)


def random_frames(n, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * math.sqrt(2.0 / dim)


def near_codeword_frames(codebooks, n, noise=0.05, seed=2):
    """Frames a small step from level-0 codewords, like a trained encoder's outputs."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, codebooks.shape[1], (n,), generator=g)
    scale = math.sqrt(6.0 / codebooks.shape[2])
    return codebooks[0][idx] + noise * scale * torch.randn(n, codebooks.shape[2], generator=g)


def brute_force_codes(x, codebooks):
    """The contract evaluated literally: exact score of every codeword, ties to the lowest index."""
    r = x.float().clone()
    codes = []
    for embed in codebooks.float():
        n, k = r.shape[0], embed.shape[0]
        rows = torch.arange(n).repeat_interleave(k)
        js = torch.arange(k).repeat(n)
        step = max(1, (1 << 22) // r.shape[1])
        scores = torch.cat([rvq.exact_scores(r[rows[i:i + step]], embed[js[i:i + step]])
                            for i in range(0, n * k, step)])
        best = rvq._pick(rows, js, scores, n, k)
        codes.append(best)
        r = r - embed[best]
    return torch.stack(codes)


def expanded_fp32_codes(x, codebooks):
    """speechtokenizer's / encodec's quantize(): float32 ||r||^2 - 2 r.E + ||E||^2, argmax of its negation."""
    r = x.float().clone()
    codes = []
    for embed in codebooks.float():
        dist = -(r.pow(2).sum(1, keepdim=True) - 2 * r @ embed.t() + embed.t().pow(2).sum(0, keepdim=True))
        best = dist.max(dim=-1).indices
        codes.append(best)
        r = r - embed[best]
    return torch.stack(codes)


def assert_same_or_certified_near_tie(codes, other, x, codebooks, max_fraction=0.005):
    """`other` (a float32 expanded-form implementation) may differ from the exact rule only where
    float32 cannot tell the two codewords apart: at the first differing level the exact scores of
    both picks must differ by less than the expanded form's own error bound (D+2) 2^-24 (R+Emax)^2
    for each of the two distances. Such rows must also be rare."""
    codes, other = codes.reshape(codes.shape[0], -1), other.reshape(other.shape[0], -1)
    x = x.reshape(-1, codebooks.shape[2]).float()
    differing = (codes != other).any(0).nonzero()[:, 0].tolist()
    assert len(differing) <= max_fraction * codes.shape[1], f"{len(differing)} rows differ"
    dim = codebooks.shape[2]
    for n in differing:
        level = int((codes[:, n] != other[:, n]).nonzero()[0, 0])
        r = x[n:n + 1].clone()
        for k in range(level):
            r = r - codebooks[k][codes[k, n]]
        ours, theirs = codebooks[level][codes[level, n]][None], codebooks[level][other[level, n]][None]
        s_ours, s_theirs = rvq.exact_scores(r, ours).item(), rvq.exact_scores(r, theirs).item()
        assert s_ours <= s_theirs, (n, level)
        emax = codebooks[level].norm(dim=1).max().item()
        bound = 2 * (dim + 2) * 2.0**-24 * (r.norm().item() + emax) ** 2
        assert s_theirs - s_ours <= bound, (n, level, s_theirs - s_ours, bound)


def bits(t):
    """Bit pattern of a float32 tensor: equality that tells -0.0 from 0.0 and compares NaNs."""
    return t.contiguous().view(torch.int32)


def triton_encode(x, cb, precision, **kw):
    return ops.rvq_encode(x, cb, backend="triton", precision=precision, return_quantized=True,
                          return_residual=True, **kw)


def assert_same_encoding(got, expected):
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(bits(got.quantized), bits(expected.quantized))
    assert torch.equal(bits(got.residual), bits(expected.residual))


# ---- the reference is the contract ---------------------------------------------------------
@pytest.mark.parametrize("precision", rvq.PRECISIONS)
def test_reference_equals_literal_contract(precision):
    cb = make_codebooks(3, 128, 70, seed=3)
    x = torch.cat([random_frames(150, 70), near_codeword_frames(cb, 150)])
    ref = ops.rvq_encode_reference(x, cb, precision=precision)
    assert torch.equal(ref.codes, brute_force_codes(x, cb))
    # quantized is the level-order sum from 0.0, residual the level-by-level float32 chain
    expected_q = torch.zeros_like(x)
    r = x.clone()
    for level in range(3):
        expected_q = expected_q + cb[level][ref.codes[level]]
        r = r - cb[level][ref.codes[level]]
    assert torch.equal(bits(ref.quantized), bits(expected_q))
    assert torch.equal(bits(ref.residual), bits(r))


@pytest.mark.parametrize("name", SHAPES)
def test_reference_matches_float32_expanded_form(name):
    levels, size, dim = SHAPES[name]
    cb = make_codebooks(levels, size, dim, seed=4)
    for x in (random_frames(1000, dim, seed=5), near_codeword_frames(cb, 1000, seed=6)):
        codes = ops.rvq_encode(x, cb)
        assert_same_or_certified_near_tie(codes, expanded_fp32_codes(x, cb), x, cb)


def test_known_float32_near_tie_is_resolved_by_the_exact_score():
    # Found by search: at level 2 of row 39 the two best codewords are 1e-8 apart (relative),
    # far below float32's resolution; the expanded form and the exact rule disagree there.
    g = torch.Generator().manual_seed(2)
    dim = 1024
    cb = (torch.rand(8, 1024, dim, generator=g) * 2 - 1) * math.sqrt(6.0 / dim)
    torch.randn(2000, dim, generator=g)  # keeps the generator where the search left it
    idx = torch.randint(0, 1024, (2000,), generator=g)
    x = (cb[0][idx] + 0.05 * math.sqrt(6.0 / dim) * torch.randn(2000, dim, generator=g))[39:40]
    ours, theirs = ops.rvq_encode(x, cb), expanded_fp32_codes(x, cb)
    assert not torch.equal(ours, theirs)
    assert torch.equal(ours, brute_force_codes(x, cb))
    assert_same_or_certified_near_tie(ours, theirs, x, cb, max_fraction=1.0)


# ---- Triton (interpreter on CPU) against the reference -------------------------------------
TRITON_CASES = [
    ("speechtokenizer", 7, "fp32"), ("speechtokenizer", 7, "bf16"), ("speechtokenizer", 33, "tf32"),
    ("encodec", 129, "fp32"), ("encodec", 129, "bf16"), ("seed", 65, "fp32"), ("seed", 65, "bf16"),
]


@pytest.mark.parametrize("name,n,precision", TRITON_CASES)
def test_triton_matches_reference_on_codec_shapes(name, n, precision):
    levels, size, dim = SHAPES[name]
    cb = ops.RVQCodebooks(make_codebooks(levels, size, dim, seed=7))
    x = torch.cat([random_frames(n - n // 2, dim, seed=8), near_codeword_frames(cb.embed, n // 2, seed=9)])
    expected = ops.rvq_encode_reference(x, cb)
    assert_same_encoding(triton_encode(x, cb, precision), expected)


@pytest.mark.parametrize("n", [1, 7, 129, 1000])
def test_triton_matches_reference_on_odd_shapes(n):
    cb = make_codebooks(3, 77, 45, seed=10)
    x = random_frames(n, 45, seed=n)
    expected = ops.rvq_encode_reference(x, cb)
    assert torch.equal(expected.codes, brute_force_codes(x, cb))
    assert_same_encoding(triton_encode(x, cb, "tf32"), expected)


def test_triton_kernel_writes_every_output():
    from anygpt_engine.kernels import rvq as triton_rvq

    cb = ops.RVQCodebooks(make_codebooks(2, 100, 40, seed=11))
    x = random_frames(37, 40)
    expected = ops.rvq_encode_reference(x, cb)
    codes, residual = poison(torch.empty(2, 37, dtype=torch.int64)), poison(torch.empty(37, 40))
    quantized = torch.zeros(37, 40)  # the kernel adds into it, as the reference adds to 0.0
    low, demax = cb.low_precision("fp32")
    triton_rvq.rvq_encode(codes, residual, quantized, x, cb.embed, low, cb.norms, cb.emax, demax, precision="fp32",
                          dot_in_fp32=True, block_m=16, block_n=64, block_k=32, candidates=4, num_warps=4,
                          num_stages=2, tma=False)
    assert_same_encoding(ops.RVQEncoding(codes, quantized, residual), expected)


@pytest.mark.parametrize("face", ["torch", "triton"])
def test_batched_strided_and_low_precision_inputs(face):
    cb = make_codebooks(3, 90, 48, seed=12)
    # speechtokenizer's layout is [B, D, T]: its transpose is a non-contiguous [B, T, D]
    x_bdt = random_frames(2 * 48 * 11, 1, seed=13).view(2, 48, 11)
    x = x_bdt.transpose(1, 2)
    codes = ops.rvq_encode(x, cb, backend=face)
    assert codes.shape == (3, 2, 11)
    flat = x.reshape(-1, 48)
    assert torch.equal(codes.reshape(3, -1), ops.rvq_encode_reference(flat, cb).codes)
    wide = random_frames(20, 100, seed=14)
    strided = wide[:, 30:78]  # rows 100 apart
    expected = ops.rvq_encode_reference(strided.contiguous(), cb).codes
    assert torch.equal(ops.rvq_encode(strided, cb, backend=face), expected)
    for dtype in (torch.float16, torch.bfloat16):
        low = flat.to(dtype)
        got = ops.rvq_encode(low, cb, backend=face, return_residual=True)
        expected = ops.rvq_encode_reference(low.float(), cb)
        assert torch.equal(got.codes.reshape(3, -1), expected.codes)
        assert torch.equal(bits(got.residual.reshape(-1, 48)), bits(expected.residual))


@pytest.mark.parametrize("precision", rvq.PRECISIONS)
def test_triton_codeword_tiles_through_tma_give_the_same_encoding(precision):
    """K = 70 is not a multiple of the codeword tile: a tile's rows run into the next level's
    codewords (masked) or past the last level (zero-filled by the descriptor)."""
    cb = ops.RVQCodebooks(make_codebooks(3, 70, 40, seed=40))
    x = torch.cat([random_frames(50, 40, seed=41), near_codeword_frames(cb.embed, 30, seed=42)])
    expected = ops.rvq_encode_reference(x, cb)
    with tuning.override("rvq", triton_tma=True, triton_block_n=32, triton_fp32_block_n=32, triton_block_k=16):
        got = ops.rvq_encode(x, cb, backend="triton", precision=precision, return_quantized=True,
                             return_residual=True)
        # A row pitch TMA cannot use (45 floats = 180 bytes) falls back to pointer loads.
        odd = ops.RVQCodebooks(make_codebooks(2, 30, 45, seed=43))
        x_odd = random_frames(9, 45, seed=44)
        assert torch.equal(ops.rvq_encode(x_odd, odd, backend="triton", precision=precision),
                           ops.rvq_encode_reference(x_odd, odd).codes)
    assert_same_encoding(got, expected)


# ---- adversarial near-ties ------------------------------------------------------------------
ALL_PRECISIONS = [("torch", None)] + [("triton", p) for p in rvq.PRECISIONS]


@pytest.mark.parametrize("face,precision", ALL_PRECISIONS)
def test_exact_ties_go_to_the_lowest_index(face, precision):
    cb = make_codebooks(2, 64, 40, seed=15)
    cb[0, 50] = cb[0, 9]  # duplicates: equal scores, bit for bit
    cb[0, 33] = cb[0, 9]
    cb[1, 60] = cb[1, 2]
    x = cb[0, 9][None].repeat(5, 1) + cb[1, 2] + 1e-4 * random_frames(5, 40, seed=16)
    codes = ops.rvq_encode(x, cb, backend=face, precision=precision)
    assert codes[0].tolist() == [9] * 5 and codes[1].tolist() == [2] * 5
    assert torch.equal(codes, brute_force_codes(x, cb))


@pytest.mark.parametrize("face,precision", ALL_PRECISIONS)
def test_ties_beyond_the_candidate_buffer_take_the_full_scan(face, precision):
    # Every codeword is a permutation of one vector and r = 0: all distances are equal in exact
    # arithmetic, the fixed-order float64 sums differ in their last bits, and all K codewords
    # sit within the margin: far more than the kernels' candidate buffers hold.
    g = torch.Generator().manual_seed(17)
    base = torch.randn(96, generator=g)
    cb = torch.stack([base[torch.randperm(96, generator=g)] for _ in range(64)])[None]
    x = torch.zeros(3, 96)
    x[2, 0] = 1e-30  # a row that is not exactly zero, still tied far below float32 resolution
    prepared = ops.RVQCodebooks(cb)
    approx = prepared.norms[0] - 2.0 * (x @ cb[0].t())
    margin = rvq.margin(x.norm(dim=1), torch.zeros(3), float(prepared.emax[0]), 0.0, 96)
    assert bool(((approx <= approx.min(1, keepdim=True).values + margin[:, None]).sum(1) > 16).all())
    codes = ops.rvq_encode(x, cb, backend=face, precision=precision)
    assert torch.equal(codes, brute_force_codes(x, cb))


@pytest.mark.parametrize("face,precision", ALL_PRECISIONS)
def test_midpoint_near_ties(face, precision):
    cb = make_codebooks(2, 50, 64, seed=18)
    g = torch.Generator().manual_seed(19)
    pairs = torch.randint(0, 50, (40, 2), generator=g)
    x = (cb[0][pairs[:, 0]] + cb[0][pairs[:, 1]]) / 2 + 1e-7 * torch.randn(40, 64, generator=g)
    expected = ops.rvq_encode_reference(x, cb)
    assert torch.equal(expected.codes, brute_force_codes(x, cb))
    assert torch.equal(ops.rvq_encode(x, cb, backend=face, precision=precision), expected.codes)


@pytest.mark.parametrize("precision,half_ulp", [("bf16", 2.0**-8), ("tf32", 2.0**-11)])
def test_worst_case_rounding_of_the_search_precision(precision, half_ulp):
    # r = 1 (exact in any precision). E_a = 1 + h - d rounds down to 1, E_b = 1 + h + d rounds
    # up to 1 + 2h: a is closer, but every rounding error points the same way, so the low-
    # precision distances prefer b by about 4 D h. The margin must still admit a.
    dim, delta = 64, 2.0**-18
    cb = make_codebooks(1, 16, dim, seed=20) * 0.1
    cb[0, 3] = 1 + half_ulp - delta
    cb[0, 11] = 1 + half_ulp + delta
    x = torch.ones(2, dim)
    prepared = ops.RVQCodebooks(cb)
    low, demax = prepared.low_precision(precision)
    approx = prepared.norms[0] - 2.0 * (x @ low[0].float().t())
    assert approx.argmin(1).tolist() == [11, 11]  # the search alone gets it wrong
    margin = rvq.margin(x.norm(dim=1), torch.zeros(2), float(prepared.emax[0]), float(demax[0]), dim)
    used = (approx[:, 3] - approx[:, 11]) / margin
    assert bool((used > 0.7).all() and (used < 1).all()), used  # the bound is nearly tight here
    for face, p in (("torch", None), ("triton", precision)):
        assert ops.rvq_encode(x, prepared, backend=face, precision=p).tolist() == [[3, 3]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_rows_get_in_range_codes():
    cb = make_codebooks(2, 30, 16, seed=21)
    x = random_frames(4, 16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    for face in ("torch", "triton"):
        codes = ops.rvq_encode(x, cb, backend=face)
        assert bool(((codes >= 0) & (codes < 30)).all())
        assert torch.equal(codes[:, [0, 3]], ops.rvq_encode(x[[0, 3]], cb))


# ---- decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("face", ["torch", "triton"])
def test_decode_is_bit_identical_to_the_level_order_sum(face):
    cb = make_codebooks(4, 60, 36, seed=22)
    cb[0, 7, :4] = -0.0  # 0.0 + (-0.0) is +0.0: the sum must start from 0.0, not from E_0
    g = torch.Generator().manual_seed(23)
    codes = torch.randint(0, 60, (4, 3, 13), generator=g)
    codes[0, 0, 0] = 7
    expected = torch.zeros(3, 13, 36)
    for level in range(4):
        expected = expected + cb[level][codes[level]]
    got = ops.rvq_decode(codes, cb, backend=face)
    assert got.shape == (3, 13, 36) and torch.equal(bits(got), bits(expected))
    # a subset of levels: the LLM's level alone, SoundStorm's 2..4
    first = ops.rvq_decode(codes[:1], cb, backend=face)
    assert torch.equal(bits(first), bits(0.0 + cb[0][codes[0]]))
    assert torch.equal(bits(first[0, 0, :4]), bits(torch.zeros(4)))  # +0.0 where E_0 holds -0.0
    tail = ops.rvq_decode(codes[1:], cb, first_level=1, backend=face)
    assert torch.equal(bits(tail), bits(0.0 + cb[1][codes[1]] + cb[2][codes[2]] + cb[3][codes[3]]))
    # int32 codes and a poisoned out= buffer
    out = poison(torch.empty(3, 13, 36))
    assert ops.rvq_decode(codes.int(), cb, out=out, backend=face) is out
    assert torch.equal(bits(out), bits(expected))


@pytest.mark.gpu_path
@pytest.mark.parametrize("face", ["torch", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("levels,dim", [(11, 36), (35, 37)])
def test_decode_many_levels_keeps_level_order(face, levels, dim):
    """Kernels take levels in unrolled groups (8 in CUDA, all in Triton) and CUDA shuffles the
    first 32 codes: 11 crosses a group boundary, 35 passes the shuffled levels; dim 36 takes
    the CUDA float4 path, 37 the scalar one."""
    device = "cuda" if HAS_GPU else "cpu"
    cb = make_codebooks(levels, 20, dim, seed=levels).to(device)
    codes = torch.randint(0, 20, (levels, 9), generator=torch.Generator().manual_seed(dim)).to(device)
    expected = torch.zeros(9, dim, device=device)
    for level in range(levels):
        expected = expected + cb[level][codes[level]]
    out = poison(torch.empty(9, dim, device=device))
    ops.rvq_decode(codes, cb, out=out, backend=face)
    assert torch.equal(bits(out), bits(expected))
    tail = ops.rvq_decode(codes[3:], cb, first_level=3, backend=face)
    expected = torch.zeros(9, dim, device=device)
    for level in range(3, levels):
        expected = expected + cb[level][codes[level]]
    assert torch.equal(bits(tail), bits(expected))


@pytest.mark.parametrize("face", ["torch", "triton"])
def test_decode_of_encode_is_the_quantized_sum(face):
    cb = make_codebooks(3, 80, 52, seed=24)
    x = random_frames(33, 52)
    enc = ops.rvq_encode(x, cb, return_quantized=True, return_residual=True)
    assert enc.residual is not None and enc.quantized is not None
    assert torch.equal(bits(ops.rvq_decode(enc.codes, cb, backend=face)), bits(enc.quantized))


@pytest.mark.parametrize("face", ["torch", "triton"])
def test_decode_unchecked_out_of_range_codes_give_nan_rows(face):
    cb = make_codebooks(2, 10, 8, seed=25)
    codes = torch.tensor([[1, 10, 2, 3], [4, 5, -1, 6]])
    out = ops.rvq_decode(codes, cb, check_codes=False, backend=face)
    assert bool(out[[1, 2]].isnan().all()) and not bool(out[[0, 3]].isnan().any())


# ---- errors ---------------------------------------------------------------------------------
def test_bad_arguments_raise_clearly():
    cb = make_codebooks(2, 10, 8, seed=26)
    x = random_frames(4, 8)
    with pytest.raises(TypeError, match="x.dtype=torch.int64"):
        ops.rvq_encode(x.long(), cb)
    with pytest.raises(ValueError, match=r"x.shape=\(4, 7\): last dimension 7, expected D=8"):
        ops.rvq_encode(x[:, :7], cb)
    with pytest.raises(ValueError, match=r"x.shape=\(0, 8\) is empty"):
        ops.rvq_encode(x[:0], cb)
    with pytest.raises(ValueError, match=r"x.shape=\(8,\), expected \[N, D\] or \[B, T, D\]"):
        ops.rvq_encode(x[0], cb)
    with pytest.raises(ValueError, match="x is on meta, expected cpu"):
        ops.rvq_encode(torch.empty(4, 8, device="meta"), cb)
    with pytest.raises(ValueError, match=r"codebooks.shape=\(10, 8\), expected \[levels, codebook_size, dim\]"):
        ops.rvq_encode(x, cb[0])
    with pytest.raises(TypeError, match="codebooks.dtype=torch.int64"):
        ops.rvq_encode(x, cb.long())
    bad = cb.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="codebooks contain NaN or inf"):
        ops.rvq_encode(x, bad)
    with pytest.raises(ValueError, match="precision='fp16'"):
        ops.rvq_encode(x, cb, precision="fp16")
    with pytest.raises(ValueError, match="backend='cuda' for rvq_encode needs CUDA tensors"):
        ops.rvq_encode(x, cb, backend="cuda")
    codes = torch.tensor([[1, 2, 3], [4, 9, 10]])
    with pytest.raises(ValueError, match=r"codes\[1, 2\]=10 is out of range, expected 0 <= code < 10"):
        ops.rvq_decode(codes, cb)
    with pytest.raises(ValueError, match="codes.shape\\[0\\]=2 levels from first_level=1 exceed the 2 levels"):
        ops.rvq_decode(codes.clamp(max=9), cb, first_level=1)
    with pytest.raises(TypeError, match="codes.dtype=torch.float32"):
        ops.rvq_decode(codes.float(), cb)
    with pytest.raises(ValueError, match=r"codes.shape=\(2, 0\) is empty"):
        ops.rvq_decode(codes[:, :0], cb)
    with pytest.raises(ValueError, match=r"out.shape=\(3, 7\), expected \(3, 8\)"):
        ops.rvq_decode(codes.clamp(max=9), cb, out=torch.empty(3, 7))
    with pytest.raises(TypeError, match="out.dtype=torch.float64"):
        ops.rvq_decode(codes.clamp(max=9), cb, out=torch.empty(3, 8, dtype=torch.float64))


def test_c_abi_checks_its_arguments():
    ext = extension()
    assert ext.rvq_workspace_bytes(8, 1024, 1024) >= 8 * 1024 * 1024 * 2 + 8 * 1024 * 4
    with pytest.raises(ValueError, match="size=0, expected >= 1"):
        ext.rvq_workspace_bytes(2, 0, 8)
    with pytest.raises(ValueError, match="expected fewer than 2\\^31 values"):
        ext.rvq_workspace_bytes(1 << 20, 1 << 10, 1 << 10)
    x, cb = random_frames(4, 8), make_codebooks(2, 10, 8)
    codes, res = torch.empty(2, 4, dtype=torch.int64), torch.empty(4, 8)
    ws_bytes = ext.rvq_workspace_bytes(2, 10, 8)
    room = torch.empty(ws_bytes + 256, dtype=torch.uint8)
    ws = room[-room.data_ptr() % 256:][:ws_bytes]  # 256-byte aligned, as the C ABI requires

    def encode(rows=4, dim=8, stride=8, dtype=0, wsb=ws_bytes, codes_ptr=codes.data_ptr(), ws_ptr=ws.data_ptr()):
        ext.rvq_encode_cuda(codes_ptr, res.data_ptr(), 0, x.data_ptr(), stride, dtype, cb.data_ptr(), ws_ptr,
                            wsb, rows, dim, 2, 10, 0)

    with pytest.raises(ValueError, match="rows=0, expected >= 1 \\(empty input\\)"):
        encode(rows=0)
    with pytest.raises(ValueError, match="dim=2048, expected <= 1024"):
        ext.rvq_encode_cuda(codes.data_ptr(), res.data_ptr(), 0, x.data_ptr(), 2048, 0, cb.data_ptr(), ws.data_ptr(),
                            1 << 30, 4, 2048, 1, 10, 0)
    with pytest.raises(ValueError, match="x_row_stride=4, expected >= dim=8"):
        encode(stride=4)
    with pytest.raises(TypeError, match="x dtype code 7"):
        encode(dtype=7)
    with pytest.raises(ValueError, match=f"workspace_bytes=16, expected >= {ws_bytes}"):
        encode(wsb=16)
    with pytest.raises(ValueError, match="workspace=.*, expected a 256-byte aligned address"):
        encode(ws_ptr=ws.data_ptr() + 16)
    with pytest.raises(ValueError, match="codes, residual and x must be non-null"):
        encode(codes_ptr=0)
    with pytest.raises(ValueError, match="levels=2 from first_level=1, expected levels >= 1 within total_levels=2"):
        ext.rvq_decode_cuda(res.data_ptr(), codes.data_ptr(), cb.data_ptr(), 4, 8, 2, 1, 2, 10, 0)
    with pytest.raises(ValueError, match="codebooks is a null pointer"):
        ext.rvq_decode_cuda(res.data_ptr(), codes.data_ptr(), 0, 4, 8, 2, 0, 2, 10, 0)
    if not HAS_GPU:
        expected = "no usable CUDA device" if ext.built_with_cuda else "built without CUDA"
        with pytest.raises(RuntimeError, match=expected):
            encode()
        with pytest.raises(RuntimeError, match=expected):
            ext.rvq_decode_cuda(res.data_ptr(), codes.data_ptr(), cb.data_ptr(), 4, 8, 2, 0, 2, 10, 0)
        with pytest.raises(RuntimeError, match=expected):
            ext.rvq_prepare_cuda(ws.data_ptr(), ws_bytes, cb.data_ptr(), 2, 10, 8, 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_encode_wider_than_the_cuda_kernel_falls_back_to_triton(monkeypatch, device):
    """The CUDA encoder keeps rows of at most CUDA_MAX_DIM values in shared memory: wider codebooks
    dispatched to CUDA are encoded by Triton instead, and an explicit backend='cuda' says why. On
    the CPU the dispatcher is made to answer 'cuda', as it does on a GPU."""
    if device == "cpu":
        monkeypatch.setattr(rvq._backend, "choose", lambda op, dev, requested, preferred, supported: "cuda")
    dim = rvq.CUDA_MAX_DIM + 16
    cb = ops.RVQCodebooks(make_codebooks(2, 24, dim, seed=40).to(device))
    x = random_frames(3, dim, seed=41).to(device)
    expected = ops.rvq_encode_reference(x, cb)
    with tuning.override("rvq", encode_faces=["cuda", "triton"]):
        assert_same_encoding(ops.rvq_encode(x, cb, return_quantized=True, return_residual=True), expected)
        with pytest.raises(ValueError, match=f"codebooks dim={dim}: the CUDA rvq_encode holds rows of at most"):
            ops.rvq_encode(x, cb, backend="cuda")


# ---- GPU ------------------------------------------------------------------------------------
GPU_FACES = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("face", GPU_FACES)
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("n", [1, 129, 4000, 64000])
def test_gpu_faces_match_reference(face, name, n):
    levels, size, dim = SHAPES[name]
    cb = ops.RVQCodebooks(make_codebooks(levels, size, dim, seed=30).cuda())
    x = torch.cat([random_frames(n - n // 2, dim, seed=31), near_codeword_frames(cb.embed.cpu(), n // 2, seed=32)])
    x = x.cuda()
    expected = ops.rvq_encode_reference(x, cb)
    got = ops.rvq_encode(x, cb, backend=face, return_quantized=True, return_residual=True)
    torch.cuda.synchronize()
    assert_same_encoding(got, expected)
    for precision in ("tf32", "bf16") if face == "triton" else ():
        assert torch.equal(ops.rvq_encode(x, cb, backend=face, precision=precision), expected.codes)
        with tuning.override("rvq", triton_tma=True):
            assert torch.equal(ops.rvq_encode(x, cb, backend=face, precision=precision), expected.codes)
    out = poison(torch.empty(n, dim, device="cuda"))
    ops.rvq_decode(expected.codes, cb, out=out, backend=face)
    assert torch.equal(bits(out), bits(expected.quantized))


@pytest.mark.gpu
@pytest.mark.parametrize("face", GPU_FACES)
def test_gpu_adversarial_ties_and_inputs(face):
    g = torch.Generator().manual_seed(33)
    base = torch.randn(96, generator=g)
    cb = torch.stack([base[torch.randperm(96, generator=g)] for _ in range(64)])[None]
    x = torch.zeros(5, 96)
    assert torch.equal(ops.rvq_encode(x.cuda(), cb.cuda(), backend=face).cpu(), brute_force_codes(x, cb))
    cb = make_codebooks(2, 50, 64, seed=34)
    pairs = torch.randint(0, 50, (300, 2), generator=g)
    x = (cb[0][pairs[:, 0]] + cb[0][pairs[:, 1]]) / 2 + 1e-7 * torch.randn(300, 64, generator=g)
    assert torch.equal(ops.rvq_encode(x.cuda(), cb.cuda(), backend=face).cpu(), brute_force_codes(x, cb))
    cb = make_codebooks(1, 16, 64, seed=35) * 0.1
    cb[0, 3], cb[0, 11] = 1 + 2.0**-8 - 2.0**-18, 1 + 2.0**-8 + 2.0**-18
    assert ops.rvq_encode(torch.ones(2, 64, device="cuda"), cb.cuda(), backend=face).tolist() == [[3, 3]]
    cb = make_codebooks(3, 77, 45, seed=36).cuda()
    x = random_frames(2 * 45 * 129, 1).view(2, 45, 129).cuda().transpose(1, 2).to(torch.bfloat16)
    expected = ops.rvq_encode_reference(x.reshape(-1, 45).float(), cb).codes
    assert torch.equal(ops.rvq_encode(x, cb, backend=face).reshape(3, -1), expected)


SANITIZER_SCRIPT = """
import torch
from anygpt_engine import ops
g = torch.Generator().manual_seed(0)
for (levels, size, dim, n) in [(2, 300, 1000, 70), (3, 77, 45, 129), (1, 512, 32, 5)]:
    cb = ops.RVQCodebooks(torch.randn(levels, size, dim, generator=g).cuda())
    x = torch.randn(n, dim, generator=g).cuda()
    enc = ops.rvq_encode(x, cb, backend="cuda", return_quantized=True)
    ops.rvq_decode(enc.codes, cb, backend="cuda")
    ops.rvq_decode(enc.codes, cb, first_level=1, backend="cuda") if levels > 1 else None
    bad = enc.codes.clone(); bad[0, 0] = size
    ops.rvq_decode(bad, cb, check_codes=False, backend="cuda")
torch.cuda.synchronize()
print("sanitizer-run-ok")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck", "synccheck"])
def test_cuda_kernels_under_compute_sanitizer(tool):
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(sanitizer):
        pytest.skip("compute-sanitizer not found")
    done = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, "-c", SANITIZER_SCRIPT],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "sanitizer-run-ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
