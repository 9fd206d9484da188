"""CUDA graphs on the CPU, for the tests: torch.cuda's graph API replaced by a recorded eager call.
Capture records the step function's static input and output buffers; a replay reruns the step on
them into the same outputs, as a CUDA graph writes its static outputs. The engine then captures
its DecodeGraphs exactly as it does on a GPU (Engine._capture_decode_graphs)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import anygpt_engine.ops.sampling as sampling_ops


class _Graph:
    capturing = None
    captures = []  # each capture's options (stream, capture_error_mode, ...), for the tests

    def __init__(self):
        self.step = None

    def replay(self):
        self.step()


class HostSyncInCapture(RuntimeError):
    pass


class _NoHostSync(TorchDispatchMode):
    """Raises on the ops that read device values on the host (a CUDA graph capture fails on
    them): .item(), bool(tensor), indexing by a 0-d tensor, nonzero, masked_select."""

    SYNCING = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            raise HostSyncInCapture(f"{func._schema.name} reads a device value on the host inside a graph capture")
        return func(*args, **(kwargs or {}))


def _tolist_in_capture(self):
    raise HostSyncInCapture("Tensor.tolist() reads device values on the host inside a graph capture")


@contextlib.contextmanager
def _capture(graph, pool=None, **options):
    """Runs the captured body as a capture would let it: no host reads of device values. The
    sampler's value checks are exempt: on a GPU they are off (they run on CPU tensors only)."""
    _Graph.capturing = graph
    _Graph.captures.append(options)
    check_values, tolist = sampling_ops._check_values, torch.Tensor.tolist

    def unguarded_check_values(*args):
        with torch.utils._python_dispatch._disable_current_modes():
            torch.Tensor.tolist = tolist
            try:
                return check_values(*args)
            finally:
                torch.Tensor.tolist = _tolist_in_capture

    sampling_ops._check_values, torch.Tensor.tolist = unguarded_check_values, _tolist_in_capture
    try:
        with _NoHostSync():
            yield
    finally:
        sampling_ops._check_values, torch.Tensor.tolist = check_values, tolist
        _Graph.capturing = None


class _Stream:
    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None

    def wait_stream(self, other):
        pass


def patch_cuda(setattr_) -> None:
    """Replaces torch.cuda's graph API through `setattr_(torch.cuda, name, value)` (pytest's
    monkeypatch.setattr, or plain setattr in a worker process)."""
    for name, value in (("graph_pool_handle", lambda: None), ("Stream", _Stream), ("current_stream", _Stream),
                        ("stream", lambda stream: contextlib.nullcontext()), ("CUDAGraph", _Graph),
                        ("graph", _capture), ("synchronize", lambda device=None: None),
                        ("device", lambda device: contextlib.nullcontext())):
        setattr_(torch.cuda, name, value)


def _recorded(step_fn, model):
    """A replay recomputes the step into the captured outputs. A real replay runs no Python, so a
    tensor-parallel rank 0 replays in lockstep (it publishes nothing: the replay was published)."""
    lockstep = getattr(model, "in_lockstep", contextlib.nullcontext)

    def step(inputs, *args):
        outs = step_fn(inputs, *args)
        graph = _Graph.capturing
        if graph is not None:
            def replay():
                with lockstep():
                    for out, new in zip(outs, step_fn(inputs, *args)):
                        if out is not None:  # no sampled ids from a step without the sampler
                            out.copy_(new)
            graph.step = replay
        return outs
    return step


def stand_in_graphs(engine) -> None:
    """Captures `engine`'s decode graphs (patch_cuda first) as Engine() does on CUDA."""
    engine._decode_forward = _recorded(engine._decode_forward, engine.model)
    blocks_per_seq = -(-engine.config.max_seq_len // engine.block_size)
    engine.graphs = engine._capture_decode_graphs(engine.scheduler.max_batch_size, blocks_per_seq)
