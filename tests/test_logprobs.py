"""SamplingParams.logprobs: each sampled token's log-probability and its top alternatives,
against a log-softmax of the engine's own prompt logits (Engine.logits) over the tokens legal in
the request's modality state; the same whatever else is in the batch; checked arguments."""

import math

import pytest
import torch

from anygpt_engine import Engine, ModelConfig, SamplingParams, Vocabulary
from anygpt_engine.vocab import ModalitySpan

pytestmark = pytest.mark.usefixtures("one_thread")

SPEECH = ModalitySpan(400, 200, 600, 601)  # values are ids 400..599, <sosp> 600, <eosp> 601
CONFIG = ModelConfig.preset("tiny").replace(max_seq_len=64, vocab_size=640, name="tiny-640")


@pytest.fixture(scope="module")
def engine():
    return Engine(CONFIG, device="cpu", block_size=4, vocab=Vocabulary(640, {"speech": SPEECH}))


def reference(engine, prompt, output, n):
    """(logprob of each output token, its top-n (id, logprob)) from full-sequence logits."""
    logits = engine.logits(prompt + output[:-1])[len(prompt) - 1:]
    state, rows = engine.constraint.state_after(prompt), []
    for i, token in enumerate(output):
        x = logits[i].masked_fill(~engine.constraint.allowed[state].cpu(), -math.inf).log_softmax(-1)
        values, ids = x.topk(n)
        rows.append((x[token].item(), [(t, v) for t, v in zip(ids.tolist(), values.tolist()) if v > -math.inf]))
        state = engine.constraint.state_after([token], state)
    return rows


def test_logprobs_match_a_log_softmax_of_the_prompt_logits(engine):
    prompts = [[1, 5, 9, 200, 7], [1, 3], [1, 88, 600, 410]]  # the last opens a speech span
    params = [SamplingParams.greedy(6, logprobs=3, stop_token_ids=()),
              SamplingParams(temperature=0.9, top_k=40, seed=5, max_new_tokens=5, logprobs=0, stop_token_ids=()),
              SamplingParams(temperature=1.0, seed=2, max_new_tokens=4, logprobs=20, stop_token_ids=())]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids) == 1
            outputs[out.request_id] += [(out.new_token_ids[0], out.logprobs[0])]
    for rid, prompt, sp in zip(ids, prompts, params):
        tokens = [t for t, _ in outputs[rid]]
        for (token, got), (logprob, top) in zip(outputs[rid], reference(engine, prompt, tokens, sp.logprobs)):
            assert got.token_id == token and got.logprob == pytest.approx(logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in top] and len(got.top) == min(sp.logprobs, len(top))
            assert [v for _, v in got.top] == pytest.approx([v for _, v in top], abs=1e-4)
            assert got.top == sorted(got.top, key=lambda tv: -tv[1])
            if sp.temperature == 0:
                assert got.top[0][0] == token and got.logprob == got.top[0][1]
    in_span = []  # inside the span only its values and <eosp> are legal: no alternative is anything else
    for token, lp in outputs[ids[2]]:
        in_span.append(lp)
        if token == SPEECH.end_token:
            break
    assert all(t in SPEECH.values or t == SPEECH.end_token for lp in in_span for t, _ in lp.top)
    assert len(in_span[0].top) == 20


def test_logprobs_do_not_depend_on_the_batch(engine):
    """Alone, a request inside a speech span reads only the span's LM head rows; beside a text
    request the head reads the whole vocabulary. Its log-probabilities are the same."""
    prompt, sp = [1, 88, 600, 410], SamplingParams.greedy(4, logprobs=5, stop_token_ids=())

    def run(others):
        rid = engine.add_request(prompt, sp)
        for other in others:
            engine.add_request(other, SamplingParams.greedy(4, stop_token_ids=()))
        got = []
        while engine.has_unfinished():
            got += [out.logprobs[0] for out in engine.step() if out.request_id == rid]
        return got

    alone, beside = run([]), run([[1, 2, 3, 4, 5, 6]])
    assert [lp.token_id for lp in alone] == [lp.token_id for lp in beside]
    for a, b in zip(alone, beside):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_requests_without_logprobs_get_none(engine):
    rid = engine.add_request([1, 2, 3], SamplingParams.greedy(2))
    while engine.has_unfinished():
        assert all(out.logprobs is None for out in engine.step() if out.request_id == rid)


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0])
def test_logprobs_argument_is_checked(bad):
    with pytest.raises(ValueError, match=rf"SamplingParams.logprobs={bad!r}, expected None or an int in 0..20"):
        SamplingParams(logprobs=bad)
    with pytest.raises(ValueError, match="logprobs=2 with num_beams=3"):
        SamplingParams(logprobs=2, num_beams=3)


def test_prompt_logprobs_score_what_generation_sampled(engine):
    """prompt_logprobs over prompt + output gives the output tokens the log-probabilities their
    sampling reported (one forward over the whole sequence against step-by-step decoding); the
    first token has none; inside a speech span the constraint applies as in sampling."""
    prompt = [1, 88, 600, 410]
    rid = engine.add_request(prompt, SamplingParams(temperature=1.0, seed=4, max_new_tokens=6, logprobs=4,
                                                   stop_token_ids=()))
    sampled = []
    while engine.has_unfinished():
        sampled += [lp for out in engine.step() if out.request_id == rid for lp in out.logprobs]
    scored = engine.prompt_logprobs(prompt + [lp.token_id for lp in sampled], top=4)
    assert scored[0] is None and len(scored) == len(prompt) + len(sampled)
    for got, want in zip(scored[len(prompt):], sampled):
        assert got.token_id == want.token_id and got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
    assert scored[3].logprob > -math.inf and all(t in SPEECH.values or t == SPEECH.end_token
                                                 for t, _ in scored[3].top)  # 410 inside the span
    chunked = engine.prompt_logprobs(prompt + [lp.token_id for lp in sampled], top=4, rows_per_chunk=3)
    assert chunked[0] is None  # the LM head in chunks of 3 positions: the same entries, to float rounding
    for a, b in zip(chunked[1:], scored[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert engine.prompt_logprobs([5]) == [None]
    with pytest.raises(ValueError, match="top=21, expected an int in 0..20"):
        engine.prompt_logprobs(prompt, top=21)
