"""Counting kernel launches per op call: how many kernels a decode step costs.

    with count_launches() as launches:
        model(...)
    launches.total, launches.by_op()     # e.g. {"linear": 4, "paged_decode_attention": 2, ...}

Every op records, at the point where it launches, the kernels it launches (a CUDA C++ or
Triton kernel, or a torch library call such as F.linear on the cuBLAS path). The torch
reference faces record nothing: they are many small torch ops by design. Counting happens on
the host when the launch is issued, so a CUDA graph capture counts what each replay runs.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field


@dataclass
class LaunchCount:
    calls: list[tuple[str, int]] = field(default_factory=list)  # (op, kernels launched) per op call

    @property
    def total(self) -> int:
        return sum(n for _, n in self.calls)

    def by_op(self) -> dict[str, int]:
        counts: dict[str, int] = collections.Counter()
        for op, n in self.calls:
            counts[op] += n
        return dict(counts)


_active: list[LaunchCount] = []


@contextlib.contextmanager
def count_launches():
    """Counts the launches of every op called inside the block (nested counters all count)."""
    counter = LaunchCount()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)


def record(op: str, kernels: int = 1) -> None:
    """Called by an op where it launches `kernels` kernels."""
    for counter in _active:
        counter.calls.append((op, kernels))
