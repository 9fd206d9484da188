"""The reference sampler: HF semantics for its processors and warpers, exact greedy, and its
draws against the exact post-processing distribution."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anygpt_engine import SamplingParams, Vocabulary
from anygpt_engine.sampling import (ModalityConstraint, SamplingState, process_logits, sample, unit_interval,
                                    warp_logits)

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


def _state(params, vocab_size, prompts=None, seeds=None, stops=None, open_modality=None):
    """A sampling state whose slot i holds request i (so slots = arange(B))."""
    b = len(params)
    state = SamplingState(b, vocab_size, torch.device("cpu"))
    for i in range(b):
        state.assign(i, params[i], (seeds or list(range(b)))[i], (prompts or [[0]] * b)[i], (stops or [()] * b)[i],
                     (open_modality or [0] * b)[i])
    return state


def _rows(state):
    return state.rows(torch.arange(state.num_slots))


def _sample(logits, state, constraint):
    return sample(logits, torch.arange(state.num_slots), state, constraint)


def _no_constraint(vocab_size):
    return ModalityConstraint.build(Vocabulary.text_only(vocab_size), torch.device("cpu"))


def test_params_validation():
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.1), dict(top_k=-1),
                dict(repetition_penalty=0), dict(max_new_tokens=0), dict(min_new_tokens=-1),
                dict(temperature=float("nan")), dict(seed=1.5), dict(stop_token_ids=[-1])):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"SamplingParams.{name}="):
            SamplingParams(**bad)


def test_anygpt_presets():
    speech = SamplingParams.anygpt("speech")
    assert (speech.top_k, speech.repetition_penalty, speech.max_new_tokens, speech.min_new_tokens) == (50, 1.05, 1500, 10)
    music = SamplingParams.anygpt("music")
    assert (music.top_k, music.repetition_penalty, music.max_new_tokens) == (200, 1.15, 2000)
    assert SamplingParams.anygpt("image").max_new_tokens == 200
    assert SamplingParams.anygpt("text-base", max_new_tokens=7).max_new_tokens == 7
    with pytest.raises(ValueError, match="modality='video'"):
        SamplingParams.anygpt("video")


def test_repetition_penalty_matches_hf():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    prompts = [[1, 2, 2, 40], [7], [0, 49, 13, 13, 25]]
    for penalty in (1.05, 1.3, 0.8):
        st_ = _state([SamplingParams(repetition_penalty=penalty)] * 3, 50, prompts)
        got = process_logits(logits, _rows(st_), _no_constraint(50))
        for row, prompt in enumerate(prompts):
            hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt]), logits[row:row + 1].clone())
            assert torch.equal(got[row], hf[0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.5), (1.0, 1, 1.0),
                                                     (0.5, 0, 0.05), (2.0, 49, 0.999)])
def test_kept_support_equals_hf_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(4, 64, generator=g) * 2
    logits[1, :10] = 1.5  # ties at the top-k boundary are all kept
    st_ = _state([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * 4, 64)
    got = warp_logits(logits, _rows(st_))
    hf = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        hf = TopKLogitsWarper(top_k)(None, hf)
    if top_p < 1:
        hf = TopPLogitsWarper(top_p)(None, hf)
    assert torch.equal(torch.isfinite(got), torch.isfinite(hf))
    torch.testing.assert_close(got[torch.isfinite(got)], hf[torch.isfinite(hf)])


def test_greedy_is_argmax_with_lowest_index_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -3.0, -0.5]])
    st_ = _state([SamplingParams(temperature=0.0, top_k=2)] * 3, 4)
    assert _sample(logits, st_, _no_constraint(4)).tolist() == [1, 0, 3]


def _chi_square_threshold(df, z=3.719):
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(1.0, 0, 1.0, 1.0), (0.7, 4, 1.0, 1.0),
                                                             (1.5, 0, 0.8, 1.0), (1.0, 6, 0.9, 1.3)])
def test_draws_follow_the_processed_distribution(temperature, top_k, top_p, penalty):
    vocab, draws = 8, 40000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]).expand(draws, vocab).contiguous()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    # One row per draw, each with its own seed: rows must be independent samples.
    st_ = _state([params] * draws, vocab, prompts=[[0, 6]] * draws, seeds=list(range(10_000, 10_000 + draws)))
    rows = _rows(st_)
    probs = warp_logits(process_logits(logits, rows, _no_constraint(vocab)), rows)[0].softmax(-1).double()
    counts = torch.bincount(_sample(logits, st_, _no_constraint(vocab)), minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the kept support"
    expected = probs[support] * draws
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < _chi_square_threshold(int(support.sum()) - 1), (chi2, counts, expected)


def test_same_seed_same_tokens_alone_or_batched():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g)
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=s) for s in (11, 12, 13, 14, 15)]
    batch = _state(params, 300, seeds=[11, 12, 13, 14, 15])
    together = [_sample(logits, batch, _no_constraint(300)).tolist() for _ in range(4)]
    for row in range(5):
        alone = _state([params[row]], 300, seeds=[11 + row])
        own = [_sample(logits[row:row + 1], alone, _no_constraint(300)).item() for _ in range(4)]
        assert own == [step[row] for step in together]


def test_min_new_tokens_suppresses_stop_tokens():
    logits = torch.tensor([[0.0, 10.0, 0.0, 9.0]])
    st_ = _state([SamplingParams(temperature=0.0, min_new_tokens=2)], 4, stops=[(1,)])
    got = [_sample(logits, st_, _no_constraint(4)).item() for _ in range(3)]
    assert got == [3, 3, 1]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 53515), min_size=1, max_size=6), st.integers(0, 2**31), st.sampled_from(
    ["image", "speech", "music", "audio"]))
def test_constrained_rows_never_sample_illegal_ids(prefix, seed, modality):
    vocab = Vocabulary.anygpt()
    constraint = ModalityConstraint.build(vocab, torch.device("cpu"))
    prompt = prefix + [vocab.start_token(modality)]
    params = SamplingParams(temperature=1.5, seed=seed)
    st_ = _state([params], vocab.size, prompts=[prompt], seeds=[seed],
                 open_modality=[constraint.state_after(prompt)])
    g = torch.Generator().manual_seed(seed)
    legal = set(vocab.range(modality)) | {vocab.end_token(modality)}
    for _ in range(5):
        logits = torch.randn(1, vocab.size, generator=g) * 4
        token = _sample(logits, st_, constraint).item()
        assert token in legal
        if token == vocab.end_token(modality):
            break


def test_noise_stays_strictly_inside_the_unit_interval():
    # The extreme hashes must map to finite Gumbel noise, or a masked token could win.
    u = unit_interval(torch.tensor([0, 1, 0xFFFFFFFE, 0xFFFFFFFF], dtype=torch.int64))
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
