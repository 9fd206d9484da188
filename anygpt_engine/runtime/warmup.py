"""Start-up warm-up: run the shapes serving will meet before the first request does.

Triton compiles a kernel the first time it meets a new specialization (a GEMV row bucket, the
paged variant of the prefill attention, a sampler stage set), and that compile stalls the step
that met it for a second or more. Decode steps are captured as graphs at start-up already; this
runs the rest through the engine's own add_request/step path:
- prefills of 1, 2, 3, 5, 9, 17, 33 and 65 tokens, one per step: every power-of-two GEMV row
  bucket up to the crossover to cuBLAS and past it, and the LM head and sampler at one row;
- a prompt whose first blocks are cached (the prefill attention over paged context);
- greedy sampling, sampling with every stage (temperature, top-k, top-p, repetition penalty),
  and a 2-beam search;
then the engine's bookkeeping (scheduler, block manager, counters) starts fresh, so what a
warmed engine generates equals what a cold one would. Its seeds are fixed, so it never draws
from the engine's seed stream for unseeded requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from anygpt_engine.sampling import SamplingParams

PREFILL_LENGTHS = (1, 2, 3, 5, 9, 17, 33, 65)


@dataclass
class WarmUp:
    prefill_lengths: list[int]  # token counts of the prefill steps run
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache (paged prefill)
    steps: int
    seconds: float


def _prompt(length: int, vocab_size: int, salt: int) -> list[int]:
    # Text-range ids (low ids are text in every vocabulary); `salt` keeps prompts apart in the prefix cache.
    span = max(2, min(vocab_size, 32000) - 3)
    return [3 + (salt * 131 + 7 * i) % span for i in range(length)]


def warm_up(engine) -> WarmUp:
    """Runs the warm-up on an idle engine (see the module docstring) and resets its bookkeeping."""
    if engine.has_unfinished():
        raise RuntimeError("warm_up needs an idle engine: finish or abort the requests in flight first")
    start = time.perf_counter()
    vocab_size = engine.config.vocab_size
    block_size = engine.block_size
    # A prompt plus its 2 new tokens fits the context, one step's token budget and (for the beams' two
    # sequences) half the cache; the shapes past that can never occur in this engine anyway.
    room = engine.scheduler.blocks.usable_blocks * block_size // 2
    longest = min(engine.config.max_seq_len, engine.scheduler.max_num_batched_tokens, room) - 2
    lengths = [n for n in PREFILL_LENGTHS if n <= longest]
    greedy = SamplingParams(temperature=0.0, seed=0, max_new_tokens=2, stop_token_ids=())
    every_stage = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=0,
                                 max_new_tokens=2, stop_token_ids=())
    beams = SamplingParams(temperature=0.0, num_beams=2, seed=0, max_new_tokens=2, stop_token_ids=())
    cached = 2 * block_size
    runs = [(_prompt(n, vocab_size, n), greedy) for n in lengths]
    if cached + 1 <= longest:
        shared = _prompt(cached + 1, vocab_size, 1000)
        runs += [(shared, greedy), (shared, greedy)]  # the second finds the first's full blocks cached
    short = min(5, longest)
    if short >= 1:
        runs += [(_prompt(short, vocab_size, 2000), every_stage), (_prompt(short, vocab_size, 3000), beams)]
    steps = 0
    for i, (prompt, params) in enumerate(runs):  # one at a time: each prefill step holds one prompt
        engine.add_request(prompt, params, request_id=("warm-up", i))
        while engine.has_unfinished():
            engine.step()
            steps += 1
    summary = WarmUp(lengths, engine.scheduler.blocks.hit_tokens, steps, time.perf_counter() - start)
    engine._reset_bookkeeping()
    return summary
