"""Fused sampling kernels (ops.sample_tokens) against the torch reference and transformers
(only two tests need transformers; the rest run without it).

CPU: the Triton kernel under the interpreter (float32). GPU (marked): the CUDA and Triton
faces against the reference on the same device. Boundaries are made unambiguous where tokens
must be identical: continuous random logits (no ties unless placed on purpose, and ties at the
top-k boundary are kept by every face) and a checked margin between the top-p threshold and
every cumulative mass, so float summation order cannot flip a token's membership.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anygpt_engine import SamplingParams, Vocabulary, ops, tuning
from anygpt_engine.sampling import (ModalityConstraint, SamplerWork, SamplingState, process_logits, sample,
                                    uniform_noise, warp_logits)
from anygpt_engine.vocab import ModalitySpan
from conftest import poison

CPU = torch.device("cpu")


def _hf_processors():
    """transformers' logits processors: only the two tests against transformers need it."""
    return pytest.importorskip("transformers.generation.logits_process")


def _state(params, vocab_size, prompts=None, seeds=None, stops=None, open_modality=None, device=CPU):
    """A sampling state whose slot i holds request i (so slots = arange(B))."""
    b = len(params)
    state = SamplingState(b, vocab_size, device)
    for i in range(b):
        state.assign(i, params[i], (seeds or list(range(b)))[i], (prompts or [[0]] * b)[i], (stops or [()] * b)[i],
                     (open_modality or [0] * b)[i])
    return state


def _clone(state):
    copy = SamplingState(state.num_slots, state.vocab_size, state.seen.device)
    for name, _ in SamplingState._FIELDS:
        getattr(copy, name).copy_(getattr(state, name))
    copy.stop_mask.copy_(state.stop_mask)
    copy.seen.copy_(state.seen)
    return copy


def _same_state(a, b):
    return all(torch.equal(getattr(a, name), getattr(b, name))
               for name in ("seen", "generated", "open_modality", "stop_mask"))


def _no_constraint(vocab_size, device=CPU):
    return ModalityConstraint.build(Vocabulary.text_only(vocab_size), device)


def _strided_constraint(vocab_size):
    """A hand-built constraint whose `allowed` rows are one row expanded: the kernels would read
    past its storage for any state but 0."""
    c = ModalityConstraint.build(_small_vocab(), CPU)
    return dataclasses.replace(c, allowed=c.allowed[:1, :vocab_size].expand(c.closes.shape[0], vocab_size),
                               opens=c.opens[:vocab_size].contiguous())


def _small_vocab():
    """A 64-token vocabulary with two modality spans (ids 10-21 and 30-47)."""
    spans = {"speech": ModalitySpan(10, 10, 20, 21), "image": ModalitySpan(30, 16, 46, 47)}
    return Vocabulary(64, spans)


def _top_p_margins(logits, state, slots, constraint):
    """Per row, the distance (in probability, float64) between 1 - top_p and the nearest
    cumulative mass at a value boundary of the processed, top-k-warped distribution; 0 when
    1 - top_p falls inside a group of tied values (the faces may keep different members of
    the group: the kernels keep all of it). inf for rows without top-p."""
    rows = state.rows(slots)
    processed = process_logits(logits, rows, constraint).double().cpu()
    scores = processed / torch.where(rows.temperature == 0, 1.0, rows.temperature).double().cpu().unsqueeze(1)
    margins = torch.full((scores.shape[0],), math.inf, dtype=torch.float64)
    for r in range(scores.shape[0]):
        p = rows.top_p[r].item()
        if rows.temperature[r] == 0 or p >= 1:
            continue
        s = scores[r]
        k = rows.top_k[r].item()
        if 0 < k < s.numel():
            s = s.masked_fill(s < s.sort(descending=True).values[k - 1], -math.inf)
        ascending = s.sort().values
        values, counts = torch.unique_consecutive(ascending, return_counts=True)
        group_mass = torch.zeros(len(values), dtype=torch.float64).index_add_(
            0, torch.repeat_interleave(torch.arange(len(values)), counts), ascending.softmax(0))
        end = group_mass.cumsum(0)
        target = 1 - p
        if ((counts > 1) & (end - group_mass < target) & (end > target)).any():
            margins[r] = 0.0
        else:
            margins[r] = (end - target).abs().min()
    return margins


def _margin(logits, state, slots, constraint):
    return _top_p_margins(logits, state, slots, constraint).min().item()


def _triton_debug(logits, slots, state, constraint, work=SamplerWork.ALL):
    """Runs the Triton kernel with its debug outputs: (tokens, warped scores, uniform noise)."""
    from anygpt_engine.kernels import sampling as triton_sampling

    b, v = logits.shape
    out = torch.full((b,), -1, dtype=torch.int64)
    warped = torch.full((b, v), float("nan"))
    noise = torch.full((b, v), float("nan"))
    triton_sampling.sample(logits, slots, out, torch.empty(b, v), state.temperature, state.top_k, state.top_p,
                           state.repetition_penalty, state.min_new_tokens, state.seeds, state.generated,
                           state.open_modality, state.stop_mask.view(torch.uint8), state.seen.view(torch.uint8),
                           constraint.allowed.view(torch.uint8), constraint.opens, constraint.closes,
                           random=work.random, use_top_k=work.top_k, use_top_p=work.top_p, use_penalty=work.penalty,
                           block=256, radix_bits=8, num_warps=4, debug_warped=warped, debug_noise=noise)
    return out, warped, noise


# -- the counter-based noise --------------------------------------------------------------------
def test_in_kernel_noise_is_bit_exact():
    v = 300
    seeds = [0, 1, 12345, 2**32 + 7, 2**63 - 1, 0x9E3779B9]
    params = [SamplingParams(temperature=1.0)] * len(seeds)
    state = _state(params, v, seeds=seeds)
    state.generated.copy_(torch.tensor([0, 1, 7, 2**31 + 5, 2**40 + 3, 999]))
    slots = torch.arange(len(seeds))
    expected = uniform_noise(state.seeds.clone(), state.generated.clone(), v)
    _, _, noise = _triton_debug(torch.randn(len(seeds), v), slots, state, _no_constraint(v))
    assert torch.equal(noise.view(torch.int32), expected.view(torch.int32))


# -- greedy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 7, 129, 1000, 53516])
def test_greedy_is_exact_argmax_lowest_index(vocab):
    g = torch.Generator().manual_seed(vocab)
    b = 2 if vocab == 53516 else 6
    logits = torch.randn(b, vocab, generator=g) * 3
    logits[0, vocab // 2:] = logits[0].max() + 1  # a tie at the top: the lowest index wins
    if b > 2:
        logits[2] = -math.inf  # everything masked: token 0, like torch.argmax
        logits[3, -1] = math.inf
    params = [SamplingParams(temperature=0.0, top_k=3, repetition_penalty=1.2)] * b
    prompts = [[0, vocab - 1]] * b
    expected_state = _state(params, vocab, prompts)
    expected = ops.sample_tokens_reference(logits, torch.arange(b), expected_state, _no_constraint(vocab))
    for work in (SamplerWork.ALL, SamplerWork.for_params(params)):
        state = _state(params, vocab, prompts)
        out = poison(torch.empty(b, dtype=torch.int64))
        got = ops.sample_tokens(logits, torch.arange(b), state, _no_constraint(vocab), work, out=out,
                                backend="triton")
        assert got is out
        assert torch.equal(got, expected), (got, expected)
        assert _same_state(state, expected_state)
    assert expected[0].item() == vocab // 2
    if b > 2:
        assert expected[2].item() == 0 and expected[3].item() == vocab - 1


# -- same seed, same tokens as the reference ------------------------------------------------------
MIXES = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
         dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3), dict(temperature=0.0),
         dict(temperature=1.0, top_k=1), dict(temperature=2.0, top_k=20, min_new_tokens=2)]


# The CPU entry of tuning/sampling.json reads a row in one 8,192-wide block with 8-bit radix digits;
# the GPUs' shipped values (1,024-wide blocks: a row of 3,000 ids spans three; 4-bit digits: eight
# radix passes) run here under the interpreter too.
@pytest.mark.parametrize("vocab,tuned_for", [(7, "cpu"), (129, "cpu"), (1000, "cpu"),
                                             (3000, "NVIDIA H100 80GB HBM3")])
def test_same_tokens_and_state_as_reference(vocab, tuned_for):
    tuned = tuning.params_for("sampling", tuned_for)
    launch = ("triton_block", "triton_radix_bits", "triton_num_warps")
    with tuning.override("sampling", **{k: tuned[k] for k in launch}):
        _same_tokens_and_state_as_reference(vocab)


def _same_tokens_and_state_as_reference(vocab):
    g = torch.Generator().manual_seed(100 + vocab)
    params = [SamplingParams(**mix, stop_token_ids=(1,)) for mix in MIXES]
    b = len(params)
    prompts = [[0, 2, 3], [1], [4], [0, 5, 6], [2], [3], [0]]
    kwargs = dict(prompts=prompts, seeds=[11, 12, 13, 14, 15, 16, 2**40], stops=[(1,)] * b)
    reference, kernel = _state(params, vocab, **kwargs), _state(params, vocab, **kwargs)
    constraint = _no_constraint(vocab)
    slots = torch.tensor([3, 0, 6, 1, 5, 2, 4])  # rows in another order than the slots
    for step in range(3):
        logits = torch.randn(b, vocab, generator=g) * 2
        logits[:, 1] += 3  # the stop token is likely, and suppressed while min_new_tokens is unmet
        assert _margin(logits, reference, slots, constraint) > 1e-5
        expected = ops.sample_tokens(logits, slots, reference, constraint, backend="torch")
        got = ops.sample_tokens(logits, slots, kernel, constraint, backend="triton")
        assert torch.equal(got, expected), (step, got, expected)
        assert _same_state(kernel, reference)


def test_large_vocabulary_anygpt_presets():
    vocab = Vocabulary.anygpt()
    constraint = ModalityConstraint.build(vocab, CPU)
    params = [SamplingParams.anygpt(m, seed=i) for i, m in enumerate(["speech", "music", "text-base"])]
    prompts = [[1, vocab.start_token("speech")], [1, vocab.start_token("music"), vocab.range("music")[5]], [1, 2, 3]]
    kwargs = dict(prompts=prompts, seeds=[7, 8, 9], open_modality=[constraint.state_after(p) for p in prompts])
    reference, kernel = _state(params, vocab.size, **kwargs), _state(params, vocab.size, **kwargs)
    logits = torch.randn(3, vocab.size, generator=torch.Generator().manual_seed(3)) * 4
    slots = torch.arange(3)
    expected = ops.sample_tokens(logits, slots, reference, constraint, backend="torch")
    got = ops.sample_tokens(logits, slots, kernel, constraint, backend="triton")
    assert torch.equal(got, expected)
    assert _same_state(kernel, reference)


def test_same_seed_same_tokens_alone_or_batched():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=g)
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=s) for s in (11, 12, 13, 14)]
    batch = _state(params, 300, seeds=[11, 12, 13, 14])
    together = [ops.sample_tokens(logits, torch.arange(4), batch, _no_constraint(300), backend="triton").tolist()
                for _ in range(2)]
    for row in (0, 3):
        alone = _state([params[row]], 300, seeds=[11 + row])
        own = [ops.sample_tokens(logits[row:row + 1], torch.arange(1), alone, _no_constraint(300),
                                 backend="triton").item() for _ in range(2)]
        assert own == [step[row] for step in together]


# -- kept support and processors against transformers ------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.5), (1.0, 1, 1.0),
                                                     (0.5, 0, 0.05), (2.0, 49, 0.999), (1.0, 64, 0.3)])
def test_kept_support_equals_hf_warpers(temperature, top_k, top_p):
    hf_processors = _hf_processors()
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(4, 64, generator=g) * 2
    logits[1, :10] = 1.5  # ties at the top-k boundary are all kept
    logits[1, 10:] = logits[1, 10:].clamp(max=1.0)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * 4
    state = _state(params, 64)
    slots = torch.arange(4)
    margins = _top_p_margins(logits, state, slots, _no_constraint(64))
    _, warped, _ = _triton_debug(logits, slots, state, _no_constraint(64))
    hf = hf_processors.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        hf = hf_processors.TopKLogitsWarper(top_k)(None, hf)
    if top_p < 1:
        hf = hf_processors.TopPLogitsWarper(top_p)(None, hf)
    reference = warp_logits(logits, _state(params, 64).rows(slots))
    for row in range(4):
        kept, hf_kept = torch.isfinite(warped[row]), torch.isfinite(hf[row])
        assert torch.equal(warped[row][kept], logits[row][kept] / temperature)  # x / t rounded once, like torch
        if margins[row] > 1e-5:
            assert torch.equal(kept, hf_kept), row
            assert torch.equal(warped[row], reference[row])
        else:  # a tie group straddles the top-p boundary: all of it is kept here, part of it by HF
            assert margins[row] == 0 and (kept >= hf_kept).all()
            assert (warped[row][kept & ~hf_kept] == warped[row][kept & hf_kept].min()).all()


def test_repetition_penalty_equals_hf():
    penalty_processor = _hf_processors().RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    prompts = [[1, 2, 2, 40], [7], [0, 49, 13, 13, 25]]
    for penalty in (1.05, 1.3, 0.8):
        state = _state([SamplingParams(temperature=1.0, repetition_penalty=penalty)] * 3, 50, prompts)
        _, warped, _ = _triton_debug(logits, torch.arange(3), state, _no_constraint(50))
        for row, prompt in enumerate(prompts):
            hf = penalty_processor(penalty)(torch.tensor([prompt]), logits[row:row + 1].clone())
            assert torch.equal(warped[row], hf[0])


# -- distribution -------------------------------------------------------------------------------
def _chi_square_threshold(df, z=3.719):
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(0.7, 4, 1.0, 1.0), (1.5, 0, 0.8, 1.0),
                                                             (1.0, 6, 0.9, 1.3)])
def test_draws_follow_the_processed_distribution(temperature, top_k, top_p, penalty):
    vocab, draws = 8, 400
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]).expand(draws, vocab).contiguous()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    # One row per draw, each with its own seed: rows must be independent samples.
    kwargs = dict(prompts=[[0, 6]] * draws, seeds=list(range(50_000, 50_000 + draws)))
    state, reference = _state([params] * draws, vocab, **kwargs), _state([params] * draws, vocab, **kwargs)
    slots = torch.arange(draws)
    rows = state.rows(slots)
    probs = warp_logits(process_logits(logits, rows, _no_constraint(vocab)), rows)[0].softmax(-1).double()
    tokens = ops.sample_tokens(logits, slots, state, _no_constraint(vocab), backend="triton")
    counts = torch.bincount(tokens, minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token outside the kept support"
    expected = probs[support] * draws
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < _chi_square_threshold(int(support.sum()) - 1), (chi2, counts, expected)
    # The same draws as the reference, which test_sampling checks on 40,000 draws.
    assert torch.equal(tokens, ops.sample_tokens(logits, slots, reference, _no_constraint(vocab), backend="torch"))


# -- the modality constraint ----------------------------------------------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["speech", "image"]), st.integers(0, 2**31), st.floats(0.1, 3.0), st.integers(0, 20),
       st.sampled_from([1.0, 0.9, 0.3]), st.floats(-30, 30))
def test_constrained_rows_never_sample_illegal_ids(modality, seed, temperature, top_k, top_p, bias):
    vocab = _small_vocab()
    constraint = ModalityConstraint.build(vocab, CPU)
    prompt = [1, vocab.start_token(modality)]
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=1.2, seed=seed),
              SamplingParams.greedy()]
    state = _state(params, vocab.size, prompts=[prompt] * 2, seeds=[seed, seed],
                   open_modality=[constraint.state_after(prompt)] * 2)
    legal = set(vocab.range(modality)) | {vocab.end_token(modality)}
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, vocab.size, generator=g) * 4
    logits[:, :10] += bias  # illegal text tokens, often far above the legal ones
    tokens = ops.sample_tokens(logits, torch.arange(2), state, constraint, backend="triton").tolist()
    assert set(tokens) <= legal
    for row, token in enumerate(tokens):
        expected_state = 0 if token == vocab.end_token(modality) else constraint.state_after(prompt)
        assert state.open_modality[row].item() == expected_state


# -- edge cases and errors ----------------------------------------------------------------------
@pytest.mark.parametrize("face", ["torch", "triton"])
def test_nan_reads_as_minus_inf_without_checks(face):
    logits = torch.tensor([[float("nan"), 1.0, 2.0, float("nan")], [float("nan")] * 4])
    state = _state([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)], 4)
    got = ops.sample_tokens(logits, torch.arange(2), state, _no_constraint(4), backend=face, check_values=False)
    assert got.tolist() == [2, 0]


def test_signed_zero_ties_and_infinities():
    # -0.0 and 0.0 are one value: both are kept when 0 is the k-th largest, as in the reference.
    logits = torch.tensor([[-1.0, 0.0, 1.0, -0.0, -2.0, 0.0], [0.0, math.inf, 1.0, math.inf, -math.inf, 2.0]])
    state = _state([SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=0.5, top_p=0.5)], 6)
    slots = torch.arange(2)
    reference = warp_logits(logits, _state([SamplingParams(temperature=1.0, top_k=2)] * 2, 6).rows(slots))
    tokens, warped, _ = _triton_debug(logits, slots, state, _no_constraint(6))
    assert torch.equal(torch.isfinite(warped[0]), torch.isfinite(reference[0]))
    assert torch.isfinite(warped[0]).tolist() == [False, True, True, True, False, True]
    assert tokens[1].item() == 1  # the first +inf wins, as in the reference
    assert ops.sample_tokens_reference(logits, slots, _clone(state), _no_constraint(6))[1].item() == 1


def test_invalid_slot_without_checks_writes_minus_one_and_no_state():
    state = _state([SamplingParams(temperature=1.0)] * 2, 16)
    before = _clone(state)
    out = ops.sample_tokens(torch.randn(2, 16), torch.tensor([1, 5]), state, _no_constraint(16), backend="triton",
                            check_values=False)
    assert out[1].item() == -1 and 0 <= out[0].item() < 16
    assert torch.equal(state.generated, torch.tensor([0, 1]))
    assert torch.equal(state.seen[0], before.seen[0])


@pytest.mark.parametrize("face", ["torch", "triton"])
def test_empty_batch(face):
    state = _state([SamplingParams()], 8)
    out = ops.sample_tokens(torch.empty(0, 8), torch.empty(0, dtype=torch.int64), state, _no_constraint(8),
                            backend=face)
    assert out.shape == (0,)


def test_sample_dispatches_to_the_op():
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.8, top_k=10, seed=1), SamplingParams(temperature=1.1, top_p=0.7, seed=2)]
    a, b = _state(params, 40, seeds=[1, 2]), _state(params, 40, seeds=[1, 2])
    got = sample(logits, torch.arange(2), a, _no_constraint(40))
    assert torch.equal(got, ops.sample_tokens_reference(logits, torch.arange(2), b, _no_constraint(40)))
    assert _same_state(a, b)


def test_invalid_inputs_raise_clearly():
    vocab = 16
    state = _state([SamplingParams()] * 2, vocab)
    c = _no_constraint(vocab)
    logits, slots = torch.randn(2, vocab), torch.arange(2)
    cases = [
        ((logits.half(), slots, state, c), TypeError, "logits.dtype=torch.float16, expected torch.float32"),
        ((logits[:, :8], slots, state, c), ValueError, r"logits.shape=\(2, 8\), expected \[B, 16\]"),
        ((torch.randn(vocab, 2).t(), slots, state, c), ValueError, "contiguous along the vocabulary"),
        ((logits, slots.int(), state, c), ValueError, "slots: shape .* expected a contiguous int64 \\[2\\]"),
        ((logits, torch.arange(3), state, c), ValueError, "expected a contiguous int64 \\[2\\]"),
        ((logits, torch.tensor([0, 2]), state, c), ValueError, r"slots contains 2, expected slot ids in \[0, 2\)"),
        ((logits, torch.tensor([-1, 0]), state, c), ValueError, "slots contains -1"),
        ((logits, slots, "state", c), TypeError, "state must be a SamplingState"),
        ((logits, slots, state, None), TypeError, "constraint must be a ModalityConstraint"),
        ((logits, slots, state, _no_constraint(8)), ValueError, "constraint.opens.shape"),
        ((logits, slots, state, _strided_constraint(vocab)), ValueError, "constraint.allowed has strides"),
    ]
    for args, error, message in cases:
        for face in ("torch", "triton"):
            with pytest.raises(error, match=message):
                ops.sample_tokens(*args, backend=face)
    nan = logits.clone()
    nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match="logits row 1 contains NaN"):
        ops.sample_tokens(nan, slots, state, c)
    with pytest.raises(ValueError, match="out: torch.int32"):
        ops.sample_tokens(logits, slots, state, c, out=torch.empty(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend='cuda' for sample_tokens needs CUDA tensors"):
        ops.sample_tokens(logits, slots, state, c, backend="cuda")
    with pytest.raises(ValueError, match="backend='cpp': sample_tokens has only"):
        ops.sample_tokens(logits, slots, state, c, backend="cpp")
    with pytest.raises(TypeError, match="work must be a SamplerWork"):
        ops.sample_tokens(logits, slots, state, c, work=True)
    # Parameters written into the state by hand are checked like SamplingParams checks them.
    for name, value, message in (("temperature", -1.0, "expected >= 0"), ("top_p", 0.0, r"expected in \(0, 1\]"),
                                 ("top_p", 1.5, r"in \(0, 1\]"), ("top_k", -3, "expected >= 0"),
                                 ("repetition_penalty", 0.0, "expected > 0")):
        bad = _clone(state)
        getattr(bad, name)[1] = value
        with pytest.raises(ValueError, match=f"state.{name} of slot 1 .*{message}"):
            ops.sample_tokens(logits, slots, bad, c)
    assert state.generated.tolist() == [0, 0]  # nothing ran


def test_cuda_entry_point_checks_arguments_without_a_gpu():
    from anygpt_engine.ops._extension import extension

    state = _state([SamplingParams()] * 2, 16)
    c = _no_constraint(16)
    logits, slots, out = torch.randn(2, 16), torch.arange(2), torch.empty(2, dtype=torch.int64)

    def call(threads=256, vocab=16, scratch=torch.empty(2, 16)):
        extension().sample_tokens_cuda(
            logits.data_ptr(), 16, slots.data_ptr(), out.data_ptr(), scratch.data_ptr() if scratch is not None else 0,
            *[getattr(state, n).data_ptr() for n in ("temperature", "top_k", "top_p", "repetition_penalty",
                                                      "min_new_tokens", "seeds", "generated", "open_modality",
                                                      "stop_mask", "seen")],
            c.allowed.data_ptr(), c.opens.data_ptr(), c.closes.data_ptr(), 2, vocab, 2, 1, True, True, True, True,
            threads, 0)

    if not extension().built_with_cuda:
        with pytest.raises(RuntimeError, match="sample_tokens: anygpt_engine was built without CUDA kernels"):
            call()
        return
    with pytest.raises(ValueError, match="threads=7, expected 256, 512 or 1024"):
        call(threads=7)
    with pytest.raises(ValueError, match="vocab=0"):
        call(vocab=0)
    with pytest.raises(ValueError, match="scratch"):
        call(scratch=None)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sample_tokens: no usable CUDA device"):
            call()


# -- GPU: the CUDA and Triton faces against the reference -----------------------------------------
GPU_FACES = ["cuda", "triton"]


def _unambiguous_logits(g, state, slots, constraint, shape, device, tries=20):
    """Random logits whose top-p boundaries are clear of float32 rounding (redrawn until so)."""
    for _ in range(tries):
        logits = (torch.randn(shape, generator=g) * 3).to(device)
        if _margin(logits, state, slots, constraint) > 1e-5:
            return logits
    raise AssertionError("no unambiguous logits in 20 draws")


@pytest.mark.gpu
@pytest.mark.parametrize("face", GPU_FACES)
@pytest.mark.parametrize("vocab", [7, 1000, 53516])
def test_gpu_same_tokens_and_state_as_reference(face, vocab):
    dev = torch.device("cuda")
    b = 64
    g = torch.Generator().manual_seed(vocab)
    # At V = 53516 a top-p boundary without top-k sits among tokens of ~1e-6 mass, closer than
    # float32 summation order can resolve: there top-p follows a top-k, as in AnyGPT's configs.
    mixes = MIXES if vocab < 10_000 else [dict(m, top_k=m.get("top_k") or 200) for m in MIXES]
    params = [SamplingParams(**mixes[i % len(mixes)]) for i in range(b)]
    prompts = [torch.randint(0, vocab, (5,), generator=g).tolist() for _ in range(b)]
    kwargs = dict(prompts=prompts, seeds=list(range(1000, 1000 + b)), device=dev)
    reference, kernel = _state(params, vocab, **kwargs), _state(params, vocab, **kwargs)
    constraint = _no_constraint(vocab, dev)
    slots = torch.randperm(b, generator=g).to(dev)
    for step in range(3):
        logits = _unambiguous_logits(g, reference, slots, constraint, (b, vocab), dev)
        expected = ops.sample_tokens(logits, slots, reference, constraint, backend="torch")
        out = poison(torch.empty(b, dtype=torch.int64, device=dev))
        got = ops.sample_tokens(logits, slots, kernel, constraint, backend=face, out=out)
        assert got is out
        assert torch.equal(got, expected), (step, (got != expected).nonzero())
        assert _same_state(kernel, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("face", GPU_FACES)
def test_gpu_greedy_exact(face):
    dev = torch.device("cuda")
    logits = torch.randn(256, 53516, device=dev)
    logits[::3, 100:] = logits[::3].amax(1, keepdim=True) + 1  # ties: lowest index
    logits[5] = -math.inf
    state = _state([SamplingParams.greedy()] * 256, 53516, device=dev)
    for work in (SamplerWork.ALL, SamplerWork(random=False, top_k=False, top_p=False, penalty=False)):
        got = ops.sample_tokens(logits, torch.arange(256, device=dev), _clone(state), _no_constraint(53516, dev),
                                work, backend=face)
        assert torch.equal(got, logits.argmax(1))


@pytest.mark.gpu
@pytest.mark.parametrize("face", GPU_FACES)
@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(1.0, 0, 1.0, 1.0), (0.7, 4, 1.0, 1.0),
                                                             (1.5, 0, 0.8, 1.0), (1.0, 6, 0.9, 1.3)])
def test_gpu_draws_follow_the_processed_distribution(face, temperature, top_k, top_p, penalty):
    dev = torch.device("cuda")
    vocab, draws = 8, 40000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], device=dev).expand(draws, vocab).contiguous()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    state = _state([params] * draws, vocab, prompts=[[0, 6]] * draws, seeds=list(range(7, 7 + draws)), device=dev)
    slots = torch.arange(draws, device=dev)
    rows = state.rows(slots)
    probs = warp_logits(process_logits(logits, rows, _no_constraint(vocab, dev)), rows)[0].softmax(-1).double()
    counts = torch.bincount(ops.sample_tokens(logits, slots, state, _no_constraint(vocab, dev), backend=face),
                            minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * draws
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < _chi_square_threshold(int(support.sum()) - 1), (chi2, counts, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("face", GPU_FACES)
def test_gpu_same_seed_same_tokens_alone_or_batched_and_in_a_graph(face):
    dev = torch.device("cuda")
    vocab = Vocabulary.anygpt()
    constraint = ModalityConstraint.build(vocab, dev)
    b = 16
    params = [SamplingParams.anygpt(["speech", "music", "text-base", "image"][i % 4]) for i in range(b)]
    prompts = [[1, vocab.start_token("speech")] if i % 4 == 0 else [1, 5, 9] for i in range(b)]
    kwargs = dict(prompts=prompts, seeds=list(range(b)), open_modality=[constraint.state_after(p) for p in prompts],
                  device=dev)
    logits = torch.randn(b, vocab.size, device=dev, generator=torch.Generator(dev).manual_seed(0)) * 4
    batch = _state(params, vocab.size, **kwargs)
    together = ops.sample_tokens(logits, torch.arange(b, device=dev), batch, constraint, backend=face)
    for row in (0, 5, 15):
        alone = _state(params, vocab.size, **kwargs)
        own = ops.sample_tokens(logits[row:row + 1], torch.tensor([row], device=dev), alone, constraint, backend=face)
        assert own.item() == together[row].item()
    # Captured in a CUDA graph and replayed: the same tokens as eager.
    eager_state, graph_state = _state(params, vocab.size, **kwargs), _state(params, vocab.size, **kwargs)
    slots = torch.arange(b, device=dev)
    out = torch.empty(b, dtype=torch.int64, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.sample_tokens(logits, slots, _clone(graph_state), constraint, backend=face, out=out)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sample_tokens(logits, slots, graph_state, constraint, backend=face, out=out)
    for _ in range(3):
        graph.replay()
        expected = ops.sample_tokens(logits, slots, eager_state, constraint, backend=face)
        assert torch.equal(out, expected)
        assert _same_state(graph_state, eager_state)


@pytest.mark.gpu
def test_gpu_default_dispatch_uses_a_kernel():
    from anygpt_engine import tuning
    from anygpt_engine.ops import backend

    dev = torch.device("cuda")
    preferred = tuple(tuning.params("sampling", dev)["preferred"])
    assert backend.choose("sample_tokens", dev, None, preferred, ("torch", "triton", "cuda")) == preferred[0]
    state = _state([SamplingParams(temperature=1.0, top_k=5)] * 2, 100, device=dev)
    logits = torch.randn(2, 100, device=dev)
    expected = ops.sample_tokens(logits, torch.arange(2, device=dev), _clone(state), _no_constraint(100, dev),
                                 backend="torch")
    assert torch.equal(ops.sample_tokens(logits, torch.arange(2, device=dev), state, _no_constraint(100, dev)),
                       expected)
