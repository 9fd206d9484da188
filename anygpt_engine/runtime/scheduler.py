"""Continuous batching: which requests prefill and which decode in each engine step.

Host-side only (no tensors), so its invariants are testable without a model. Each step:
  1. every running request that has finished its prefill decodes one token; it needs room for
     that token in the cache, and when the pool has none the newest running request is
     preempted (blocks freed, to be recomputed later from its prompt and output so far);
  2. the rest of the token budget goes to prefill chunks: first requests part-way through
     their prefill, then waiting ones in arrival order (preempted requests keep their place).
A request keeps one sampling slot from admission to its end, preemption included.

A beam-search request (runtime/beams.py) is one entry here with `width` = its number of
beams: it reserves that many decode rows and sampling slots from admission, prefills its
prompt once, then decodes all its beams' sequences (`seq_ids`) together or not at all. When
it is preempted every beam's blocks are freed and it starts again from its prompt.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from anygpt_engine.runtime.kv_cache import BlockManager
from anygpt_engine.sampling import SamplingParams


class TokenView(Sequence):
    """Read-only concatenation of two lists: len() and indexing cost O(1), a slice only its span."""

    def __init__(self, head: list[int], tail: list[int]):
        self.head, self.tail = head, tail

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def __getitem__(self, index):
        n = len(self.head)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self.head[start:min(stop, n)] + self.tail[max(start - n, 0):max(stop - n, 0)]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.head[index] if index < n else self.tail[index - n]


@dataclass(eq=False)  # one object per request: identity, not a field-by-field comparison of token lists
class Request:
    request_id: object
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset
    max_new: int  # max_new_tokens, capped by the context
    arrival: int
    modality: int  # host copy of the constraint state (0 = no span open): picks the LM head rows
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    width: int = 1  # decode rows and sampling slots it holds: its number of beams
    extra_slots: list[int] = field(default_factory=list)  # the slots past the first, for beams 1..width-1
    seq_ids: list = None  # the sequences whose block tables it holds: itself, or its live beams
    beams: object = None  # the beam search state (runtime/beams.py), None for ordinary requests
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    prefilled: bool = False  # True once its tokens are all computed and it decodes
    finished: bool = False
    finish_reason: str | None = None

    def __post_init__(self):
        if self.seq_ids is None:
            self.seq_ids = [self.request_id]

    @property
    def tokens(self) -> "TokenView":
        """prompt + output, without copying either (decode steps ask for it per request)."""
        return TokenView(self.prompt, self.output)

    def __lt__(self, other: "Request") -> bool:  # waiting queue order
        return self.arrival < other.arrival


@dataclass
class PrefillChunk:
    request: Request
    start: int  # first token of the chunk
    end: int  # one past its last token

    @property
    def is_last(self) -> bool:
        """The chunk reaches the end of the request's tokens: its last logits are sampled."""
        return self.end == len(self.request.tokens)


@dataclass
class Schedule:
    decodes: list[Request]  # each decodes one token per sequence in its seq_ids
    prefills: list[PrefillChunk]
    preempted: list[Request]
    new_slots: list[Request]  # admitted for the first time: their sampling slot needs its state


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # admitted, sorted by arrival
        self.free_slots = list(range(max_batch_size - 1, -1, -1))
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def rows(self) -> int:
        """Decode rows the running requests hold."""
        return sum(r.width for r in self.running)

    def _free_tables(self, request: Request) -> None:
        for seq_id in request.seq_ids:
            if seq_id in self.blocks.tables:
                self.blocks.free(seq_id)
        request.seq_ids = [request.request_id]

    def remove(self, request: Request) -> None:
        """Drops a finished or aborted request and gives back its blocks and slots."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free_tables(request)
        if request.slot is not None:
            self.free_slots.append(request.slot)
            self.free_slots.extend(request.extra_slots)
            request.slot, request.extra_slots = None, []

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self._free_tables(victim)
        if victim.beams is not None:
            victim.beams.reset()
        victim.num_computed, victim.prefilled = 0, False
        bisect.insort(self.waiting, victim)
        self.num_preemptions += 1

    def schedule(self) -> Schedule:
        preempted: list[Request] = []
        decodes: list[Request] = []
        for request in [r for r in self.running if r.prefilled]:
            if request not in self.running:  # preempted earlier in this loop
                continue
            while self.blocks.blocks_needed(request.seq_ids, 1) > self.blocks.num_available():
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                for seq_id in request.seq_ids:
                    self.blocks.grow(seq_id, 1)
                decodes.append(request)

        budget = self.max_num_batched_tokens - sum(len(r.seq_ids) for r in decodes)
        prefills: list[PrefillChunk] = []
        new_slots: list[Request] = []
        for request in [r for r in self.running if not r.prefilled]:
            if budget <= 0:
                break
            n = min(len(request.tokens) - request.num_computed, budget)
            if not self.blocks.can_grow(request.request_id, n):
                break
            self.blocks.grow(request.request_id, n)
            prefills.append(PrefillChunk(request, request.num_computed, request.num_computed + n))
            budget -= n
        rows = self.rows()
        while self.waiting and budget > 0 and rows + self.waiting[0].width <= self.max_batch_size:
            request = self.waiting[0]
            if request.slot is None and len(self.free_slots) < request.width:
                break
            tokens = request.tokens
            cached = len(self.blocks.match_prefix(tokens)) * self.blocks.block_size
            n = min(len(tokens) - cached, budget)
            if not self.blocks.can_admit(tokens, n):
                break
            self.waiting.pop(0)
            cached = self.blocks.admit(request.request_id, tokens)
            self.blocks.grow(request.request_id, n)
            request.num_computed = cached
            if request.slot is None:
                request.slot = self.free_slots.pop()
                request.extra_slots = [self.free_slots.pop() for _ in range(request.width - 1)]
                new_slots.append(request)
            bisect.insort(self.running, request)
            rows += request.width
            prefills.append(PrefillChunk(request, cached, cached + n))
            budget -= n
        return Schedule(decodes, prefills, preempted, new_slots)
