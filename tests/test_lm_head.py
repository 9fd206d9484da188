"""The fused final-norm + LM head: restricted to a modality's rows it equals the full head on
those rows (bit for bit in each face) and never reads the others; bfloat16 (the GPU default) is
float32 accumulation of the normed input rounded at HF's points. Every test runs on the GPU when
one is present (gpu_path), on the CPU otherwise."""

import pytest
import torch

from anygpt_engine import Vocabulary
from anygpt_engine.ops.lm_head import lm_head, lm_head_reference
from anygpt_engine.ops.rms_norm import rms_norm_reference
from conftest import HAS_GPU, poison

pytestmark = pytest.mark.gpu_path

DEV = "cuda" if HAS_GPU else "cpu"


def _inputs(batch, hidden, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, hidden, generator=g) * 2).to(dtype).to(DEV)
    norm = (torch.rand(hidden, generator=g) + 0.5).to(dtype).to(DEV)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dtype).to(DEV)
    return x, norm, weight


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,batch", [(dtype, batch) for dtype in (torch.float32, torch.float16)
                                         for batch in (1, 7, 33, 70)] + [(torch.bfloat16, 7), (torch.bfloat16, 33)])
def test_restricted_rows_equal_the_full_head(backend, dtype, batch):
    x, norm, weight = _inputs(batch, 192, 1000, dtype)
    full = lm_head(x, norm, 1e-5, weight, out=poison(torch.empty(batch, 1000, device=DEV)), backend=backend)
    for first, count in ((0, 1000), (130, 258), (999, 1), (64, 64), (5, 7)):
        rows = torch.tensor([first, count], device=DEV)
        got = lm_head(x, norm, 1e-5, weight, rows=rows, out=poison(torch.empty(batch, 1000, device=DEV)),
                      backend=backend)
        inside = torch.zeros(1000, dtype=torch.bool, device=DEV)
        inside[first:first + count] = True
        assert torch.equal(got[:, inside], full[:, inside])
        assert torch.isneginf(got[:, ~inside]).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_triton_matches_reference(dtype, tol):
    x, norm, weight = _inputs(5, 256, 700, dtype, seed=1)
    ref = lm_head_reference(x, norm, 1e-5, weight)
    got = lm_head(x, norm, 1e-5, weight, backend="triton")
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("batch,hidden", [(1, 2048), (5, 1000), (33, 256)])
def test_bf16_head_is_float32_accumulation_of_the_rounded_norm(batch, hidden):
    """In bfloat16 the head rounds the normed input where HF does (ops.rms_norm), then sums the
    products in float32. Against a float64 dot of those same bfloat16 values, each logit may be off
    by float32 accumulation (hidden * 2^-23 of sum |h w|, any order, truncation allowed) plus one
    bfloat16 ulp of the largest product (the norm's float32 scale may land an ulp away from the
    reference's and flip a rounding). A flat tolerance would not see a lost k tile; this does."""
    x, norm, weight = _inputs(batch, hidden, 700, torch.bfloat16, seed=hidden)
    h = rms_norm_reference(x, norm, 1e-5)[0].double()
    products = h.abs() @ weight.double().abs().T
    bound = hidden * 2**-23 * products + 2**-7 * (h.abs().max(1, keepdim=True).values
                                                   * weight.double().abs().max(1).values)
    expected = h @ weight.double().T
    got = lm_head(x, norm, 1e-5, weight, out=poison(torch.empty(batch, 700, device=DEV)), backend="triton")
    excess = (got.double() - expected).abs() - bound
    assert bool((excess <= 0).all()), f"{int((excess > 0).sum())} logits past the bound, worst by {excess.max():.3g}"


def test_restricted_head_never_reads_other_rows():
    x, norm, weight = _inputs(3, 128, 600, torch.float32, seed=2)
    poisoned = weight.clone()
    rows = torch.tensor([200, 70], device=DEV)
    poisoned[:200] = float("nan")
    poisoned[270:] = float("nan")
    got = lm_head(x, norm, 1e-5, poisoned, rows=rows, backend="triton")
    expected = lm_head(x, norm, 1e-5, weight, rows=rows, backend="triton")
    assert torch.equal(got, expected)


def test_full_head_is_graph_capturable():
    """rows=None makes (0, vocab) with device ops only: a tensor from host data (torch.tensor, a
    host-to-device copy) is illegal inside CUDA graph capture. On a GPU the call is captured and
    replayed; on the CPU the ops it dispatches are recorded (torch.tensor shows as lift_fresh)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, norm, weight = _inputs(3, 128, 300, torch.float32, seed=4)
    expected = lm_head(x, norm, 1e-5, weight, rows=torch.tensor([0, 300], device=DEV), backend="triton")
    out = poison(torch.empty(3, 300, device=DEV))
    with Recorder() as recorder:
        lm_head(x, norm, 1e-5, weight, out=out, backend="triton")
    assert "aten.lift_fresh.default" not in recorder.ops, recorder.ops
    assert torch.equal(out, expected)
    if HAS_GPU:
        graph, out = torch.cuda.CUDAGraph(), poison(torch.empty(3, 300, device=DEV))
        with torch.cuda.graph(graph):
            lm_head(x, norm, 1e-5, weight, out=out, backend="triton")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


def test_speech_span_is_the_legal_rows():
    vocab = Vocabulary.anygpt()
    span = vocab.span("speech")
    first, count = span.first_value, span.end_token - span.first_value + 1
    assert count == 1026  # 1024 values, <sosp> (masked by the sampler), <eosp>
    assert first + count - 1 == vocab.end_token("speech")


def test_lm_head_argument_errors():
    x, norm, weight = _inputs(2, 64, 100, torch.float32)
    with pytest.raises(ValueError, match=r"norm_weight.shape=\(63,\)"):
        lm_head(x, norm[:63], 1e-5, weight)
    with pytest.raises(ValueError, match="weight.shape"):
        lm_head(x, norm, 1e-5, weight[:, :32])
    with pytest.raises(ValueError, match="rows must be an int64 tensor"):
        lm_head(x, norm, 1e-5, weight, rows=torch.tensor([0, 5], dtype=torch.int32, device=DEV))
