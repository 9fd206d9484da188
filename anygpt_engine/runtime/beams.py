"""Beam search in the paged KV cache: transformers' beam search (temperature 0) and
beam-sample (temperature > 0), with the beams' histories shared block by block.

A request with num_beams = N > 1 is one scheduler entry of width N (scheduler.py). It prefills
its prompt once; the prompt's last logits give the first step's candidates. From then on it
decodes its live beams (up to N sequences) together in the engine's ordinary decode steps,
beside other requests, and after each step `BeamSearch.advance` turns their logits into the
next beams:

  device  per beam row: log_softmax of the logits, transformers' processors on the log-probs
          (repetition penalty, modality and min_new_tokens masks), for beam-sample its warpers
          (temperature, top-k, top-p, keeping max(2, n_stops + 1) tokens), plus the beam's running
          score; the row's top K (K = max(2, 1 + n_stops) * N) by that score, or, sampling, by
          that score plus Gumbel noise. Only [rows, K] values come back to the host.
  host    transformers' step (generation/utils.py `_beam_search`, 5.x) on those candidates: the
          best K over all beams (Gumbel-top-K over beams x vocabulary is sampling K without
          replacement from the softmax of the summed scores, as its torch.multinomial does;
          the drawn ones are then ordered by score); candidates among the first N that end in
          a stop token, or reach max_new_tokens, become finished hypotheses scored
          score / generated_length ** length_penalty (the N best kept); the first N others
          are the next beams; it stops when all N hypotheses are in and early_stopping is True,
          when no running beam can still beat the worst hypothesis (transformers' heuristic for
          False and "never"), or at max_new_tokens. The result is the best hypothesis.
  cache   new beams take their parents' block tables: a parent's first child keeps its table,
          others `fork` it (refcounts, nothing copied), parents without children are freed. A
          child writing into a partial last block it shares gets a copy of that one block
          (copy-on-write in the block manager), never of a history.
  state   a beam's sampling slot (seen tokens, open modality, generated count) is copied from
          its parent's slot and the new token recorded, on the device.

The noise of beam i at step t is keyed by (seed, i, t), so a request draws the same beams alone
or in any batch, and a preempted request, which restarts from its prompt, redoes the same
search. The decode step itself (graph-captured on CUDA) is unchanged: beam rows sample into
the scratch slot there and the engine hands their logits here; this module's device work runs
eagerly on the beam rows only. The request's output is its best sequence, delivered whole when
the search ends (nothing streams before). Where transformers would keep a finished beam running
(only when fewer than N unfinished candidates have a finite score, e.g. a top-k smaller than
K at the first step, where its multinomial raises) this search continues with fewer beams.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from anygpt_engine.runtime.kv_cache import BlockManager
from anygpt_engine.runtime.scheduler import TokenView
from anygpt_engine.sampling import (ModalityConstraint, SamplerWork, SamplingParams, SamplingState, process_logits,
                                    uniform_noise, warp_logits)

_BEAM_STREAM = 0x632BE5AB  # separates the noise streams of a request's beams


def beam_candidates(logits: torch.Tensor, slots: torch.Tensor, beam_index: torch.Tensor, running: torch.Tensor,
                    state: SamplingState, constraint: ModalityConstraint, k: int, min_keep: torch.Tensor,
                    work: SamplerWork = SamplerWork.ALL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each beam row's best k continuations: (scores, keys, ids), each [R, k], from float32
    logits [R, V]. scores = running [R] + the processed (and, for rows with temperature > 0,
    warped) log-probs; keys = scores, plus Gumbel noise keyed by (seed, beam_index, generated)
    where sampling; the k are the row's largest keys, best first. Reads the rows' sampling
    state (slots [R]) and changes nothing."""
    logits = logits.masked_fill(torch.isnan(logits), -math.inf)
    st = state.rows(slots)
    scores = process_logits(torch.log_softmax(logits, dim=1), st, constraint, work)
    if work.random:
        sampling = (st.temperature > 0).unsqueeze(1)
        scores = torch.where(sampling, warp_logits(scores, st, work, min_keep), scores)
    scores = running.unsqueeze(1) + scores
    keys = scores
    if work.random:
        noise = uniform_noise(st.seeds + beam_index * _BEAM_STREAM, st.generated, logits.shape[1])
        keys = torch.where(sampling, scores - torch.log(-torch.log(noise)), scores)
    top_keys, ids = keys.topk(min(k, keys.shape[1]), dim=1)
    return scores.gather(1, ids), top_keys, ids


def min_tokens_to_keep(num_stops: int) -> int:
    """Tokens beam-sample's top-k and top-p always keep (transformers' rule for beams: one more
    than the eos tokens, at least 2), so unfinished continuations survive the warpers."""
    return max(2, num_stops + 1)


@dataclass(frozen=True)
class BeamSeqId:
    """Block-table key of a forked beam: never equal to a request id."""

    request_id: object
    number: int


@dataclass
class Beam:
    seq_id: object  # its block table in the block manager
    output: list[int]  # generated tokens
    score: float  # summed processed log-probs (a float32 value)


@dataclass
class Candidate:
    key: float
    score: float
    row: int  # the beam it extends
    token: int


class BeamGroup:
    """One request's beams and finished hypotheses (host state; the algorithm in the module
    docstring). Beam i uses sampling slot `slot(i)`."""

    def __init__(self, request, params: SamplingParams):
        self.request = request
        self.num_beams = params.num_beams
        self.num_candidates = max(2, 1 + len(request.stop_ids)) * params.num_beams
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.sampling = params.temperature > 0
        self._numbers = itertools.count()
        self.reset()
        self.slot_at_prompt = True  # the engine assigns the first slot when it admits the request

    def reset(self) -> None:
        """Back to the prompt: its own block table is the one beam, no hypotheses (the
        scheduler calls this when it preempts the request; its first slot then holds beam 0's
        state, not the prompt's)."""
        self.slot_at_prompt = False
        self.beams = [Beam(self.request.request_id, [], 0.0)]
        self.hypotheses: list[tuple[float, list[int]]] = []  # (score, tokens), best first, at most N
        self.steps = 0
        self.improvable = True  # transformers' early-stop heuristic is still unsatisfied
        self.done = False

    @property
    def started(self) -> bool:
        return self.steps > 0

    def new_seq_id(self) -> BeamSeqId:
        return BeamSeqId(self.request.request_id, next(self._numbers))

    def slot(self, i: int) -> int:
        return self.request.slot if i == 0 else self.request.extra_slots[i - 1]

    def sequences(self) -> list[tuple[object, list[int]]]:
        """(block-table key, prompt + output) of each live beam, in beam order."""
        return [(beam.seq_id, TokenView(self.request.prompt, beam.output)) for beam in self.beams]

    def select(self, scores: list[list[float]], keys: list[list[float]], ids: list[list[int]]) -> list[Candidate]:
        """One step of transformers' beam search on host copies of the live beams' candidates
        (row i extends beams[i]): updates the hypotheses and the stop state and returns the
        next beams' candidates (empty once done)."""
        n, f32 = self.num_beams, np.float32
        stops, max_new, penalty = self.request.stop_ids, self.request.max_new, self.length_penalty
        pool = [Candidate(key, score, row, token)
                for row, (row_keys, row_scores, row_ids) in enumerate(zip(keys, scores, ids))
                for key, score, token in zip(row_keys, row_scores, row_ids) if score > -math.inf]
        # Best K keys over beams x vocabulary (ties: lower beam, then lower token, as in the
        # flattened order); drawn candidates are then ordered by score, as transformers does.
        top = sorted(pool, key=lambda c: (-c.key, c.row, c.token))[:self.num_candidates]
        if self.sampling:
            top.sort(key=lambda c: -c.score)
        generated = self.steps + 1
        hits = [c.token in stops or generated >= max_new for c in top]
        full = len(self.hypotheses) >= n
        if self.improvable and not (self.early_stopping is True and full):
            denominator = f32(generated ** penalty)
            for c, hit in zip(top[:n], hits):
                if hit:
                    self.hypotheses.append((float(f32(c.score) / denominator), self.beams[c.row].output + [c.token]))
            self.hypotheses.sort(key=lambda h: -h[0])
            del self.hypotheses[n:]
        children = [c for c, hit in zip(top, hits) if not hit][:n]
        self.steps = generated
        full = len(self.hypotheses) >= n
        if children and full:
            best_length = max_new if self.early_stopping == "never" and penalty > 0 else generated
            best_possible = f32(children[0].score) / f32(best_length ** penalty)
            self.improvable = self.improvable and bool(best_possible > f32(self.hypotheses[-1][0]))
        self.done = not children or not self.improvable or (self.early_stopping is True and full)
        return [] if self.done else children

    def result(self) -> tuple[list[int], str]:
        """The best finished sequence and why it ended ('stop' or 'length')."""
        if self.hypotheses:
            tokens = self.hypotheses[0][1]
        else:  # no candidate had a finite score: the best beam so far
            tokens = self.beams[0].output
        return tokens, "stop" if tokens and tokens[-1] in self.request.stop_ids else "length"


class BeamSearch:
    """Advances an engine's beam groups after each step (see the module docstring)."""

    def __init__(self, blocks: BlockManager, state: SamplingState, constraint: ModalityConstraint):
        self.blocks = blocks
        self.state = state
        self.constraint = constraint

    def advance(self, groups: list[BeamGroup], logits: torch.Tensor) -> list[BeamGroup]:
        """groups: those whose prompt completed this step (one logits row: the first step) or
        whose beams decoded (a row per live beam, in beam order); logits: their rows, in that
        order. Moves every group one step; returns those that finished (their tables and slots
        are the caller's to release)."""
        device = logits.device
        rows = []  # (slot, beam index, running score, min_keep) per logits row
        for group in groups:
            if not group.started and not group.slot_at_prompt:  # restarting after a preemption
                r = group.request
                self.state.assign(r.slot, r.params, r.seed, r.prompt, tuple(r.stop_ids), r.modality)
            keep = min_tokens_to_keep(len(group.request.stop_ids))
            rows += [(group.slot(i), i, beam.score, keep) for i, beam in enumerate(group.beams)]
        if len(rows) != logits.shape[0]:
            raise ValueError(f"logits has {logits.shape[0]} rows, the groups' live beams {len(rows)}")
        slots, index, running, keep = zip(*rows)
        slots, index, keep = torch.tensor([slots, index, keep], device=device)  # one copy to the device
        candidates = beam_candidates(
            logits, slots, index, torch.tensor(running, dtype=torch.float32, device=device), self.state,
            self.constraint, max(g.num_candidates for g in groups), keep,
            SamplerWork.for_params([g.request.params for g in groups]))
        # One copy back: token ids (< 2^24) are exact in float32.
        scores, keys, ids = torch.stack([c.float() for c in candidates]).tolist()
        ids = [[int(token) for token in row] for row in ids]

        finished, moves, appended = [], {}, ([], [])
        start = 0
        for group in groups:
            end = start + len(group.beams)
            started = group.started
            children = group.select(scores[start:end], keys[start:end], ids[start:end])
            start = end
            if group.done:
                finished.append(group)
                continue
            self._reorder(group, children)
            # A new group's beams take all of the prompt's slot; later, beams differ only in
            # their state (seen tokens only matter to a repetition penalty).
            fields = (("generated", "open_modality") + ("seen",) * (group.request.params.repetition_penalty != 1)
                      if started else None)
            src, dst = moves.setdefault(fields, ([], []))
            src += [group.slot(c.row) for c in children]
            dst += [group.slot(i) for i in range(len(children))]
            appended[0].extend(dst[-len(children):])
            appended[1].extend(c.token for c in children)
        for fields, (src, dst) in moves.items():
            self.state.copy(torch.tensor(dst, device=device), torch.tensor(src, device=device), fields)
        if appended[0]:
            self.state.append(torch.tensor(appended[0], device=device), torch.tensor(appended[1], device=device),
                              self.constraint)
        return finished

    def _reorder(self, group: BeamGroup, children: list[Candidate]) -> None:
        """The children become the beams: a parent's first child keeps its block table, the
        others fork it, parents without children are freed."""
        old, kept, beams = group.beams, set(), []
        for c in children:
            parent = old[c.row]
            if c.row in kept:
                seq_id = group.new_seq_id()
                self.blocks.fork(parent.seq_id, seq_id)
            else:
                seq_id = parent.seq_id
                kept.add(c.row)
            beams.append(Beam(seq_id, parent.output + [c.token], c.score))
        for row, beam in enumerate(old):
            if row not in kept:
                self.blocks.free(beam.seq_id)
        group.beams = beams
        group.request.seq_ids = [beam.seq_id for beam in beams]
