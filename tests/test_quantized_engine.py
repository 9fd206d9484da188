"""Engine(quantization=...): weights quantized at load and kept quantized, greedy choices close
to the unquantized engine's, the reference and Triton faces token-for-token equal on the same
quantized weights, clear errors."""

import pytest
import torch

from anygpt_engine import Engine, ModelConfig, SamplingParams
from anygpt_engine.quantization import QuantizedWeight, quantized_bytes

PARAMS = SamplingParams.greedy(12, stop_token_ids=())


def _prompts(n=4, length=10):
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, 32000, (length,), generator=g).tolist() for _ in range(n)]


def _engine(**kwargs):
    return Engine("tiny", seed=3, num_blocks=64, max_batch_size=4, **kwargs)


@pytest.fixture(scope="module")
def unquantized():
    """The unquantized engine's greedy continuation of a prompt, and its logits along it."""
    engine = _engine()
    prompt = _prompts(1)[0]
    sequence = prompt + engine.generate([prompt], SamplingParams.greedy(24, stop_token_ids=()))[0]
    return sequence, engine.logits(sequence)


# Floors for the tiny preset's random weights, whose logits are nearly flat (the median gap
# between the top two is ~0.2 of their standard deviation); measured: int8 98-100%, fp8 94-96%,
# int4 70-80% (int4's per-weight error is ~11% of the weights' spread). The formats' exact error
# bounds are tested in test_gemv.py; these catch a broken model path (layout, scale or epilogue).
@pytest.mark.parametrize("mode,agreement,logit_error", [("int8", 0.9, 0.02), ("fp8", 0.85, 0.08),
                                                        ("int4", 0.6, 0.25)])
def test_greedy_choices_agree_with_the_unquantized_engine(unquantized, mode, agreement, logit_error):
    """Teacher-forced along the unquantized engine's own greedy output: at each position the
    quantized engine's greedy token must be the same (a free-running comparison would count
    every token after the first disagreement as different)."""
    sequence, exact = unquantized
    logits = _engine(quantization=mode).logits(sequence)
    assert (logits.argmax(-1) == exact.argmax(-1)).float().mean() >= agreement
    assert (logits - exact).abs().max() / exact.abs().max() < logit_error


def test_int8_generation_starts_like_the_unquantized_one(unquantized):
    sequence, _ = unquantized
    prompt = _prompts(1)[0]
    generated = _engine(quantization="int8").generate([prompt], SamplingParams.greedy(4, stop_token_ids=()))[0]
    assert generated == sequence[len(prompt):len(prompt) + 4]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_reference_and_triton_faces_give_the_same_tokens(monkeypatch, mode):
    """The same quantized weights through the torch reference and the Triton GEMV kernels
    (every linear op of the backbone; the other ops keep their default faces)."""
    prompts = _prompts(1)
    params = SamplingParams.greedy(8, stop_token_ids=())
    monkeypatch.setenv("ANYGPT_BACKEND", "linear=torch,linear_rope_kv_append=torch")
    reference = _engine(quantization=mode).generate(prompts, params)
    monkeypatch.setenv("ANYGPT_BACKEND", "linear=triton,linear_rope_kv_append=triton")
    assert _engine(quantization=mode).generate(prompts, params) == reference


def test_weights_stay_quantized_and_the_head_stays_16_bit():
    engine = Engine("tiny", quantization="int4", num_blocks=8)
    model = engine.model
    names = {name for name, _ in model.named_parameters()}
    assert names == {"tok_embeddings", "norm", "output"} | {f"layers.{i}.{n}" for i in range(2)
                                                            for n in ("attention_norm", "ffn_norm")}
    c = engine.config
    for block in model.layers:
        for name, shape in (("wqkv", (c.q_size + 2 * c.kv_size, c.hidden_size)), ("wo", (c.hidden_size, c.q_size)),
                            ("w13", (2 * c.intermediate_size, c.hidden_size)),
                            ("w2", (c.hidden_size, c.intermediate_size))):
            weight = getattr(block, name)
            assert isinstance(weight, QuantizedWeight) and weight.mode == "int4" and weight.shape == shape
            assert weight.qweight.dtype == torch.uint8 and weight.qweight.shape == (shape[0], shape[1] // 2)
    matrices = 2 * (c.q_size + 2 * c.kv_size + c.q_size + 3 * c.intermediate_size) * c.hidden_size
    assert quantized_bytes(model) < matrices * 0.6  # 0.5 byte a value plus group scales and zeros
    assert model.output.dtype == engine.dtype == torch.float32


def test_quantization_errors():
    with pytest.raises(ValueError, match=r"quantization='int3', expected None or one of \['int8', 'fp8', 'int4'\]"):
        Engine("tiny", quantization="int3")
    config = ModelConfig(hidden_size=192, num_layers=1, num_heads=3, num_kv_heads=3, intermediate_size=256,
                         vocab_size=300, dtype="float32", name="odd")
    with pytest.raises(ValueError, match=r"quantization='int4': wqkv has K=192 input features, not a multiple of the "
                                         r"group size 128"):
        Engine(config, quantization="int4", num_blocks=8)
    engine = Engine(config, quantization="int8", num_blocks=8)  # int8 and fp8 take any K
    assert len(engine.generate([[1, 5, 9]], SamplingParams.greedy(3))[0]) == 3
    from anygpt_engine.weights import hf_state_dict

    with pytest.raises(ValueError, match="matrices are quantized"):
        hf_state_dict(engine.model, config)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_quantized_engine_on_gpu_matches_the_reference_faces(mode, monkeypatch):
    engine = Engine("tiny", dtype="bfloat16", quantization=mode, seed=1)
    prompts = _prompts(3)
    outputs = engine.generate(prompts, PARAMS)
    monkeypatch.setenv("ANYGPT_BACKEND", "linear=torch,linear_rope_kv_append=torch")
    reference = Engine("tiny", dtype="bfloat16", quantization=mode, seed=1, cuda_graphs=False).generate(prompts, PARAMS)
    same = sum(a == b for ours, theirs in zip(outputs, reference) for a, b in zip(ours, theirs))
    assert same / sum(len(r) for r in reference) >= 0.9


def test_bench_reports_the_quantized_engine_against_the_unquantized_one():
    from anygpt_engine import bench

    report = bench.benchmark(model="tiny", prompt_len=6, new_tokens=4, device="cpu", quantization="int8",
                             progress=False)
    assert report["quantization"] == "int8"
    for key in ("greedy_tokens_equal_to_unquantized", "greedy_choices_equal_teacher_forced"):
        assert 0.5 <= report[key] <= 1.0
    assert 0 < report["logits_rel_error"] < 0.02 and report["unquantized_decode_tok_s"] > 0
    assert "greedy_choices_equal_teacher_forced" in bench.format_table(report)
    # the matrices count at their packed size: one byte a value plus a float32 scale per row
    full = bench.benchmark(model="tiny", prompt_len=6, new_tokens=2, device="cpu", progress=False)
    c = ModelConfig.preset("tiny")
    shapes = [(c.q_size + 2 * c.kv_size, c.hidden_size), (c.hidden_size, c.q_size),
              (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]
    saved = c.num_layers * sum(n * k * 4 - (n * k + 4 * n) for n, k in shapes)
    assert full["weight_bytes_per_step"] - report["weight_bytes_per_step"] == saved
    with pytest.raises(ValueError, match="compare='hf'"):
        bench.benchmark(model="tiny", prompt_len=6, new_tokens=2, device="cpu", quantization="int8", compare="hf")
