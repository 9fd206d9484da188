"""Start-up warm-up: run the shapes serving will meet before the first request does.

Triton compiles a kernel the first time it meets a new specialization (a GEMV row bucket, the
paged variant of the prefill attention, a sampler stage set), and that compile stalls the step
that met it for a second or more. Decode steps are captured as graphs at start-up already; this
runs the rest through the engine's own add_request/step path:
- prefills of 1, 2, 3, 5, 9, 17, 33 and 65 tokens, one per step: every power-of-two GEMV row
  bucket up to the crossover to cuBLAS and past it, and the LM head and sampler at one row;
- a prompt whose first blocks are cached (the prefill attention over paged context);
- the sampler's stage sets that serving's own parameters select (sampling.SamplerWork): greedy,
  SamplingParams() (the server's default: temperature only), each AnyGPT preset as one sequence
  (top-k; the speech and music ones with a repetition penalty; chat streams the "text" preset
  so), every stage, and the union of any of them (what a batch mixing them selects; another
  custom mix compiles on first use); then a 2-beam search;
- decode steps of 3, 5, 9 and 17 rows (capped at max_batch_size): an engine without CUDA graphs
  (cuda_graphs=False) decodes eagerly and meets the fused qkv + RoPE and LM head tiles per row
  bucket there (with graphs, their capture runs each bucket first anyway);
then the engine's bookkeeping (scheduler, block manager, counters) starts fresh, so what a
warmed engine generates equals what a cold one would. Its seeds are fixed, so it never draws
from the engine's seed stream for unseeded requests.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from anygpt_engine.sampling import ANYGPT_PRESETS, SamplerWork, SamplingParams

PREFILL_LENGTHS = (1, 2, 3, 5, 9, 17, 33, 65)
# One batch per row bucket of the decode tiles past 1 and 2 rows (the single requests and the
# beams decode those): as the prefill lengths, the first size of each power-of-two bucket.
DECODE_BATCHES = (3, 5, 9, 17)


@dataclass
class WarmUp:
    prefill_lengths: list[int]  # token counts of the prefill steps run
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache (paged prefill)
    sampler_stages: list[SamplerWork]  # the sampler stage sets run (prefill, and eager decode)
    decode_batches: list[int]  # rows of the multi-request decode steps run
    steps: int
    seconds: float


def _prompt(length: int, vocab_size: int, salt: int) -> list[int]:
    # Text-range ids (low ids are text in every vocabulary); `salt` keeps prompts apart in the prefix cache.
    span = max(2, min(vocab_size, 32000) - 3)
    return [3 + (salt * 131 + 7 * i) % span for i in range(length)]


def serving_sampler_stages() -> list[SamplerWork]:
    """The stage sets serving's own parameters select, closed under union (a batch selects the
    union of its requests' sets), greedy first and every stage last."""
    params = [SamplingParams(temperature=0.0), SamplingParams()]
    params += [SamplingParams.anygpt(name, num_beams=1) for name in ANYGPT_PRESETS]
    stages = {SamplerWork.for_params([p]) for p in params} | {SamplerWork.ALL}
    grown = True
    while grown:
        unions = {_union(a, b) for a in stages for b in stages}
        grown = not unions <= stages
        stages |= unions
    return sorted(stages, key=lambda w: (sum(dataclasses.astuple(w)), dataclasses.astuple(w)))


def _union(a: SamplerWork, b: SamplerWork) -> SamplerWork:
    return SamplerWork(*(x or y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))))


def _params_for(work: SamplerWork) -> SamplingParams:
    """A short fixed-seed request whose params select exactly `work`."""
    return SamplingParams(temperature=0.8 if work.random else 0.0, top_k=20 if work.top_k else 0,
                          top_p=0.9 if work.top_p else 1.0, repetition_penalty=1.1 if work.penalty else 1.0,
                          seed=0, max_new_tokens=2, stop_token_ids=())


def warm_up(engine) -> WarmUp:
    """Runs the warm-up on an idle engine (see the module docstring) and resets its bookkeeping."""
    if engine.has_unfinished():
        raise RuntimeError("warm_up needs an idle engine: finish or abort the requests in flight first")
    start = time.perf_counter()
    vocab_size = engine.config.vocab_size
    block_size = engine.block_size
    scheduler = engine.scheduler
    # A prompt plus its 2 new tokens fits the context, one step's token budget and (for the beams' two
    # sequences) half the cache; the shapes past that can never occur in this engine anyway.
    room = scheduler.blocks.usable_blocks * block_size // 2
    longest = min(engine.config.max_seq_len, scheduler.max_num_batched_tokens, room) - 2
    lengths = [n for n in PREFILL_LENGTHS if n <= longest]
    greedy = _params_for(SamplerWork(False, False, False, False))
    beams = SamplingParams(temperature=0.0, num_beams=2, seed=0, max_new_tokens=2, stop_token_ids=())
    cached = 2 * block_size
    groups = [[(_prompt(n, vocab_size, n), greedy)] for n in lengths]  # each group's requests run together
    if cached + 1 <= longest:
        shared = _prompt(cached + 1, vocab_size, 1000)
        groups += [[(shared, greedy)], [(shared, greedy)]]  # the second finds the first's full blocks cached
    short = min(5, longest)
    stages = [w for w in serving_sampler_stages() if w.random or w.penalty] if short >= 1 else []
    groups += [[(_prompt(short, vocab_size, 2000 + i), _params_for(w))] for i, w in enumerate(stages)]
    if short >= 1:
        groups.append([(_prompt(short, vocab_size, 3000), beams)])
    # Decode batches of 1-token prompts: all admitted in one step (rows, tokens and blocks allow), decoded in the next.
    blocks_each = -(-2 // block_size)
    batches = sorted({min(b, scheduler.max_batch_size) for b in DECODE_BATCHES} if longest >= 1 else set())
    batches = [b for b in batches if 3 <= b <= scheduler.max_num_batched_tokens
               and b * blocks_each <= scheduler.blocks.usable_blocks]
    groups += [[(_prompt(1, vocab_size, 4000 + 100 * b + i), greedy) for i in range(b)] for b in batches]
    steps = 0
    for g, group in enumerate(groups):  # one group at a time: a prefill step holds only its prompts
        for i, (prompt, params) in enumerate(group):
            engine.add_request(prompt, params, request_id=("warm-up", g, i))
        while engine.has_unfinished():
            engine.step()
            steps += 1
    ran_stages = ([SamplerWork.for_params([greedy])] if lengths else []) + stages
    summary = WarmUp(lengths, scheduler.blocks.hit_tokens, ran_stages, batches, steps, time.perf_counter() - start)
    engine._reset_bookkeeping()
    return summary
