"""NVTX ranges for Nsight Systems / Nsight Compute, off unless asked for.

Turn on with the environment variable ANYGPT_NVTX=1 or `profiling.enable()` (the
`anygpt-engine profile` command does). Off, `nvtx_range` returns a shared no-op context, so
the hot path pays one call. Ranges are host-side: inside a replayed CUDA graph only the
enclosing "anygpt/decode_step" range appears.

Stable range names (filter with `nsys ... --nvtx-capture` or `ncu --nvtx --nvtx-include`):
  anygpt/step          one Engine.step(): scheduling, prefill and decode
  anygpt/prefill       prefill of one request chunk
  anygpt/decode_step   one batched decode step (eager or graph replay)
  anygpt/graph_capture capturing the decode graphs at start-up
  anygpt/sample        the sampler
  anygpt/op/embedding, anygpt/op/attention, anygpt/op/mlp, anygpt/op/lm_head
"""

from __future__ import annotations

import contextlib
import os

_NULL = contextlib.nullcontext()
_enabled = os.environ.get("ANYGPT_NVTX", "0") not in ("", "0")
_push = _pop = None


def _bind() -> bool:
    """Finds an NVTX implementation: the nvtx package, else torch.cuda.nvtx when CUDA works."""
    global _push, _pop
    try:
        import nvtx

        _push, _pop = nvtx.push_range, nvtx.pop_range
        return True
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available():
        _push, _pop = torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
        return True
    return False


def enable(on: bool = True) -> bool:
    """Switches ranges on or off; returns whether they are on (False when no NVTX is usable)."""
    global _enabled
    _enabled = bool(on) and _bind()
    return _enabled


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _range(name: str):
    _push(name)
    try:
        yield
    finally:
        _pop()


def nvtx_range(name: str):
    return _range(name) if _enabled else _NULL


if _enabled:
    enable(True)
