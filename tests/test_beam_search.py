"""Beam search (runtime/beams.py) against transformers' generate(num_beams=N) on the same tiny
random weights, and its life in the paged cache: shared blocks, copy-on-write of one block,
batching with ordinary requests, preemption, aborts, no leaks."""

import collections
import dataclasses
import math
import random

import pytest
import torch
from test_llama_vs_hf import _save_tiny_llama

from anygpt_engine import Engine, ModelConfig, SamplingParams

transformers = pytest.importorskip("transformers")

EOS = 2
PROMPTS = [[1, 17, 250, 3, 99, 42, 7], [1, 5], [1, 200, 100, 33, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


def _save_model_with_frequent_eos(path, kind):
    """The tiny random llama of test_llama_vs_hf with eos's LM head row pointed where common
    tokens point, so beams often end in eos: hypotheses, early stopping and the length
    penalty all matter (about half of the searches below end in eos, half at max length)."""
    model = _save_tiny_llama(path, kind)
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[3:60].mean(0) * 16
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=["mha", "gqa"])
def hf_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"beam-{request.param}")
    model = _save_model_with_frequent_eos(path, request.param)
    return model, Engine(path, device="cpu", dtype=torch.float32, max_batch_size=16)


def _hf_beams(model, prompt, num_beams, max_new_tokens, **kwargs):
    """transformers' best sequence, cut after its first eos (it pads finished beams with eos)."""
    out = model.generate(torch.tensor([prompt]), num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=0, top_k=None, top_p=None, temperature=None, **kwargs)[0, len(prompt):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


def test_greedy_beams_match_transformers(hf_pair):
    """N = 1, 2, 5 on three prompts, all nine requests in one engine batch (beam groups of
    different widths decoding in the same steps; N = 1 is an ordinary greedy request)."""
    model, engine = hf_pair
    cases = [(n, p) for n in (1, 2, 5) for p in PROMPTS]
    expected = [_hf_beams(model, p, n, 16) for n, p in cases]
    got = engine.generate([p for _, p in cases], [SamplingParams.greedy(16, num_beams=n) for n, _ in cases])
    assert got == expected
    ended = [out[-1] == EOS for out in expected]
    assert any(ended) and not all(ended)  # both ways of finishing are exercised
    assert engine.stats().used_blocks == 0
    engine.scheduler.blocks.check()


@pytest.mark.parametrize("hf_pair", ["gqa"], indirect=True)
@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,extra", [
    (3, 2.0, True, {}), (3, 0.0, "never", {}), (4, -1.0, False, {}), (2, 2.0, "never", {}),
    (3, 1.0, False, dict(min_new_tokens=6)), (3, 1.0, False, dict(repetition_penalty=1.3)),
])
def test_length_penalty_early_stopping_and_processors_match_transformers(hf_pair, num_beams, length_penalty,
                                                                         early_stopping, extra):
    model, engine = hf_pair
    kwargs = dict(length_penalty=length_penalty, early_stopping=early_stopping, **extra)
    expected = [_hf_beams(model, p, num_beams, 14, **kwargs) for p in PROMPTS[:2]]
    params = SamplingParams.greedy(14, num_beams=num_beams, **kwargs)
    assert engine.generate(PROMPTS[:2], params) == expected


def test_low_temperature_beam_sample_is_beam_search(hf_pair):
    """Beam-sample warps log-probs by 1/T before summing; at T = 1e-3 the Gumbel noise cannot
    reorder candidates, and scores scaled by 1/T rank hypotheses as the unscaled ones do."""
    _, engine = hf_pair
    greedy = engine.generate(PROMPTS, SamplingParams.greedy(14, num_beams=3))
    cold = engine.generate(PROMPTS, [SamplingParams(temperature=1e-3, num_beams=3, max_new_tokens=14, seed=s)
                                     for s in range(3)])
    assert cold == greedy


def _chi_square_two_sample(a: collections.Counter, b: collections.Counter) -> tuple[float, int]:
    """Pearson's statistic for two equal-sized samples over pooled categories (counts < 10
    together go to one 'other' category) and its degrees of freedom."""
    rows, other = [], [0, 0]
    for c in set(a) | set(b):
        if a[c] + b[c] >= 10:
            rows.append((a[c], b[c]))
        else:
            other[0] += a[c]
            other[1] += b[c]
    if sum(other):
        rows.append(tuple(other))
    chi2 = sum((x - (x + y) / 2) ** 2 / ((x + y) / 2) * 2 for x, y in rows)
    return chi2, len(rows) - 1


def test_beam_sample_follows_transformers_beam_sample(tmp_path):
    """The best sequences of 400 beam-sample searches (N = 2, top_k 4, 3 tokens: a dozen
    outcomes) from transformers' sampler and from ours come from the same distribution
    (two-sample chi-square at p = 1e-4). Our noise is counter-based, so only the law can agree."""
    model = _save_model_with_frequent_eos(tmp_path, "mha")
    draws, prompt = 400, [1, 44, 45]
    torch.manual_seed(0)
    out = model.generate(torch.tensor([prompt] * draws), num_beams=2, do_sample=True, top_k=4, temperature=1.0,
                         max_new_tokens=3, pad_token_id=0)[:, len(prompt):].tolist()
    theirs = collections.Counter(tuple(o[:o.index(EOS) + 1] if EOS in o else o) for o in out)
    engine = Engine(tmp_path, device="cpu", dtype=torch.float32, max_batch_size=2 * draws, num_blocks=4 * draws + 1)
    params = [SamplingParams(temperature=1.0, top_k=4, num_beams=2, max_new_tokens=3, seed=s) for s in range(draws)]
    ours = collections.Counter(tuple(o) for o in engine.generate([prompt] * draws, params))
    chi2, df = _chi_square_two_sample(theirs, ours)
    assert df >= 3, (theirs, ours)  # enough outcomes to tell distributions apart
    threshold = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3  # chi-square(df) 1 - 1e-4 quantile
    assert chi2 < threshold, (chi2, df, theirs, ours)


def test_one_beam_sample_draw_follows_transformers_multinomial():
    """One step's draw, where beam-sample is random: K = 4 candidates without replacement over
    2 beams x 8 tokens from softmax(warped log-probs + running score), as transformers draws
    them with torch.multinomial, against ours (Gumbel-top-K over the beams' candidates): the
    drawn sets' distributions agree (two-sample chi-square at p = 1e-4, 3,000 draws each)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    from anygpt_engine.runtime.beams import beam_candidates
    from anygpt_engine.sampling import ModalityConstraint, SamplingState
    from anygpt_engine.vocab import Vocabulary

    draws, vocab, k = 3000, 8, 4
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], [0.3, 2.5, -0.2, 1.1, 0.9, -2.0, 0.0, 1.7]])
    running = torch.tensor([-0.3, -1.6])
    # transformers: processors on the log-probs, plus the running scores, one softmax over both beams.
    scores = TemperatureLogitsWarper(0.7)(None, torch.log_softmax(logits, dim=1))
    scores = TopKLogitsWarper(top_k=3, min_tokens_to_keep=2)(None, scores) + running[:, None]
    torch.manual_seed(0)
    drawn = torch.multinomial(torch.softmax(scores.reshape(1, -1), dim=1).expand(draws, -1), k)
    theirs = collections.Counter(frozenset(row) for row in drawn.tolist())
    # Ours: rows 2i, 2i + 1 are draw i's two beams (seed i), then the best K keys over both.
    state = SamplingState(2 * draws, vocab, torch.device("cpu"))
    params = SamplingParams(temperature=0.7, top_k=3, num_beams=2, stop_token_ids=(2,))
    for slot in range(2 * draws):
        state.assign(slot, params, slot // 2, [], (2,), 0)
    _, keys, ids = beam_candidates(logits.repeat(draws, 1), torch.arange(2 * draws), torch.arange(2).repeat(draws),
                                   running.repeat(draws), state, ModalityConstraint.build(Vocabulary.text_only(vocab),
                                                                                          torch.device("cpu")),
                                   k, torch.full((2 * draws,), 2))
    flat = [sorted(((key, beam * vocab + t) for beam in range(2) for key, t in zip(keys[2 * i + beam].tolist(),
                                                                                   ids[2 * i + beam].tolist())),
                   reverse=True)[:k] for i in range(draws)]
    ours = collections.Counter(frozenset(index for _, index in top) for top in flat)
    chi2, df = _chi_square_two_sample(theirs, ours)
    threshold = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3
    assert df >= 10 and chi2 < threshold, (chi2, df, theirs.most_common(5), ours.most_common(5))


@pytest.mark.parametrize("stops", [(), (2,), (2, 5, 6)])
def test_beam_sample_warpers_keep_what_transformers_keeps(stops):
    """For beams transformers' top-k and top-p keep max(2, 1 + number of eos tokens) tokens
    (min_tokens_to_keep): the candidates with a finite score are the tokens its warpers keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from anygpt_engine.runtime.beams import beam_candidates, min_tokens_to_keep
    from anygpt_engine.sampling import ModalityConstraint, SamplingState
    from anygpt_engine.vocab import Vocabulary

    vocab, keep = 12, min_tokens_to_keep(len(stops))
    assert keep == (len(stops) + 1 if stops else 2)  # generation/utils.py, _get_logits_processor
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 3
    state = SamplingState(4, vocab, torch.device("cpu"))
    cases = [dict(top_k=1), dict(top_k=3), dict(top_p=0.05), dict(top_k=2, top_p=0.3)]
    for slot, warp in enumerate(cases):
        state.assign(slot, SamplingParams(temperature=0.8, num_beams=2, stop_token_ids=stops, **warp), slot, [],
                     stops, 0)
    scores, _, ids = beam_candidates(logits, torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.zeros(4),
                                     state, ModalityConstraint.build(Vocabulary.text_only(vocab), torch.device("cpu")),
                                     vocab, torch.full((4,), keep))
    for row, warp in enumerate(cases):
        expected = torch.log_softmax(logits[row:row + 1], dim=1) / 0.8
        if "top_k" in warp:
            expected = TopKLogitsWarper(warp["top_k"], min_tokens_to_keep=keep)(None, expected)
        if "top_p" in warp:
            expected = TopPLogitsWarper(warp["top_p"], min_tokens_to_keep=keep)(None, expected)
        kept = set(ids[row][scores[row] > -math.inf].tolist())
        assert kept == set(torch.nonzero(expected[0] > -math.inf).flatten().tolist()), (warp, kept)
        assert len(kept) >= keep


def test_beams_stop_at_the_context_limit():
    small = Engine(ModelConfig.preset("tiny").replace(vocab_size=512, max_seq_len=16, name="short"), device="cpu")
    outs = small.generate([[1] * 10, [1, 2]], SamplingParams.greedy(50, num_beams=3, stop_token_ids=()))
    assert [len(o) for o in outs] == [6, 14]


# -- in the serving engine (the tiny preset with a small vocabulary: CPU time goes to the model) -------
TINY = ModelConfig.preset("tiny").replace(vocab_size=512, name="tiny-512")
BEAMS = SamplingParams(temperature=0.0, num_beams=4, max_new_tokens=20, stop_token_ids=())
SAMPLED = SamplingParams(temperature=1.0, top_k=20, num_beams=3, max_new_tokens=20, seed=11, stop_token_ids=())
ORDINARY = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=20, seed=5, stop_token_ids=())
TINY_PROMPTS = [[1] + list(range(300, 340)), [1, 5, 9, 200, 7], [1, 77, 78, 79]]


@pytest.fixture(scope="module")
def alone():
    """Each request generated by itself on a roomy engine."""
    engine = Engine(TINY, device="cpu", max_batch_size=8)
    return [engine.generate([p], params)[0] for p, params in zip(TINY_PROMPTS, (BEAMS, SAMPLED, ORDINARY))]


def _drain(engine, log=None):
    outputs = collections.defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
            if log is not None:
                log.append(out)
        engine.scheduler.blocks.check()
    return outputs


def test_beams_share_blocks_and_copy_at_most_one_block_per_new_beam(alone, monkeypatch):
    """A 41-token prompt (2 full blocks of 16 + 9 tokens) and 4 beams: the beams hold the
    prompt's full blocks once, each new beam copies at most its partial last block, and the
    cache never holds more than the shared prefix plus each beam's own tail."""
    engine = Engine(TINY, device="cpu", max_batch_size=8)
    copies, peak = [], 0
    copy_blocks = engine.kv_cache.copy_blocks

    def spy(pairs):
        copies.append(len(pairs))
        copy_blocks(pairs)

    monkeypatch.setattr(engine.kv_cache, "copy_blocks", spy)
    rid = engine.add_request(TINY_PROMPTS[0], BEAMS)
    outputs = collections.defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        blocks = engine.scheduler.blocks
        blocks.check()
        peak = max(peak, blocks.num_used())
        request = engine._requests.get(rid)
        if request is not None and request.beams.started:
            tables = [blocks.tables[s].blocks for s in request.seq_ids]
            assert all(t[:2] == tables[0][:2] for t in tables)  # the prompt's full blocks, shared
    assert outputs[rid] == alone[0]
    assert max(copies) <= BEAMS.num_beams - 1 and sum(copies) > 0
    # 41 + 20 tokens: each beam's own blocks are at most blocks 2..3 of 4; unshared it would be 4 x 4.
    assert peak <= 2 + 4 * 2 < 4 * 4
    assert engine.stats().used_blocks == 0


def test_beam_requests_decode_in_the_same_steps_as_ordinary_ones(alone, monkeypatch):
    engine = Engine(TINY, device="cpu", max_batch_size=8)
    decode_rows = []
    forward = engine.model.forward

    def spy(tokens, *args, runs=None, **kwargs):
        if runs is None and tokens.shape[1] == 1:
            decode_rows.append(tokens.shape[0])
        return forward(tokens, *args, runs=runs, **kwargs)

    monkeypatch.setattr(engine.model, "forward", spy)
    ids = [engine.add_request(p, params) for p, params in zip(TINY_PROMPTS, (BEAMS, SAMPLED, ORDINARY))]
    log = []
    outputs = _drain(engine, log)
    assert [outputs[i] for i in ids] == alone
    # One decode forward per step holding 4 + 3 beam rows and the ordinary row.
    assert decode_rows == [8] * 19
    # A beam request's output is its best sequence, delivered once, when it ends.
    beam_outputs = [o for o in log if o.request_id in ids[:2]]
    assert [(o.finished, o.finish_reason, len(o.new_token_ids)) for o in beam_outputs] == [(True, "length", 20)] * 2


def test_beam_sample_is_reproducible_alone_or_batched(alone):
    engine = Engine(TINY, device="cpu", max_batch_size=16)
    other = SamplingParams(temperature=1.0, top_k=20, num_beams=3, max_new_tokens=20, seed=12, stop_token_ids=())
    batch = engine.generate(TINY_PROMPTS[1:2] * 3 + TINY_PROMPTS[:1], [SAMPLED, other, ORDINARY, BEAMS])
    assert batch[0] == alone[1] and batch[3] == alone[0]
    assert batch[1] != batch[0]  # another seed, another search


def test_preempted_beam_requests_restart_and_give_the_same_result(alone):
    # 11 usable blocks: the three requests' prompts fit (5 blocks), their beams' growth does not.
    tight = Engine(TINY, device="cpu", max_batch_size=8, num_blocks=12)
    preempted = []
    schedule = tight.scheduler.schedule

    def spy():
        plan = schedule()
        preempted.extend(r.request_id for r in plan.preempted)
        return plan

    tight.scheduler.schedule = spy
    # The newest request is the first to go: here the beam-sample one.
    order = [2, 0, 1]
    ids = [tight.add_request(TINY_PROMPTS[i], (BEAMS, SAMPLED, ORDINARY)[i]) for i in order]
    outputs = _drain(tight)
    assert [outputs[rid] for rid in ids] == [alone[i] for i in order]
    assert ids[2] in preempted  # the beam-sample request was preempted (and restarted)
    stats = tight.stats()
    assert stats.used_blocks == 0 and stats.free_blocks + stats.cached_blocks == 11


def test_abort_frees_every_beam(alone):
    engine = Engine(TINY, device="cpu", max_batch_size=8)
    keep = engine.add_request(TINY_PROMPTS[2], ORDINARY)
    drop = engine.add_request(TINY_PROMPTS[0], BEAMS)
    log = []
    for _ in range(5):
        log += engine.step()
    assert len(engine._requests[drop].seq_ids) == BEAMS.num_beams
    engine.abort(drop)
    _drain(engine, log)
    assert [(o.finished, o.finish_reason, o.new_token_ids) for o in log if o.request_id == drop] == [
        (True, "abort", [])]
    assert [t for o in log if o.request_id == keep for t in o.new_token_ids] == alone[2]
    stats = engine.stats()
    assert stats.used_blocks == 0 and stats.free_blocks + stats.cached_blocks == stats.total_blocks
    assert sorted(engine.scheduler.free_slots) == list(range(8))


def test_soak_beam_and_ordinary_requests_through_a_tight_pool():
    """12 requests (beam search, beam-sample, ordinary) arriving over time through 12 blocks,
    with random aborts: preemptions happen, every request that is not aborted ends with what it
    generates alone, the invariants hold after every step and no block or slot leaks."""
    rng = random.Random(0)
    kinds = [SamplingParams.greedy(12, num_beams=3, stop_token_ids=()),
             SamplingParams(temperature=1.0, top_k=30, num_beams=2, max_new_tokens=14, stop_token_ids=()),
             SamplingParams(temperature=0.8, max_new_tokens=10, stop_token_ids=())]
    requests = [([1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 30))],
                 dataclasses.replace(rng.choice(kinds), seed=i)) for i in range(12)]
    roomy = Engine(TINY, device="cpu", max_batch_size=8)
    expected = [roomy.generate([p], params)[0] for p, params in requests]
    engine = Engine(TINY, device="cpu", max_batch_size=8, num_blocks=13)
    pending, outputs, aborted, ids, preempted = list(requests), collections.defaultdict(list), set(), {}, set()
    schedule = engine.scheduler.schedule

    def spy():
        plan = schedule()
        preempted.update(r.request_id for r in plan.preempted)
        return plan

    engine.scheduler.schedule = spy
    while pending or engine.has_unfinished():
        if pending and rng.random() < 0.7:
            prompt, params = pending.pop(0)
            ids[engine.add_request(prompt, params)] = len(ids)
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        engine.scheduler.blocks.check()
        live = list(engine._requests)
        if live and rng.random() < 0.04:
            victim = rng.choice(live)
            engine.abort(victim)
            aborted.add(victim)
    assert aborted and any(requests[ids[rid]][1].num_beams > 1 for rid in preempted)
    for rid, i in ids.items():
        if rid not in aborted:
            assert outputs[rid] == expected[i], i
    stats = engine.stats()
    assert stats.used_blocks == 0 and stats.free_blocks + stats.cached_blocks == 12
    assert sorted(engine.scheduler.free_slots) == list(range(8))


def test_beam_parameters_are_checked():
    for bad, match in ((dict(num_beams=0), "num_beams=0"), (dict(num_beams=2.0), "num_beams=2.0"),
                       (dict(length_penalty=math.inf), "length_penalty=inf"),
                       (dict(early_stopping="always"), "early_stopping='always'"),
                       (dict(early_stopping=1), "early_stopping=1")):
        with pytest.raises(ValueError, match=f"SamplingParams.{match}"):
            SamplingParams(**bad)
    engine = Engine(TINY, device="cpu", max_batch_size=4, num_blocks=9)
    with pytest.raises(ValueError, match="num_beams=5, but the engine decodes at most max_batch_size=4 rows"):
        engine.add_request([1, 2], SamplingParams(num_beams=5))
    # 8 usable blocks: 40 + 40 tokens fill 5 blocks once, but 4 beams may own 3 each past the 2 shared.
    engine.add_request([1] * 40, SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="needs 14 KV blocks"):
        engine.add_request([1] * 40, SamplingParams(num_beams=4, max_new_tokens=40))


def test_anygpt_text_presets():
    chat = SamplingParams.anygpt("text")
    assert (chat.num_beams, chat.temperature, chat.top_p, chat.top_k, chat.max_new_tokens, chat.min_new_tokens,
            chat.repetition_penalty, chat.length_penalty, chat.early_stopping) == (5, 1.0, 1.0, 50, 500, 10, 1.0, 1.0,
                                                                                   False)
    base = SamplingParams.anygpt("text-base")
    assert (base.num_beams, base.temperature, base.top_k, base.max_new_tokens, base.min_new_tokens) == (
        1, 1.0, 50, 100, 10)


@pytest.mark.gpu
def test_gpu_graph_beams_match_eager():
    graphed = Engine("tiny", device="cuda", dtype=torch.float32, cuda_graphs=True, max_batch_size=8)
    eager = Engine("tiny", device="cuda", dtype=torch.float32, cuda_graphs=False, max_batch_size=8)
    params = [BEAMS, SAMPLED, ORDINARY]
    assert graphed.generate(TINY_PROMPTS, params) == eager.generate(TINY_PROMPTS, params)
    assert graphed.stats().used_blocks == 0
