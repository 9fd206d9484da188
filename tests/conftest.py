"""Shared test setup. TRITON_INTERPRET must be set before any @triton.jit function is defined,
so it is set here, before the kernels are imported, whenever no GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()

try:  # CI explores the same property-test examples every run, so a landing never hinges on luck.
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny ops (the codec networks): intra-op threads only add OpenMP
    barriers, which on a busy 2-core machine made such modules several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fills an output buffer with NaN so a kernel that skips elements cannot pass."""
    return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-1)
