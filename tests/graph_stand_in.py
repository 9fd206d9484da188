"""CUDA graphs on the CPU, for the tests: torch.cuda's graph API replaced by a recorded eager call.
Capture records the step function's static input and output buffers; a replay reruns the step on
them into the same outputs, as a CUDA graph writes its static outputs. The engine then captures
its DecodeGraphs exactly as it does on a GPU (Engine._capture_decode_graphs)."""

from __future__ import annotations

import contextlib

import torch


class _Graph:
    capturing = None

    def __init__(self):
        self.step = None

    def replay(self):
        self.step()


@contextlib.contextmanager
def _capture(graph, pool=None, **options):
    _Graph.capturing = graph
    try:
        yield
    finally:
        _Graph.capturing = None


class _Stream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


def patch_cuda(setattr_) -> None:
    """Replaces torch.cuda's graph API through `setattr_(torch.cuda, name, value)` (pytest's
    monkeypatch.setattr, or plain setattr in a worker process)."""
    for name, value in (("graph_pool_handle", lambda: None), ("Stream", _Stream), ("current_stream", _Stream),
                        ("stream", lambda stream: contextlib.nullcontext()), ("CUDAGraph", _Graph),
                        ("graph", _capture), ("synchronize", lambda device=None: None)):
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
