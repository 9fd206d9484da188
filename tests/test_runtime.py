"""The serving API on the tiny preset (CPU, eager): continuous batching, prefix caching,
preemption and aborts never change what a request generates."""

import numpy as np
import pytest
import torch

from anygpt_engine import Engine, ModelConfig, SamplingParams
from greedy_margin import assert_greedy_agree_where_margins_allow

GREEDY = SamplingParams.greedy(12, stop_token_ids=())
PROMPTS = [[1, 5, 9, 200, 7], [1, 3], [1] + list(range(300, 340)), [1, 77, 78], [1, 9, 9, 9, 9, 9, 9, 9, 9, 10]]


@pytest.fixture(scope="module")
def reference():
    """Each prompt generated alone on a roomy engine."""
    engine = Engine("tiny", device="cpu", max_batch_size=4)
    return [engine.generate([p], GREEDY)[0] for p in PROMPTS]


def _drain(engine, outputs=None):
    outputs = {} if outputs is None else outputs
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs


def test_step_api_and_outputs(reference):
    engine = Engine("tiny", device="cpu")
    rid = engine.add_request(PROMPTS[0], GREEDY)
    assert engine.has_unfinished()
    first = engine.step()
    assert len(first) == 1 and first[0].request_id == rid and len(first[0].new_token_ids) == 1
    assert not first[0].finished and first[0].finish_reason is None
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert [t for o in first + outs for t in o.new_token_ids] == reference[0]
    stats = engine.stats()
    assert stats.used_blocks == 0 and stats.free_blocks + stats.cached_blocks == stats.total_blocks


def test_greedy_is_identical_alone_or_in_a_changing_batch(reference):
    engine = Engine("tiny", device="cpu", max_batch_size=3, max_num_batched_tokens=24)
    outputs, ids = {}, {}
    # Requests join at different steps; the batch grows, shrinks and chunked prefills interleave.
    for i, prompt in enumerate(PROMPTS):
        ids[engine.add_request(prompt, GREEDY)] = i
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    _drain(engine, outputs)
    assert [outputs[rid] for rid in sorted(ids, key=ids.get)] == reference


def test_one_steps_prefill_chunks_run_as_one_packed_forward(reference, monkeypatch):
    """Prompts admitted together prefill in one forward of all their tokens, each a run of the
    varlen attention; a prompt cut by the token budget continues next step as a run over its
    cached prefix, beside new prompts. Every request generates what it generates alone (alone,
    each prompt is one fresh run read packed; here runs also go through the paged cache)."""
    engine = Engine("tiny", device="cpu", max_batch_size=5, max_num_batched_tokens=40)
    prefills = []
    forward = engine.model.forward

    def spy(tokens, *args, runs=None, **kwargs):
        if runs is not None:
            prefills.append((tokens.shape[1], runs.cu_seqlens_q.tolist(), runs.kv_lens.tolist(), runs.fresh))
        return forward(tokens, *args, runs=runs, **kwargs)

    monkeypatch.setattr(engine.model, "forward", spy)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    outputs = _drain(engine)
    assert [outputs[rid] for rid in ids] == reference
    # Prompt lengths 5, 2, 41, 3, 10 under a budget of 40 tokens a step. The first step's runs all
    # start at position 0 (attention reads them packed); the second continues a cached prefix.
    assert prefills == [(40, [0, 5, 7, 40], [5, 2, 33], True), (21, [0, 8, 11, 21], [41, 3, 10], False)]


def test_preemption_recomputes_without_changing_outputs(reference):
    # 8 usable blocks of 16 tokens: all five prompts fit (7 blocks), their continuations do not.
    engine = Engine("tiny", device="cpu", num_blocks=9, max_batch_size=5)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    outputs = _drain(engine)
    assert engine.stats().preemptions > 0
    assert [outputs[rid] for rid in ids] == reference
    stats = engine.stats()
    assert stats.used_blocks == 0 and stats.free_blocks + stats.cached_blocks == 8


def test_sampled_outputs_survive_preemption():
    params = [SamplingParams(temperature=1.0, top_k=20, seed=s, max_new_tokens=20, stop_token_ids=())
              for s in range(5)]
    roomy = Engine("tiny", device="cpu", max_batch_size=5)
    expected = roomy.generate(PROMPTS, params)
    tight = Engine("tiny", device="cpu", num_blocks=10, max_batch_size=5)
    assert tight.generate(PROMPTS, params) == expected
    assert tight.stats().preemptions > 0


def test_shared_prefix_is_cached_and_reused(reference):
    engine = Engine("tiny", device="cpu")
    system = [1] + list(range(1000, 1047))  # 48 tokens: three full blocks
    a = engine.generate([system + [5, 6]], GREEDY)[0]
    hits = engine.stats().prefix_cache_hit_rate
    assert hits == 0
    b = engine.generate([system + [5, 6]], GREEDY)[0]
    assert b == a
    assert engine.stats().prefix_cache_hit_rate == pytest.approx(48 / 100)
    no_cache = Engine("tiny", device="cpu", enable_prefix_caching=False)
    assert no_cache.generate([system + [5, 6]], GREEDY)[0] == a


def test_abort_frees_everything():
    engine = Engine("tiny", device="cpu")
    keep = engine.add_request(PROMPTS[0], GREEDY)
    drop = engine.add_request(PROMPTS[2], GREEDY)
    engine.step()
    assert engine.abort(drop) is True
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == drop]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    _drain(engine)
    assert engine.stats().used_blocks == 0
    # Aborting a finished (or unknown) request is a no-op: a server aborting on disconnect may
    # race the request's last step.
    assert engine.abort(drop) is False and engine.abort(keep) is False and engine.abort("never") is False
    assert not engine.has_unfinished() and engine.step() == []
    assert keep == 0


def test_admission_errors():
    engine = Engine("tiny", device="cpu", num_blocks=4)  # 3 usable blocks = 48 tokens
    with pytest.raises(ValueError, match="needs 4 KV blocks .* the cache has 3"):
        engine.add_request([1] * 40, SamplingParams(max_new_tokens=20))
    rid = engine.add_request([1] * 10, SamplingParams(max_new_tokens=5), request_id="a")
    with pytest.raises(ValueError, match="request_id='a' is already in use"):
        engine.add_request([1], request_id="a")
    with pytest.raises(RuntimeError, match="generate\\(\\) drives the engine"):
        engine.generate([[1]])
    engine.abort(rid)
    _drain(engine)


def test_inputs_accept_tensors_and_dlpack(reference):
    engine = Engine("tiny", device="cpu")
    for prompt in (torch.tensor(PROMPTS[1]), np.array(PROMPTS[1], dtype=np.int64)):
        rid = engine.add_request(prompt, GREEDY)
        assert _drain(engine)[rid] == reference[1]
    out = engine.generate([PROMPTS[1]], GREEDY, return_tensors=True)[0]
    assert out.dtype == torch.int64 and out.tolist() == reference[1]


def test_two_engines_with_different_models_coexist():
    small = Engine(ModelConfig.preset("tiny").replace(num_layers=1, name="one-layer"), device="cpu", seed=1)
    tiny = Engine("tiny", device="cpu")
    a = small.add_request(PROMPTS[0], GREEDY)
    b = tiny.add_request(PROMPTS[0], GREEDY)
    outs_small, outs_tiny = {}, {}
    while small.has_unfinished() or tiny.has_unfinished():
        for out in small.step():
            outs_small.setdefault(out.request_id, []).extend(out.new_token_ids)
        for out in tiny.step():
            outs_tiny.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert outs_tiny[b] == Engine("tiny", device="cpu").generate([PROMPTS[0]], GREEDY)[0]
    assert outs_small[a] == Engine(small.config, device="cpu", seed=1).generate([PROMPTS[0]], GREEDY)[0]
    assert outs_small[a] != outs_tiny[b]


def test_decode_inside_a_modality_span_reads_only_its_head_rows():
    engine = Engine("tiny", device="cpu")
    end = engine.vocab.end_token("speech")
    prompts = [[1, 5, engine.vocab.start_token("speech")], [1, 6, 7, engine.vocab.start_token("speech")]]
    params = SamplingParams(temperature=1.5, seed=3, max_new_tokens=10, stop_token_ids=())
    out = engine.generate(prompts, params)
    # Decode step j runs both rows' token j - 1: the speech rows only while both spans are open.
    expected = 0
    for j in range(1, 10):
        both_open = all(end not in row[:j] for row in out)
        expected += 2 * (1026 if both_open else 53516)
    assert engine.head_rows_read == expected
    assert expected < 2 * 9 * 53516


def test_greedy_margin_rule_allows_near_ties_only(reference):
    """The rule the GPU tests compare rounding-different paths by (tests/greedy_margin.py): equal
    tokens pass; a divergence passes only where both picks are within 2 delta of the best logit."""
    engine = Engine("tiny", device="cpu", max_batch_size=1)
    prompts = PROMPTS[:2]
    assert assert_greedy_agree_where_margins_allow(reference[:2], reference[:2], prompts, engine, 1e-4) == 24
    step = 3
    logits = engine.logits(prompts[0] + reference[0][:step])[-1]
    top = logits.topk(2)
    assert top.indices[0].item() == reference[0][step]
    gap = (top.values[0] - top.values[1]).item() / logits.abs().max().item()
    runner_up = [reference[0][:step] + [top.indices[1].item()] + [0] * (11 - step), reference[1]]
    assert assert_greedy_agree_where_margins_allow(runner_up, reference[:2], prompts, engine, 0.6 * gap) == step + 12
    with pytest.raises(AssertionError, match="a decision with margin, so one path is wrong"):
        assert_greedy_agree_where_margins_allow(runner_up, reference[:2], prompts, engine, 0.4 * gap)
    far_off = [reference[0][:step] + [logits.argmin().item()] + [0] * (11 - step), reference[1]]
    with pytest.raises(AssertionError, match=f"at new token {step} got picked"):
        assert_greedy_agree_where_margins_allow(far_off, reference[:2], prompts, engine, 0.05)
