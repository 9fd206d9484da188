"""Engine API on the tiny preset: inputs, errors, stopping, constrained decoding."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anygpt_engine import Engine, ModelConfig, SamplingParams
from anygpt_engine.weights import hf_state_dict


@pytest.fixture(scope="module")
def engine():
    return Engine("tiny", device="cpu")


def test_presets():
    big = ModelConfig.preset("anygpt-7b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.intermediate_size, big.vocab_size) == (
        32, 4096, 32, 11008, 53516)
    assert (big.rope_theta, big.rms_norm_eps, big.dtype) == (10000.0, 1e-5, "bfloat16")
    assert 6.5e9 < big.num_parameters() < 7.0e9
    assert ModelConfig.preset("tiny").vocab_size == 53516
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=96)


def test_bad_inputs_raise_clear_errors(engine):
    with pytest.raises(ValueError, match=r"prompts\[0\]\[1\]=53516 is outside the vocabulary"):
        engine.generate([[1, 53516]])
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        engine.generate([[1], []])
    with pytest.raises(ValueError, match="has 4096 tokens; the context holds 4096"):
        engine.logits([1] * 4096)
    with pytest.raises(TypeError, match="dtype torch.float32, expected integer token ids"):
        engine.logits(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"prompt_ids\[1\]='a' is not an integer"):
        engine.logits([1, "a"])
    with pytest.raises(ValueError, match="params must be one SamplingParams or a list of 2"):
        engine.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="stop_token_ids has \\[99999\\]"):
        engine.generate([[1]], SamplingParams(stop_token_ids=(99999,)))
    with pytest.raises(ValueError, match="model='nope'"):
        Engine("nope")
    with pytest.raises(ValueError, match="dtype='int8'"):
        Engine("tiny", device="cpu", dtype="int8")
    for bad in (0, 12, True):
        with pytest.raises(ValueError, match=rf"block_size={bad!r}, expected a power of two"):
            Engine("tiny", device="cpu", block_size=bad)


def test_weights_dict_round_trips_through_hf_names(engine):
    """hf_state_dict exports the engine's fused layout (q/k/v and gate/up stacked) under HF names,
    and Engine(weights=dict) loads those back: a differently seeded engine given them computes the
    same logits bit for bit and the same tokens. (GPU tests copy CPU weights this way.)"""
    weights = hf_state_dict(engine.model, engine.config)
    assert len(weights) == 3 + 9 * engine.config.num_layers
    c = engine.config
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (c.num_kv_heads * c.head_dim, c.hidden_size)
    other = Engine("tiny", device="cpu", seed=7, max_batch_size=1)
    prompt = [1, 40, 41, 7, 1000]
    assert not torch.equal(other.logits(prompt), engine.logits(prompt))
    loaded = Engine("tiny", weights=weights, device="cpu", seed=7, max_batch_size=1)
    assert torch.equal(loaded.logits(prompt), engine.logits(prompt))
    params = SamplingParams.greedy(6, stop_token_ids=())
    assert loaded.generate([prompt], params) == engine.generate([prompt], params)
    del weights["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing 1 tensors: \['layers.0.w13 \(slots \[1\]\)'\]"):
        Engine("tiny", weights=weights, device="cpu", max_batch_size=1)


def test_prompt_types_are_accepted(engine):
    params = SamplingParams.greedy(5)
    expected = engine.generate([[1, 40, 41]], params)
    assert engine.generate([torch.tensor([1, 40, 41])], params) == expected
    assert engine.generate([np.array([1, 40, 41], dtype=np.int32)], params) == expected
    assert engine.generate(torch.tensor([[1, 40, 41]]), params) == expected


def test_logits_are_float32_per_position(engine):
    logits = engine.logits([1, 2, 3, 4])
    assert logits.shape == (4, 53516) and logits.dtype == torch.float32
    # Position i only sees tokens <= i: the prefix's logits do not depend on later tokens.
    torch.testing.assert_close(engine.logits([1, 2])[1], logits[1], rtol=1e-5, atol=1e-6)


def test_stop_token_ends_and_is_included(engine):
    params = SamplingParams.greedy(20, stop_token_ids=())
    free = engine.generate([[1, 2, 3]], params)[0]
    stop = free[4]
    stopped = engine.generate([[1, 2, 3]], SamplingParams.greedy(20, stop_token_ids=(stop,)))[0]
    assert stopped == free[:free.index(stop) + 1]
    # min_new_tokens keeps the stop token out until enough tokens were generated.
    late = engine.generate([[1, 2, 3]], SamplingParams.greedy(20, stop_token_ids=(stop,), min_new_tokens=10))[0]
    assert stop not in late[:10]


def test_max_new_tokens_and_context_limit():
    small = Engine(ModelConfig.preset("tiny").replace(max_seq_len=16), device="cpu")
    outs = small.generate([[1] * 10, [1, 2]], SamplingParams(max_new_tokens=50, stop_token_ids=(), seed=0))
    assert [len(o) for o in outs] == [6, 14]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = [SamplingParams(temperature=1.0, top_k=50, seed=s, max_new_tokens=12, stop_token_ids=())
              for s in (5, 6)]
    batch = engine.generate([[1, 100], [1, 7, 8, 9]], params)
    assert engine.generate([[1, 100]], params[0])[0] == batch[0]
    assert engine.generate([[1, 7, 8, 9]], params[1])[0] == batch[1]


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["image", "speech", "music", "audio"]), st.integers(0, 2**31), st.integers(1, 3))
def test_constrained_decoding_never_emits_illegal_ids(engine, modality, seed, prefix_len):
    vocab = engine.vocab
    prompt = [1] + list(range(100, 100 + prefix_len)) + [vocab.start_token(modality)]
    out = engine.generate([prompt], SamplingParams(temperature=2.0, seed=seed, max_new_tokens=12,
                                                   stop_token_ids=()))[0]
    legal = set(vocab.range(modality)) | {vocab.end_token(modality)}
    for i, token in enumerate(out):
        assert token in legal, (i, token)
        if token == vocab.end_token(modality):
            break


def test_constraint_switch_off(engine):
    vocab = engine.vocab
    prompt = [1, vocab.start_token("speech")]
    unconstrained = Engine("tiny", device="cpu", constrain_modalities=False)
    outs = unconstrained.generate([prompt], SamplingParams(temperature=3.0, seed=1, max_new_tokens=30,
                                                           stop_token_ids=()))[0]
    assert any(t not in vocab.range("speech") for t in outs)


def test_warm_up_covers_the_shapes_and_leaves_no_trace():
    """warm_up runs prefills in every GEMV row bucket and one past the crossover, a prefix-cache
    hit (paged prefill) and every sampler stage and beams; afterwards the engine's bookkeeping is
    a cold engine's and it generates the same tokens, unseeded requests included."""
    config = ModelConfig.preset("tiny").replace(max_seq_len=128)
    cold = Engine(config, device="cpu", block_size=8)
    warm = Engine(config, device="cpu", block_size=8, warm_up=True)
    summary = warm.warm_up_summary
    assert summary.prefill_lengths == [1, 2, 3, 5, 9, 17, 33, 65] and summary.prefix_hit_tokens == 16
    assert summary.decode_batches == [3, 5, 9, 17] and len(summary.sampler_stages) == 5
    assert summary.steps > len(summary.prefill_lengths) and summary.seconds > 0
    assert cold.warm_up_summary is None  # the default on a CPU: no Triton to compile
    assert warm.stats() == cold.stats() and warm.head_rows_read == cold.head_rows_read == 0
    warm.scheduler.blocks.check()
    prompts = [[1, 5, 9, 200], [1] + list(range(40, 60)), [1, 7]]
    params = [SamplingParams.greedy(6), SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=5),
              SamplingParams(temperature=1.0, top_k=7, max_new_tokens=4)]  # two unseeded: drawn from the engine seed
    assert warm.generate(prompts, params) == cold.generate(prompts, params)
    assert warm.stats() == cold.stats()
    warm.add_request([1, 2, 3], SamplingParams.greedy(2))
    with pytest.raises(RuntimeError, match="warm_up needs an idle engine"):
        warm.warm_up()


def test_warm_up_runs_the_sampler_stages_and_decode_rows_serving_meets(monkeypatch):
    """Each sampler stage set is its own Triton kernel: warm-up must launch every set that AnyGPT's
    presets (as chat samples them: one sequence), the server's default and greedy select, alone or
    mixed in one batch (a batch takes the union of its requests' stages), in prefill and in eager
    decode, and eager decode steps in each row bucket of the decode tiles (3, 5, 9, 17 rows).
    Recorded at the engine's sampler calls."""
    import itertools

    from anygpt_engine import engine as engine_module
    from anygpt_engine.chat.session import chat_params
    from anygpt_engine.sampling import ANYGPT_PRESETS, SamplerWork

    calls = []  # (stages, rows) of every sampler launch
    real = engine_module.sample

    def recording(logits, slots, state, constraint, work=SamplerWork.ALL, **kw):
        calls.append((work, logits.shape[0]))
        return real(logits, slots, state, constraint, work, **kw)

    config = ModelConfig.preset("tiny").replace(max_seq_len=128)
    engine = Engine(config, device="cpu", block_size=8)
    decode_rows = []
    real_decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda requests: (decode_rows.append(len(requests)),
                                                             real_decode(requests))[1])
    monkeypatch.setattr(engine_module, "sample", recording)
    summary = engine.warm_up()
    served = [SamplingParams(), SamplingParams.greedy()]
    served += [chat_params(m) for m in ("text", "speech", "image", "music")]
    served += [SamplingParams.anygpt(name, num_beams=1) for name in ANYGPT_PRESETS]
    needed = {SamplerWork.for_params(list(mix)) for n in (1, 2, 3) for mix in itertools.combinations(served, n)}
    launched = {work for work, _ in calls}
    assert needed <= launched, needed - launched
    assert SamplerWork.for_params([chat_params("speech")]) == SamplerWork(True, True, False, True)  # no top-p
    assert set(summary.sampler_stages) == launched
    assert {3, 5, 9, 17} <= set(decode_rows) and summary.decode_batches == [3, 5, 9, 17]
    assert {rows for _, rows in calls} >= {3, 5, 9, 17}  # sampled at those rows (eager decode)
    assert engine.stats().free_blocks == engine.stats().total_blocks


@pytest.mark.parametrize("max_seq_len,num_blocks", [(6, None), (128, 5), (40, 3)])
def test_warm_up_fits_small_engines(max_seq_len, num_blocks):
    """A short context or a small KV cache gets the shapes that fit it, never an error."""
    config = ModelConfig.preset("tiny").replace(max_seq_len=max_seq_len)
    engine = Engine(config, device="cpu", block_size=8, num_blocks=num_blocks, warm_up=True)
    fits = min(max_seq_len, (num_blocks - 1) * 8 // 2 if num_blocks else max_seq_len) - 2
    assert engine.warm_up_summary.prefill_lengths == [n for n in (1, 2, 3, 5, 9, 17, 33, 65) if n <= fits]
    engine.scheduler.blocks.check()
    assert engine.stats().free_blocks == engine.stats().total_blocks
