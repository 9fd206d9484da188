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


@pytest.mark.parametrize("mode", MODES)
def test_fused_qkv_rope_kv_append_matches_the_unfused_reference(mode):
    dtype = torch.bfloat16
    heads, kv_heads, head_dim, k = 4, 2, 32, 128
    w, weight = _weights((heads + 2 * kv_heads) * head_dim, k, dtype, mode, seed=8)
    norm = (torch.rand(k) + 0.5).to(dtype).to(DEV)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, head_dim // 2, dtype=torch.float32) / (head_dim // 2))).to(DEV)
    for m in (1, 5, 16, 19):  # 19: above max_m, the projections then ops.rope_kv_append
        x = _x(m, k, dtype, seed=m)
        positions = torch.randint(0, 3000, (m,), generator=torch.Generator().manual_seed(m)).to(DEV)
        slots = torch.randperm(24, generator=torch.Generator().manual_seed(m))[:m].to(DEV)
        if m > 1:
            slots[1] = -1  # padding: writes nothing
            slots[-1] = 24  # past the cache: writes nothing
        caches = [poison(torch.empty(6, 4, kv_heads, head_dim, dtype=dtype, device=DEV)) for _ in range(2)]
        expected = [c.clone() for c in caches]
        q = linear_rope_kv_append(x, weight, positions, slots, caches[0], caches[1], inv_freq, heads,
                                  norm_weight=norm, backend="triton")
        q_ref = linear_rope_kv_append_reference(x, weight, positions, slots, expected[0], expected[1], inv_freq,
                                                heads, norm)
        _assert_rounding_close(q, q_ref)
        for got, ref in zip(caches, expected):
            written = ~ref.isnan()
            assert torch.equal(got.isnan(), ref.isnan())  # the same slots written, the others untouched
            _assert_rounding_close(got[written], ref[written])


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
    counts) must not be specialized, or serving recompiles mid-stream. Read from the compiled
    (not interpreted) kernels, in a process without TRITON_INTERPRET."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from anygpt_engine.kernels import attention as a, gemv as g, lm_head as h; "
            "print(json.dumps({f.fn.__name__: sorted(f.do_not_specialize) for f in (a._varlen_attention_kernel, "
            "a._paged_decode_kernel, a._merge_splits_kernel, h._lm_head_kernel, g._gemv_kernel, "
            "g._qkv_rope_kernel)}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "_varlen_attention_kernel": ["bt_stride", "num_tiles"],
        "_paged_decode_kernel": ["bt_stride", "bt_width", "num_splits"],
        "_merge_splits_kernel": ["num_splits"],
        "_lm_head_kernel": ["batch"],
        "_gemv_kernel": ["M", "out_stride", "x_stride"],
        "_qkv_rope_kernel": ["M", "num_slots", "x_stride"],
    }


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

    def call(m=2, k=256, weight=w.data_ptr(), fmt=0, scales=0, epilogue=0, threads=128):
        c.gemv_cuda(out.data_ptr(), x.data_ptr(), weight, scales, 0, 0, m, 64, k, 256, 64, 1e-5, c.BFLOAT16, fmt,
                    epilogue, threads, 0)

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
