"""CUDA-graph decode: one graph per (batch bucket, block-table width bucket), captured at
start-up and replayed every step.

Each graph owns fixed-address inputs (token ids, positions, cache slots, block tables,
sampling slots) and its outputs (the sampled ids and the float32 logits they came from, which
beam search reads). A step copies its batch into the smallest bucket that
holds it: padding rows run token 0 at position 0, write to the scratch block 0 and sample
into the scratch sampling slot, so they never touch a live request. Widths are block-table
columns; entries past a row's length point at block 0 and are hidden by the position mask,
so one graph serves every context length up to its width (no recapture per length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from anygpt_engine.profiling import nvtx_range


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from `start` up to the first one >= limit."""
    sizes = [start]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes


def bucket_for(sizes: list[int], n: int) -> int:
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


@dataclass
class DecodeInputs:
    tokens: torch.Tensor  # [B] i64
    positions: torch.Tensor  # [B] i64
    slot_mapping: torch.Tensor  # [B] i64: cache slot of each token
    block_tables: torch.Tensor  # [B, W] i64
    slots: torch.Tensor  # [B] i64: sampling-state slot of each row
    head_rows: torch.Tensor  # [2] i64: vocabulary rows the LM head reads (first, count)

    @classmethod
    def empty(cls, batch: int, width: int, scratch_slot: int, vocab_size: int, device) -> "DecodeInputs":
        """A graph's static inputs: views of one int64 buffer, so that `fill` is one host-to-device
        copy, from a staging buffer in pinned memory on CUDA (asynchronous: the host goes on with
        the step's bookkeeping while it and the replay run)."""
        device = torch.device(device)
        flat = torch.zeros(4 * batch + 2 + batch * width, dtype=torch.int64, device=device)
        tokens, positions, slot_mapping, slots = flat[:4 * batch].view(4, batch)
        inputs = cls(tokens, positions, slot_mapping, flat[4 * batch + 2:].view(batch, width), slots,
                     flat[4 * batch:4 * batch + 2])
        inputs.slots.fill_(scratch_slot)
        inputs.head_rows[1] = vocab_size
        inputs._flat = flat
        inputs._staging = torch.empty(flat.shape, dtype=torch.int64, pin_memory=device.type == "cuda")
        inputs._copied = torch.cuda.Event() if device.type == "cuda" else None
        return inputs

    def fill(self, host: "DecodeInputs", scratch_slot: int) -> None:
        """Copies a smaller host batch into these buffers and pads the rest: padding rows run
        token 0 at position 0 into cache slot 0 with an all-zero block table, sampled into
        `scratch_slot`; table columns past the batch's width are zero."""
        n, w = host.block_tables.shape
        batch, width = self.block_tables.shape
        staging = self._staging
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy out of staging is done (it always is by now)
        staging.zero_()
        rows = staging[:4 * batch].view(4, batch)
        for i, name in enumerate(("tokens", "positions", "slot_mapping", "slots")):
            rows[i, :n] = getattr(host, name)
        rows[3, n:] = scratch_slot
        staging[4 * batch:4 * batch + 2] = host.head_rows
        staging[4 * batch + 2:].view(batch, width)[:n, :w] = host.block_tables
        self._flat.copy_(staging, non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self._flat.device))


class DecodeGraphs:
    """Captured decode steps. `step_fn(inputs) -> tuple of tensors [B, ...]` must only do
    device work; `run` returns those outputs' first n rows."""

    def __init__(self, step_fn: Callable[[DecodeInputs], tuple[torch.Tensor, ...]], batch_sizes: list[int],
                 widths: list[int], scratch_slot: int, vocab_size: int, device: torch.device,
                 capture_error_mode: str = "global"):
        self.batch_sizes = batch_sizes
        self.widths = widths
        self.scratch_slot = scratch_slot
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, DecodeInputs, tuple]] = {}
        self.used: set[tuple[int, int]] = set()
        start = time.perf_counter()
        # Captured on a stream of the engine's own device, with that device current: torch's
        # default capture stream belongs to whichever device was current at the process's first
        # capture, and kernels on another device's stream would leave the graphs empty.
        with torch.cuda.device(device), nvtx_range("anygpt/graph_capture"):
            pool = torch.cuda.graph_pool_handle()
            capture = torch.cuda.Stream(device)
            # Largest first, so the shared pool is sized once by the biggest graph.
            for batch in reversed(batch_sizes):
                for width in reversed(widths):
                    inputs = DecodeInputs.empty(batch, width, scratch_slot, vocab_size, device)
                    side = torch.cuda.Stream(device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):
                        step_fn(inputs)  # warm-up: lazy initialisation stays out of the graph
                    torch.cuda.current_stream(device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=capture, capture_error_mode=capture_error_mode):
                        out = step_fn(inputs)
                    self._graphs[(batch, width)] = (graph, inputs, out)
            torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - start

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, host: DecodeInputs) -> tuple[torch.Tensor, ...]:
        n, w = host.block_tables.shape
        key = (bucket_for(self.batch_sizes, n), bucket_for(self.widths, w))
        graph, inputs, outputs = self._graphs[key]
        inputs.fill(host, self.scratch_slot)
        graph.replay()
        self.used.add(key)
        return tuple(out[:n] for out in outputs)
