"""RMSNorm (plain and fused residual add): every face against the torch reference, and the
reference against transformers' LlamaRMSNorm rounding."""

import pytest
import torch

from anygpt_engine import ops
from anygpt_engine.ops._extension import extension
from conftest import HAS_GPU, poison

# Two ulps: the output is rounded twice (normed, then times weight), and a sum of squares
# summed in another order may move the first rounding by one ulp.
TOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
SHAPES = [(1, 7), (7, 129), (3, 5, 1000), (129, 64), (2, 4096)]


def _inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype).to(device)
    res = torch.randn(shape, generator=g).to(dtype).to(device)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype).to(device)
    return x, res, w


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_reference_matches_hf_llama_rmsnorm():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, _, w = _inputs((5, 257), dtype)
        hf = LlamaRMSNorm(257, eps=1e-5).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(w)
            expected = hf(x)
        out, _ = ops.rms_norm_reference(x, w, 1e-5)
        assert out.dtype == dtype
        assert torch.equal(out, expected), dtype


CPU_FACES = ["cpp", "triton"]


@pytest.mark.parametrize("face", CPU_FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_faces_match_reference_cpu(face, dtype, shape, fused):
    x, res, w = _inputs(shape, dtype)
    expected, expected_res = ops.rms_norm_reference(x, w, 1e-5, res if fused else None)
    out = poison(torch.empty_like(x))
    residual = res.clone() if fused else None
    got = ops.rms_norm(x, w, 1e-5, residual=residual, out=out, backend=face)
    assert got is out
    _close(out, expected, dtype)
    if fused:
        # The residual sum is a single rounding of x + residual: exact in every face.
        assert torch.equal(residual, expected_res)


@pytest.mark.parametrize("face", ["torch", *CPU_FACES])
def test_strided_rows(face):
    base, _, w = _inputs((9, 300), torch.float32)
    x = base[:, 10:139]  # rows 300 apart, 129 wide
    w = w[:129]
    expected, _ = ops.rms_norm_reference(x.contiguous(), w, 1e-6)
    _close(ops.rms_norm(x, w, 1e-6, backend=face), expected, torch.float32)


@pytest.mark.parametrize("face", ["torch", *CPU_FACES])
def test_broadcast_rows(face):
    _, _, w = _inputs((1, 40), torch.float32)
    row = torch.randn(1, 40)
    expected, _ = ops.rms_norm_reference(row.expand(6, 40).contiguous(), w, 1e-5)
    _close(ops.rms_norm(row.expand(6, 40), w, 1e-5, backend=face), expected, torch.float32)


@pytest.mark.parametrize("face", ["torch", *CPU_FACES])
def test_empty_rows(face):
    x = torch.empty(0, 64)
    assert ops.rms_norm(x, torch.ones(64), 1e-5, backend=face).shape == (0, 64)


def test_bad_arguments_raise_clearly():
    x, res, w = _inputs((4, 16), torch.float32)
    with pytest.raises(ValueError, match=r"weight.shape=\(8,\)"):
        ops.rms_norm(x, w[:8], 1e-5)
    with pytest.raises(TypeError, match="weight.dtype=torch.float16"):
        ops.rms_norm(x, w.half(), 1e-5)
    with pytest.raises(TypeError, match="x.dtype=torch.int64"):
        ops.rms_norm(x.long(), w, 1e-5)
    with pytest.raises(ValueError, match="eps=-1"):
        ops.rms_norm(x, w, -1)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        ops.rms_norm(x, w, 1e-5, residual=torch.randn(16, 4).t())
    with pytest.raises(ValueError, match=r"out.shape=\(4, 8\)"):
        ops.rms_norm(x, w, 1e-5, out=torch.empty(4, 8))
    with pytest.raises(ValueError, match="backend='nope'"):
        ops.rms_norm(x, w, 1e-5, backend="nope")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.rms_norm(x, w, 1e-5, backend="cuda")


def test_c_abi_checks_its_arguments():
    ext = extension()
    x = torch.randn(2, 8)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="x_row_stride=4, expected >= hidden=8"):
        ext.rms_norm_cpu(out.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 2, 8, 4, 1e-5, 0)
    with pytest.raises(TypeError, match="dtype code 7"):
        ext.rms_norm_cpu(out.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 2, 8, 8, 1e-5, 7)
    with pytest.raises(ValueError, match="non-null"):
        ext.rms_norm_cpu(0, 0, x.data_ptr(), x.data_ptr(), 2, 8, 8, 1e-5, 0)


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised on a machine without a GPU")
def test_cuda_call_without_gpu_raises_clear_error():
    ext = extension()
    if not ext.built_with_cuda:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            ext.cuda_device_count()
        return
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        ext.cuda_device_count()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        ext.rms_norm_cuda(x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 2, 8, 8, 1e-5, 0, 256, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("face", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4096), (3, 11008), (1, 8192)])
@pytest.mark.parametrize("fused", [False, True])
def test_faces_match_reference_gpu(face, dtype, shape, fused):
    x, res, w = _inputs(shape, dtype, "cuda")
    expected, expected_res = ops.rms_norm_reference(x, w, 1e-5, res if fused else None)
    out = poison(torch.empty_like(x))
    residual = res.clone() if fused else None
    ops.rms_norm(x, w, 1e-5, residual=residual, out=out, backend=face)
    torch.cuda.synchronize()
    _close(out, expected, dtype)
    if fused:
        assert torch.equal(residual, expected_res)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [7, 129, 1000, 4096])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_misaligned_and_strided_rows(dtype, hidden, offset, fused):
    """The CUDA kernel's 16-byte vectors where a row's pointers are aligned, elements elsewhere:
    x rows `offset` elements into a wider buffer (row stride hidden + 5: rows alternate
    alignment), weight, out and residual `offset` elements into theirs, odd hidden sizes."""
    rows = 5
    x_wide, res, w = _inputs((rows, hidden + 5), dtype, "cuda", seed=hidden + offset)
    x = x_wide[:, offset:offset + hidden]
    w = torch.cat([w[:offset], w[:hidden]]).contiguous()[offset:]
    res = torch.cat([res.flatten()[:offset], res[:, :hidden].flatten()])[offset:].view(rows, hidden)
    expected, expected_res = ops.rms_norm_reference(x, w, 1e-5, res if fused else None)
    out = poison(torch.empty(rows * hidden + offset, dtype=dtype, device="cuda"))[offset:].view(rows, hidden)
    ops.rms_norm(x, w, 1e-5, residual=res if fused else None, out=out, backend="cuda")
    torch.cuda.synchronize()
    _close(out, expected, dtype)
    if fused:
        assert torch.equal(res, expected_res)
