"""ops.linear and ops.linear_rope_kv_append: every face against the torch reference (M = 1..16,
odd N, K a multiple of the int4 group), the fused prologue/epilogues, dispatch by M, the
quantized formats' error bounds and layout, and argument errors."""

import pytest
import torch
import torch.nn.functional as F

from anygpt_engine import ops
from anygpt_engine.ops.gemv import linear, linear_reference, linear_rope_kv_append, linear_rope_kv_append_reference
from anygpt_engine.quantization import FP8_MAX, INT4_GROUP, QuantizedWeight, quantize
from conftest import HAS_GPU, poison

DEV = "cuda" if HAS_GPU else "cpu"
MODES = [None, "int8", "fp8", "int4"]


def _weights(n, k, dtype, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEV)
    return w, (quantize(w, mode) if mode else w)


def _x(m, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * 2).to(dtype).to(DEV)


def _assert_rounding_close(got, ref):
    """Equal up to float32 summation order: one rounding step of a 16-bit output, or float32's
    accumulated rounding over a few hundred terms."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = max(2 * torch.finfo(ref.dtype).eps, 2e-5)
    scale = ref.float().abs().amax().clamp(min=1e-3)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gemv_matches_reference_for_every_m(mode, dtype):
    w, weight = _weights(131, 256, dtype, mode)
    x = _x(16, 256, dtype)
    # every M in bf16 (the FMA path below dot_min_m, then the padded dot); float32 at the edges
    for m in range(1, 17) if dtype == torch.bfloat16 else (1, 2, 3, 4, 16):
        out = poison(torch.empty(m, 131, dtype=dtype, device=DEV))
        got = linear(x[:m], weight, out=out, backend="triton")
        assert got.data_ptr() == out.data_ptr()
        _assert_rounding_close(got, linear_reference(x[:m], weight))


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_quantized_reference_is_x_times_the_dequantized_matrix(mode):
    w, weight = _weights(67, 384, torch.float32, mode)
    x = _x(5, 384, torch.float32)
    torch.testing.assert_close(linear_reference(x, weight), x @ weight.dequantize().T, rtol=1e-6, atol=1e-6)
    # and within the format's bound of the unquantized product: |x| . (per-element error bound)
    exact = x @ w.T
    bound = _element_bound(w, weight)
    assert torch.all((linear_reference(x, weight) - exact).abs() <= x.abs() @ bound.T * (1 + 1e-4) + 1e-5)


def _element_bound(w, q):
    """The per-element error bounds of quantization.py's docstring."""
    if q.mode == "int8":
        return (w.abs().amax(1, keepdim=True) / 127 / 2).expand_as(w)
    if q.mode == "fp8":
        return w.abs() / 16 + w.abs().amax(1, keepdim=True) / FP8_MAX * 2.0 ** -10
    return q.scales.float().repeat_interleave(INT4_GROUP, dim=1) / 2


@pytest.mark.parametrize("mode", MODES)
def test_fused_norm_silu_mul_and_residual(mode):
    dtype = torch.bfloat16
    w, weight = _weights(2 * 75, 256, dtype, mode, seed=3)
    norm = (torch.rand(256, generator=torch.Generator().manual_seed(4)) + 0.5).to(dtype).to(DEV)
    for m in (1, 3, 16, 19):  # 19: above the crossover (cuBLAS for 16-bit, the tiled GEMM when quantized)
        x = _x(m, 256, dtype, seed=m)
        got = linear(x, weight, norm_weight=norm, activation="silu_mul", backend="triton")
        assert got.shape == (m, 75)
        _assert_rounding_close(got, linear_reference(x, weight, norm, 1e-5, "silu_mul"))
        residual = _x(m, 150, dtype, seed=50 + m)
        expected = linear_reference(x, weight, norm, 1e-5, None, residual)
        returned = linear(x, weight, norm_weight=norm, residual=residual, backend="triton")
        assert returned.data_ptr() == residual.data_ptr()
        _assert_rounding_close(residual, expected)


def test_fusions_equal_the_unfused_ops():
    """Same rounding points as ops.rms_norm, F.linear, F.silu * up and the residual add."""
    dtype = torch.bfloat16
    w, _ = _weights(2 * 40, 128, dtype, None, seed=5)
    x = _x(2, 128, dtype, seed=6)
    norm = (torch.rand(128) + 0.5).to(dtype).to(DEV)
    h = ops.rms_norm(x, norm, 1e-5, backend="torch")
    gate, up = F.linear(h, w).chunk(2, dim=-1)
    unfused = F.silu(gate) * up
    assert torch.equal(linear(x, w, norm_weight=norm, activation="silu_mul", backend="torch"), unfused)
    _assert_rounding_close(linear(x, w, norm_weight=norm, activation="silu_mul", backend="triton"), unfused)
    residual = _x(2, 80, dtype, seed=7)
    expected = residual + F.linear(x, w)
    assert torch.equal(linear(x, w, residual=residual.clone(), backend="torch"), expected)


def test_leading_dims_and_strided_rows():
    w, _ = _weights(33, 128, torch.float32, None)
    x = _x(12, 256, torch.float32)[:, :128].reshape(3, 4, 128)  # rows 256 apart
    got = linear(x, w, backend="triton")
    assert got.shape == (3, 4, 33)
    _assert_rounding_close(got, F.linear(x, w))


def _ops_called(fn) -> list[str]:
    """The dispatcher's ops that fn runs (custom ops appear as one op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        fn()
    return recorder.names


def test_dispatch_by_m_uses_the_library_above_the_crossover():
    from anygpt_engine import tuning

    max_m = tuning.params("gemv", torch.device(DEV))["max_m"]
    w, weight = _weights(40, 128, torch.float32, "int8")
    for m in (1, max_m, max_m + 1):
        x = _x(m, 128, torch.float32)
        called = _ops_called(lambda: linear(x, w, backend="triton"))
        kernel = "anygpt_engine.linear_kernel.default" in called
        assert kernel == (m <= max_m), (m, called)
        if m > max_m:  # F.linear itself
            assert torch.equal(linear(x, w, backend="triton"), F.linear(x, w))
        # quantized weights always take the kernels: no dequantized matrix ever exists
        assert "anygpt_engine.linear_kernel.default" in _ops_called(lambda: linear(x, weight, backend="triton"))


def _check_qkv_rope_kv_append(x, weight, positions, slots, heads, kv_heads, head_dim, norm):
    """The fused Triton op against the unfused reference: q, and poisoned caches in which the same
    slots are written (to rounding) and the others untouched."""
    inv_freq = (1.0 / 10000 ** (torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2))).to(DEV)
    caches = [poison(torch.empty(6, 4, kv_heads, head_dim, dtype=x.dtype, device=DEV)) for _ in range(2)]
    expected = [c.clone() for c in caches]
    q = linear_rope_kv_append(x, weight, positions, slots, caches[0], caches[1], inv_freq, heads,
                              norm_weight=norm, backend="triton")
    q_ref = linear_rope_kv_append_reference(x, weight, positions, slots, expected[0], expected[1], inv_freq,
                                            heads, norm)
    _assert_rounding_close(q, q_ref)
    for got, ref in zip(caches, expected):
        written = ~ref.isnan()
        assert torch.equal(got.isnan(), ref.isnan())
        _assert_rounding_close(got[written], ref[written])


@pytest.mark.parametrize("mode", MODES)
def test_fused_qkv_rope_kv_append_matches_the_unfused_reference(mode):
    dtype = torch.bfloat16
    heads, kv_heads, head_dim, k = 4, 2, 32, 128
    w, weight = _weights((heads + 2 * kv_heads) * head_dim, k, dtype, mode, seed=8)
    norm = (torch.rand(k) + 0.5).to(dtype).to(DEV)
    for m in (1, 5, 16, 19):  # 19: above max_m, the projections then ops.rope_kv_append
        positions = torch.randint(0, 3000, (m,), generator=torch.Generator().manual_seed(m)).to(DEV)
        slots = torch.randperm(24, generator=torch.Generator().manual_seed(m))[:m].to(DEV)
        if m > 1:
            slots[1] = -1  # padding: writes nothing
            slots[-1] = 24  # past the cache: writes nothing
        _check_qkv_rope_kv_append(_x(m, k, dtype, seed=m), weight, positions, slots, heads, kv_heads, head_dim, norm)


def test_launch_counter_counts_per_op_call():
    w, weight = _weights(64, 128, torch.float32, "int8")
    x = _x(1, 128, torch.float32)
    with ops.count_launches() as outer:
        linear(x, weight, backend="triton")
        with ops.count_launches() as inner:
            linear(x, weight, activation="silu_mul", backend="triton")
        linear(x, weight, backend="torch")  # the reference launches none of the engine's kernels
    assert inner.calls == [("linear", 1)]
    assert outer.calls == [("linear", 1), ("linear", 1)] and outer.total == 2


def test_batch_dependent_int_arguments_are_not_specialized():
    """Triton compiles a new kernel when an int argument changes between 1, a multiple of 16 and
    other values; arguments that follow the batch (rows, block-table widths, split and tile
    counts) or the audio (frames, MaskGIT levels and passes, the first RVQ level decoded) must
    not be specialized, or serving recompiles mid-stream. Read from the compiled (not
    interpreted) kernels, in a process without TRITON_INTERPRET."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from anygpt_engine.kernels import attention as a, gemv as g, lm_head as h, maskgit as m, "
            "rvq as r; print(json.dumps({f.fn.__name__: sorted(f.do_not_specialize) for f in ("
            "a._varlen_attention_kernel, a._paged_decode_kernel, a._merge_splits_kernel, h._lm_head_kernel, "
            "g._gemv_kernel, g._qkv_rope_kernel, m._maskgit_step_kernel, r._rvq_encode_kernel, "
            "r._rvq_decode_kernel)}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "_varlen_attention_kernel": ["bt_stride", "bt_width", "num_tiles"],
        "_paged_decode_kernel": ["bt_stride", "bt_width", "num_splits"],
        "_merge_splits_kernel": ["num_splits"],
        "_lm_head_kernel": ["batch"],
        "_gemv_kernel": ["M", "out_stride", "splits", "x_stride"],
        "_qkv_rope_kernel": ["M", "num_slots", "splits", "x_stride"],
        "_maskgit_step_kernel": ["counter", "level", "positions"],
        "_rvq_encode_kernel": ["N"],
        "_rvq_decode_kernel": ["FIRST", "N"],
    }


# -- split-K ----------------------------------------------------------------------------------------
# Tiles that leave the CPU table's (or a GPU's) SMs idle: split_k() then cuts K = 512 into 4 ranges
# of one BLOCK_K step (128, one int4 group) at every M, on the FMA path (M < 4) and the dot path.
SPLIT_TILES = dict(sms=64, split_min_k=128, fma_block_n=32, fma_elements=4096, dot_block_n=32, dot_block_k=128)


def _splits_used(monkeypatch) -> list[int]:
    """Records the split count of every Triton GEMV launch (the real launch still runs)."""
    from anygpt_engine.kernels import gemv as kernels

    used, launch, rope = [], kernels.gemv, kernels.qkv_rope
    monkeypatch.setattr(kernels, "gemv", lambda *a, **kw: (used.append(kw.get("splits", 1)), launch(*a, **kw))[1])
    monkeypatch.setattr(kernels, "qkv_rope", lambda *a, **kw: (used.append(kw.get("splits", 1)), rope(*a, **kw))[1])
    return used


def _counters_zero(device) -> bool:
    from anygpt_engine.ops import gemv

    return not bool(gemv._workspaces[torch.device(device)][1].any())


@pytest.mark.parametrize("mode", MODES)
def test_split_k_matches_reference_with_every_fusion(mode, monkeypatch):
    """Every M = 1..16 across the modes (odd N, poisoned outputs), each epilogue, both inner
    products; the split result is the same bits on a second call, and the counters end at zero."""
    from anygpt_engine import tuning

    used = _splits_used(monkeypatch)
    dtype = torch.bfloat16
    w, weight = _weights(2 * 19, 512, dtype, mode, seed=11)
    norm = (torch.rand(512, generator=torch.Generator().manual_seed(12)) + 0.5).to(dtype).to(DEV)
    ms = {None: (1, 2, 9, 16), "int8": (3, 4, 10), "fp8": (5, 6, 11, 13), "int4": (7, 8, 12, 14, 15)}[mode]
    with tuning.override("gemv", **SPLIT_TILES):
        for m in ms:
            x = _x(m, 512, dtype, seed=20 + m)
            out = poison(torch.empty(m, 2 * 19, dtype=dtype, device=DEV))
            linear(x, weight, out=out, backend="triton")
            _assert_rounding_close(out, linear_reference(x, weight))
            assert torch.equal(linear(x, weight, backend="triton"), out)  # deterministic
            gated = poison(torch.empty(m, 19, dtype=dtype, device=DEV))
            linear(x, weight, norm_weight=norm, activation="silu_mul", out=gated, backend="triton")
            _assert_rounding_close(gated, linear_reference(x, weight, norm, 1e-5, "silu_mul"))
            residual = _x(m, 2 * 19, dtype, seed=40 + m)
            expected = linear_reference(x, weight, norm, 1e-5, None, residual)
            linear(x, weight, norm_weight=norm, residual=residual, backend="triton")
            _assert_rounding_close(residual, expected)
    assert used == [4] * 4 * len(ms)
    assert _counters_zero(DEV)


def test_split_k_in_float32_matches_the_unsplit_kernel(monkeypatch):
    """float32 with an odd K (the last range short): the split sums equal the one-program sums up
    to float32 rounding."""
    from anygpt_engine import tuning

    used = _splits_used(monkeypatch)
    w, _ = _weights(29, 1000, torch.float32, None, seed=13)
    x = _x(3, 1000, torch.float32, seed=14)
    with tuning.override("gemv", **{**SPLIT_TILES, "split_max": 1}):
        whole = linear(x, w, backend="triton")
    with tuning.override("gemv", **SPLIT_TILES):
        split = linear(x, w, backend="triton")
    assert used == [1, 7]  # 32 BLOCK_K steps of 32 in at most K / split_min_k = 7 ranges
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    _assert_rounding_close(split, F.linear(x, w))


@pytest.mark.parametrize("mode", [None, "int4"])
def test_split_k_fused_qkv_rope_kv_append(mode, monkeypatch):
    from anygpt_engine import tuning

    used = _splits_used(monkeypatch)
    dtype = torch.bfloat16
    heads, kv_heads, head_dim, k = 2, 1, 32, 512
    w, weight = _weights((heads + 2 * kv_heads) * head_dim, k, dtype, mode, seed=15)
    norm = (torch.rand(k) + 0.5).to(dtype).to(DEV)
    with tuning.override("gemv", **SPLIT_TILES):
        for m in (1, 6):
            positions = torch.arange(100, 100 + 7 * m, 7).to(DEV)
            _check_qkv_rope_kv_append(_x(m, k, dtype, seed=60 + m), weight, positions, torch.arange(m).to(DEV) * 3,
                                      heads, kv_heads, head_dim, norm)
    assert used == [4, 4]
    assert _counters_zero(DEV)


def test_split_count_comes_from_the_tuning_table():
    """The rule (split_waves programs per SM, split_max, split_min_k, whole BLOCK_K steps, no
    empty range) and the measured per-shape counts, which win over it."""
    from anygpt_engine import tuning
    from anygpt_engine.ops.gemv import split_k

    cpu = torch.device("cpu")
    with tuning.override("gemv", sms=10, split_waves=2, split_max=8, split_min_k=256, split_k={}):
        params = tuning.params("gemv", cpu)
        assert split_k(params, "linear", cpu, 4096, 4096, 1, 20, 512) == 1  # 20 tiles = 2 waves of 10 SMs
        assert split_k(params, "linear", cpu, 4096, 4096, 1, 19, 512) == 2
        assert split_k(params, "linear", cpu, 4096, 4096, 1, 1, 512) == 8  # split_max
        assert split_k(params, "linear", cpu, 4096, 1024, 1, 1, 128) == 4  # K / split_min_k
        assert split_k(params, "linear", cpu, 4096, 1024, 1, 1, 512) == 2  # two BLOCK_K steps
        # ceil(20 / 3) = 7 wanted, but 8 steps in 7 ranges take 2 steps as 4 ranges do: 4 programs
        assert split_k(params, "linear", cpu, 4096, 4096, 1, 3, 512) == 4
    with tuning.override("gemv", sms=10, split_waves=2, split_max=8, split_min_k=128, split_k={}):
        params = tuning.params("gemv", cpu)
        assert split_k(params, "linear", cpu, 4096, 5 * 128, 1, 5, 128) == 3  # 4 wanted, 5 steps: 2 + 2 + 1
        assert split_k(params, "linear", cpu, 4096, 5 * 128 - 3, 1, 5, 128) == 3  # a short last step
    measured = {"linear 4096x4096": {"1": 3, "16": 1}}
    with tuning.override("gemv", sms=10, split_k=measured):
        params = tuning.params("gemv", cpu)
        assert split_k(params, "linear", cpu, 4096, 4096, 1, 1000, 512) == 3  # measured, even with many tiles
        assert split_k(params, "linear", cpu, 4096, 4096, 16, 1, 512) == 1
        assert split_k(params, "linear", cpu, 4096, 4096, 2, 1, 512) == 8  # no entry for M=2: the rule
        assert split_k(params, "qkv_rope", cpu, 4096, 4096, 1, 1000, 512) == 1  # another op's key
    # The shipped table: GPUs read their SM count; the CPU entry fixes one.
    assert tuning.params_for("gemv", "NVIDIA H100 80GB HBM3")["sms"] == 0 and tuning.params("gemv", cpu)["sms"] > 0


def test_dispatch_takes_the_split_count_from_the_tuning_table(monkeypatch):
    from anygpt_engine import tuning

    used = _splits_used(monkeypatch)
    w, weight = _weights(37, 512, torch.float32, "int8", seed=16)
    x = _x(2, 512, torch.float32, seed=17)
    expected = linear_reference(x, weight)
    tiles = dict(fma_block_n=16, fma_elements=2048, split_min_k=128)
    for table, splits in ((dict(sms=1), 1), (dict(sms=2), 2), (dict(sms=64), 4),
                          (dict(sms=64, split_k={"linear 37x512": {"2": 3}}), 3),
                          (dict(sms=64, split_k={"linear 37x512": {"1": 3}}), 4)):
        with tuning.override("gemv", **tiles, **table):
            _assert_rounding_close(linear(x, weight, backend="triton"), expected)
    assert used == [1, 2, 4, 3, 4]


def test_split_workspace_grows_and_keeps_what_graphs_hold():
    from anygpt_engine.ops import gemv

    device = torch.device("meta")  # a device no other test uses: its own workspace
    small = gemv.split_workspace(device, 10, 3)
    assert small[0].numel() >= 10 and small[1].dtype == torch.int32 and small[1].numel() >= 3
    assert gemv.split_workspace(device, 5, 2) is small
    big = gemv.split_workspace(device, 1 << 20, 3)
    assert big[0].numel() == 1 << 20 and big[1].numel() == small[1].numel()
    assert any(old is small for old in gemv._retired)  # a captured graph may still use it
    cpu = gemv.split_workspace(torch.device("cpu"), 4, 4)
    assert not cpu[1].any()


def test_an_interrupted_split_launch_leaves_the_counters_at_zero(monkeypatch):
    """Counters counted up by programs of a launch that then failed are zeroed, so the next split
    launch of those tiles still finds its last program (and writes its output)."""
    from anygpt_engine import tuning
    from anygpt_engine.kernels import gemv as kernels

    w, _ = _weights(19, 512, torch.float32, None, seed=18)
    x = _x(1, 512, torch.float32, seed=19)
    launch = kernels.gemv

    def interrupted(*args, counters=None, **kwargs):
        counters[:3] += 1  # some programs of tiles 0..2 arrived, then the launch failed
        raise KeyboardInterrupt

    with tuning.override("gemv", **SPLIT_TILES):
        monkeypatch.setattr(kernels, "gemv", interrupted)
        with pytest.raises(KeyboardInterrupt):
            linear(x, w, backend="triton")
        monkeypatch.setattr(kernels, "gemv", launch)
        assert _counters_zero(DEV)
        _assert_rounding_close(linear(x, w, out=poison(torch.empty(1, 19, device=DEV)), backend="triton"),
                               F.linear(x, w))


# -- quantization formats ------------------------------------------------------------------------
def _spread_weight(n=48, k=256, seed=0):
    """Rows and groups of very different scales, an all-zero row, a constant group and outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    w[3] = 0.0
    w[5, :INT4_GROUP] = 0.7
    w[7, 11] = 25.0
    return w


def test_int8_error_bound_and_layout():
    w = _spread_weight()
    q = quantize(w, "int8")
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == w.shape and q.scales.shape == (w.shape[0],)
    scale = w.abs().amax(1) / 127
    assert torch.all((q.dequantize() - w).abs() <= scale[:, None] / 2 * (1 + 1e-6) + 1e-12)
    assert torch.equal(q.dequantize()[3], torch.zeros(w.shape[1]))
    assert q.qweight.abs().max() == 127


def test_fp8_error_bound_and_layout():
    w = _spread_weight()
    q = quantize(w, "fp8")
    assert q.qweight.dtype == torch.float8_e4m3fn and q.scales.shape == (w.shape[0],)
    scale = w.abs().amax(1) / FP8_MAX
    bound = w.abs() / 16 + scale[:, None] * 2.0 ** -10
    assert torch.all((q.dequantize() - w).abs() <= bound * (1 + 1e-6) + 1e-12)
    assert torch.isfinite(q.dequantize()).all()


def test_int4_error_bound_and_packing():
    w = _spread_weight()
    q = quantize(w, "int4")
    n, k = w.shape
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (n, k // 2)
    assert q.scales.dtype == torch.float16 and q.scales.shape == (n, k // INT4_GROUP) == q.zeros.shape
    assert int(q.zeros.max()) <= 15
    # Element 2j in the low nibble, 2j + 1 in the high one, (q - zero) * scale per group of 128.
    values = torch.empty(n, k)
    values[:, 0::2] = (q.qweight & 0xF).float()
    values[:, 1::2] = (q.qweight >> 4).float()
    groups = torch.arange(k) // INT4_GROUP
    manual = (values - q.zeros.float()[:, groups]) * q.scales.float()[:, groups]
    assert torch.equal(q.dequantize(), manual)
    bound = q.scales.float()[:, groups] / 2
    assert torch.all((manual - w).abs() <= bound * (1 + 1e-6) + 1e-12)
    assert torch.equal(manual[3], torch.zeros(k))
    torch.testing.assert_close(manual[5, :INT4_GROUP], w[5, :INT4_GROUP], rtol=2e-3, atol=0)


def test_quantized_weight_moves_and_counts_bytes():
    q = quantize(_spread_weight(16, 256), "int4")
    assert q.nbytes == 16 * 128 + 16 * 2 * 2 + 16 * 2
    assert isinstance(q, QuantizedWeight) and q.shape == (16, 256)
    assert torch.equal(q.to("cpu").dequantize(), q.dequantize())


def test_quantization_errors_name_the_argument():
    from anygpt_engine.quantization import check_mode

    with pytest.raises(ValueError, match=r"quantization='int3'"):
        check_mode("int3")
    with pytest.raises(ValueError, match=r"weight.shape\[1\]=200 \(K\) is not a multiple of the int4 group size 128"):
        quantize(torch.randn(4, 200), "int4")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(torch.full((2, 128), float("inf")), "int8")


def test_linear_argument_errors():
    w, weight = _weights(10, 128, torch.float32, "int8")
    x = _x(2, 128, torch.float32)
    with pytest.raises(ValueError, match=r"weight.shape=\(10, 128\) \(int8\), expected \[N, 64\]"):
        linear(_x(2, 64, torch.float32), weight)
    with pytest.raises(TypeError, match="weight.dtype"):
        linear(x, w.half())
    with pytest.raises(ValueError, match="activation='gelu'"):
        linear(x, w, activation="gelu")
    with pytest.raises(ValueError, match="even row count, got 9"):
        linear(x, w[:9], activation="silu_mul")
    with pytest.raises(ValueError, match=r"norm_weight.shape=\(127,\)"):
        linear(x, w, norm_weight=torch.ones(127, device=DEV))
    with pytest.raises(ValueError, match="out or residual, not both"):
        linear(x, w, residual=torch.zeros(2, 10, device=DEV), out=torch.zeros(2, 10, device=DEV))
    with pytest.raises(ValueError, match=r"residual must be a contiguous \(2, 10\)"):
        linear(x, w, residual=torch.zeros(2, 11, device=DEV))
    square = _weights(128, 128, torch.float32, "int8")[0]
    with pytest.raises(ValueError, match="residual overlaps x"):
        linear(x, square, residual=x)
    shared = torch.cat([x.view(-1), x.new_zeros(20)])  # x's 256 values, then room for a (2, 10) out
    with pytest.raises(ValueError, match="out overlaps x"):
        linear(shared[:256].view(2, 128), w, out=shared[250:270].view(2, 10))
    torch.testing.assert_close(linear(shared[:256].view(2, 128), w, out=shared[256:].view(2, 10)), x @ w.t())
    with pytest.raises(ValueError, match="backend='cuda'"):
        linear(x, w, backend="cuda") if DEV == "cpu" else linear(_x(17, 128, torch.float32), weight, backend="cuda")
    with pytest.raises(ValueError, match=r"weight has 10 rows, expected"):
        linear_rope_kv_append(x, w, torch.zeros(2, dtype=torch.long, device=DEV), torch.zeros(2, dtype=torch.long,
                              device=DEV), torch.zeros(2, 4, 1, 32, device=DEV), torch.zeros(2, 4, 1, 32, device=DEV),
                              torch.ones(16, device=DEV), 2)


def test_cuda_entry_checks_its_arguments_first():
    """The C ABI rejects bad arguments with messages before it touches memory or a device."""
    from anygpt_engine.ops._extension import extension

    c = extension()
    if not c.built_with_cuda:
        pytest.skip("anygpt_engine._C built without CUDA kernels")
    x, w = torch.zeros(2, 256, dtype=torch.bfloat16), torch.zeros(64, 256, dtype=torch.bfloat16)
    out = torch.zeros(2, 64, dtype=torch.bfloat16)

    def call(m=2, k=256, weight=w.data_ptr(), fmt=0, scales=0, epilogue=0, threads=128, row_warps=2):
        c.gemv_cuda(out.data_ptr(), x.data_ptr(), weight, scales, 0, 0, m, 64, k, 256, 64, 1e-5, c.BFLOAT16, fmt,
                    epilogue, threads, row_warps, 0)

    with pytest.raises(ValueError, match=r"m=17, expected 0..16 rows"):
        call(m=17)
    with pytest.raises(ValueError, match=r"k=100, expected a positive multiple of 8"):
        call(k=100)
    with pytest.raises(ValueError, match=r"scales must be a non-null pointer"):
        call(fmt=1)
    with pytest.raises(ValueError, match=r"is not 16-byte aligned"):
        call(weight=w.data_ptr() + 2)
    with pytest.raises(ValueError, match=r"epilogue=3"):
        call(epilogue=3)
    with pytest.raises(ValueError, match=r"threads=96"):
        call(threads=96)
    with pytest.raises(ValueError, match=r"row_warps=3, expected a power of two from 1 to threads / 32 = 4"):
        call(row_warps=3)
    with pytest.raises(ValueError, match=r"row_warps=8"):
        call(row_warps=8)
    if not HAS_GPU:  # valid arguments reach the device probe
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            call()


# -- GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gemv_matches_reference(mode, dtype):
    w, weight = _weights(4096 + 3, 1024, dtype, mode)
    norm = (torch.rand(1024) + 0.5).to(dtype).to(DEV)
    for m in range(1, 17):
        x = _x(m, 1024, dtype, seed=m)
        _assert_rounding_close(linear(x, weight, backend="cuda"), linear_reference(x, weight))
        got = linear(x, weight[:4096] if mode is None else quantize(w[:4096], mode), norm_weight=norm,
                     activation="silu_mul", backend="cuda")
        ref = linear_reference(x, weight[:4096] if mode is None else quantize(w[:4096], mode), norm, 1e-5,
                               "silu_mul")
        _assert_rounding_close(got, ref)
        residual = _x(m, 4096 + 3, dtype, seed=90 + m)
        expected = linear_reference(x, weight, None, 1e-5, None, residual)
        linear(x, weight, residual=residual, backend="cuda")
        _assert_rounding_close(residual, expected)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_tensors_device():
    w, weight = _weights(256, 512, torch.bfloat16, "int4")
    x = _x(3, 512, torch.bfloat16)
    expected = linear(x, weight, backend="triton")
    with torch.cuda.device(0):
        for backend in ("triton", "cuda"):
            got = linear(x.to("cuda:1"), weight.to("cuda:1"), backend=backend)
            assert got.device == torch.device("cuda:1")
            _assert_rounding_close(got.to(DEV), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("face", ["triton", "cuda"])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_split_k_matches_reference_and_replays_bit_for_bit(face, mode, monkeypatch):
    """A tensor-parallel-shard-sized matrix (few output rows for the device's SMs): split-K on
    Triton, several warps per row on CUDA (each warp count the launcher takes); every fusion
    against the reference, the same bits on every call and from CUDA graph replays."""
    from anygpt_engine import tuning
    from anygpt_engine.ops.gemv import cuda_row_warps

    used = _splits_used(monkeypatch)
    dtype, n_out, k = torch.bfloat16, 203, 4096
    w, weight = _weights(2 * n_out, k, dtype, mode, seed=30)
    norm = (torch.rand(k) + 0.5).to(dtype).to(DEV)
    row_warps = (1, 2, 4, 8) if face == "cuda" else (None,)
    for warps in row_warps:  # Triton: the rule on the device's SM count, whatever a sweep recorded
        table = dict(cuda_row_warps=warps, cuda_warps_per_sm=1 << 20) if warps else \
            dict(split_waves=2, split_max=8, split_min_k=512, split_k={})
        with tuning.override("gemv", **table):
            if face == "cuda":
                assert cuda_row_warps(tuning.params("gemv", torch.device(DEV)), torch.device(DEV), n_out) == warps
            for m in (1, 3, 16):
                x = _x(m, k, dtype, seed=m)
                out = poison(torch.empty(m, 2 * n_out, dtype=dtype, device=DEV))
                linear(x, weight, out=out, backend=face)
                _assert_rounding_close(out, linear_reference(x, weight))
                assert torch.equal(linear(x, weight, backend=face), out)
                gated = linear(x, weight, norm_weight=norm, activation="silu_mul", backend=face)
                _assert_rounding_close(gated, linear_reference(x, weight, norm, 1e-5, "silu_mul"))
                residual = _x(m, 2 * n_out, dtype, seed=50 + m)
                expected = linear_reference(x, weight, None, 1e-5, None, residual)
                linear(x, weight, residual=residual, backend=face)
                _assert_rounding_close(residual, expected)
    if face == "triton":
        assert used and min(used) > 1  # (406 or 203 rows in tiles of 16 or 32: fewer than 2 per SM)
    x = _x(1, k, dtype, seed=70)
    out = torch.empty(1, n_out, dtype=dtype, device=DEV)
    step = lambda: linear(x, weight, norm_weight=norm, activation="silu_mul", out=out, backend=face)  # noqa: E731
    with tuning.override("gemv", cuda_row_warps=8, cuda_warps_per_sm=1 << 20, split_waves=2, split_max=8,
                         split_min_k=512, split_k={}):  # split on both faces
        step()  # warm-up: the workspace is made outside the capture
        eager = out.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    x.copy_(_x(1, k, dtype, seed=71))
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    with tuning.override("gemv", cuda_row_warps=8, cuda_warps_per_sm=1 << 20, split_waves=2, split_max=8,
                         split_min_k=512, split_k={}):
        assert torch.equal(replayed, linear(x, weight, norm_weight=norm, activation="silu_mul", backend=face))
