"""Kernel launches of a decode step on the kernel faces: 6 per layer (the fused qkv + RoPE + KV
append, the split-context decode attention and its merge, wo + residual, the normed gate/up
with SiLU * up, w2 + residual; split-K or not), counted by ops.count_launches and cross-checked against every
op the dispatcher runs, so no torch kernel hides between them."""

import dataclasses
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anygpt_engine import ModelConfig, ops
from anygpt_engine.models.llama import Llama
from anygpt_engine.runtime.kv_cache import PagedKVCache

# Ops that launch nothing: views, metadata and allocations.
_NO_KERNEL = ("view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose",
              "permute", "alias", "detach", "as_strided", "empty", "empty_strided", "split", "reshape")


class _Dispatched(TorchDispatchMode):
    """Every op the dispatcher runs (an engine kernel op counts once, whatever it launches)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _decode_step(num_layers: int, batch: int):
    config = dataclasses.replace(ModelConfig.preset("tiny"), num_layers=num_layers)
    model = Llama(config, dtype=torch.float32)
    model.init_random(0)
    kv = PagedKVCache(config, 1 + batch, 16, "cpu", torch.float32)
    tokens = torch.arange(5, 5 + batch)[:, None]
    positions = torch.full((batch, 1), 9)
    tables = torch.arange(1, 1 + batch)[:, None]
    slots = tables * 16 + 9
    with torch.inference_mode(), ops.count_launches() as launches, _Dispatched() as dispatched:
        model(tokens, positions, kv.layers, slots, tables)
    kernels = Counter(op for op in dispatched.ops if op not in _NO_KERNEL)
    return launches, kernels


# Tiles small enough that the tiny model's projections split K (into 2-4 ranges): still one
# launch each, the split ranges reduced inside it.
_SPLIT_K = dict(sms=64, split_min_k=32, fma_block_n=256, fma_elements=16384)


@pytest.mark.parametrize("batch,split", [(1, False), (3, False), (1, True)])
def test_decode_step_launches_six_kernels_per_layer(monkeypatch, batch, split):
    from anygpt_engine import tuning
    from anygpt_engine.kernels import gemv as kernels

    monkeypatch.setenv("ANYGPT_BACKEND", "triton")
    splits = []
    for name in ("gemv", "qkv_rope"):
        launch = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, launch=launch, **kw: (splits.append(kw.get("splits", 1)),
                                                                            launch(*a, **kw))[1])
    with tuning.override("gemv", **(_SPLIT_K if split else {})):
        one, kernels_one = _decode_step(1, batch)
        two, kernels_two = _decode_step(2, batch)
    if split:
        assert min(splits) > 1
    per_layer = {op: two.by_op().get(op, 0) - one.by_op().get(op, 0) for op in two.by_op()}
    assert per_layer == {"linear_rope_kv_append": 1, "paged_decode_attention": 2, "linear": 3}
    assert sum(per_layer.values()) == 6
    assert two.total == 2 * one.total == 12  # nothing else is counted: no per-step norm, no copies
    # What the dispatcher runs per layer is exactly those ops: nothing uncounted in between.
    assert kernels_two - kernels_one == Counter({"qkv_rope_kernel": 1, "paged_decode_attention_kernel": 1,
                                                 "linear_kernel": 3})


def test_the_reference_face_records_no_launches(monkeypatch):
    """The torch reference is many small torch ops by design: the counter counts the engine's
    kernels (and library calls on the cuBLAS path) only."""
    monkeypatch.setenv("ANYGPT_BACKEND", "torch")
    launches, kernels = _decode_step(1, 1)
    assert launches.total == 0 and kernels["linear"] >= 4


@pytest.mark.gpu
@pytest.mark.parametrize("linear_face", ["triton", "cuda"])
def test_decode_step_runs_six_device_kernels_per_layer_on_a_gpu(monkeypatch, linear_face):
    """The profiler's own count of device activity (kernels, memsets, copies) per layer of a
    batch-1 bf16 decode step, with the GEMV on each face (the fused qkv + RoPE is Triton's)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("ANYGPT_BACKEND", f"linear={linear_face}")

    def device_events(num_layers):
        config = dataclasses.replace(ModelConfig.preset("tiny"), num_layers=num_layers, dtype="bfloat16")
        model = Llama(config, device="cuda", dtype=torch.bfloat16)
        model.init_random(0)
        kv = PagedKVCache(config, 2, 16, "cuda", torch.bfloat16)
        args = [torch.tensor([[5]]), torch.tensor([[9]]), kv.layers, torch.tensor([[25]]), torch.tensor([[1]])]
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        with torch.inference_mode():
            model(*args)  # compiles the Triton kernels
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(*args)
                torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    assert device_events(3) - device_events(2) == 6
