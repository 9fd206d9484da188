"""The dispatch point: a broken extension is imported once and reported once, and recordings say
which face each op ran."""

import builtins
import warnings

import pytest
import torch

from anygpt_engine.ops import _extension, backend
from anygpt_engine.ops.gemv import linear

GPU_FACES = ("cuda", "triton")
SUPPORTED = ("torch", "triton", "cuda")


@pytest.fixture
def broken_extension(monkeypatch):
    """`from anygpt_engine import _C` fails; yields the list of attempts."""
    attempts = []
    real_import = builtins.__import__

    def failing_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "anygpt_engine" and fromlist and "_C" in fromlist:
            attempts.append(name)
            raise ImportError("_C: undefined symbol (test)")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    _extension._import.cache_clear()
    backend._warn_cuda_kernels_missing.cache_clear()
    yield attempts
    _extension._import.cache_clear()
    backend._warn_cuda_kernels_missing.cache_clear()


def test_a_failed_import_is_attempted_once_and_raised_each_time(broken_extension):
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning):
        for _ in range(3):
            assert backend.choose("op", cpu, None, GPU_FACES, SUPPORTED) == "torch"
            assert backend.choose("op", torch.device("cuda"), None, GPU_FACES, SUPPORTED) == "triton"
            assert not _extension.has_extension() and not _extension.cuda_kernels_built()
    for _ in range(2):
        with pytest.raises(ImportError, match="undefined symbol") as raised:
            _extension.extension()
        assert "pip install -e ." in str(raised.value)
    assert broken_extension == ["anygpt_engine"]


def test_missing_cuda_kernels_warn_once_on_a_gpu_with_the_cause(broken_extension):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # choose only reads the device's type
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.choose("op", cpu, None, GPU_FACES, SUPPORTED)
        backend.choose("op", gpu, None, ("triton",), ("torch", "triton"))
        assert not caught  # no GPU op that prefers the CUDA face yet
        for _ in range(3):
            assert backend.choose("op", gpu, None, GPU_FACES, SUPPORTED) == "triton"
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "failed to import" in str(caught[0].message) and "undefined symbol" in str(caught[0].message)
    assert "Triton" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="backend='cuda' for op: anygpt_engine._C failed to import"):
        backend.choose("op", gpu, "cuda", GPU_FACES, SUPPORTED)


def test_an_extension_without_cuda_kernels_names_that_cause(monkeypatch):
    class CpuOnlyBuild:
        built_with_cuda = False

    monkeypatch.setattr(_extension, "_import", lambda: CpuOnlyBuild)
    assert _extension.has_extension() and not _extension.cuda_kernels_built()
    assert _extension.cuda_kernels_missing() == "anygpt_engine._C was built without CUDA kernels"
    backend._warn_cuda_kernels_missing.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="built without CUDA kernels"):
            assert backend.choose("op", torch.device("cuda"), None, GPU_FACES, SUPPORTED) == "triton"
    finally:
        backend._warn_cuda_kernels_missing.cache_clear()


def test_recording_counts_choices_inside_the_block_only():
    cpu = torch.device("cpu")
    backend.choose("before", cpu, None, GPU_FACES, SUPPORTED)
    with backend.recording() as outer:
        backend.choose("a", cpu, None, GPU_FACES, SUPPORTED)
        with backend.recording() as inner:
            backend.choose("a", cpu, "triton", GPU_FACES, SUPPORTED)
            backend.choose("b", cpu, "triton", GPU_FACES, SUPPORTED)
            assert backend.ran_instead("b", "triton", "torch") == "torch"
        backend.choose("c", cpu, "triton", GPU_FACES, SUPPORTED)
    backend.choose("after", cpu, None, GPU_FACES, SUPPORTED)
    assert inner.faces() == {"a": ["triton"], "b": ["torch"]}
    assert outer.faces() == {"a": ["torch", "triton"], "b": ["torch"], "c": ["triton"]}
    assert outer.counts["a"] == {"torch": 1, "triton": 1}


def test_a_linear_above_the_gemv_rows_records_the_library_face(monkeypatch):
    """ANYGPT_BACKEND picks the Triton GEMV, which takes at most max_m rows: 17 rows run on the
    library GEMM, and the record says so rather than 'triton'."""
    monkeypatch.setenv("ANYGPT_BACKEND", "linear=triton")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(17, 32, generator=g), torch.randn(24, 32, generator=g)
    with backend.recording() as record:
        y = linear(x, w)
    torch.testing.assert_close(y, x @ w.T)
    assert record.faces() == {"linear": ["cublas"]}
