"""The engine's reference backbone against transformers' LlamaForCausalLM on the same weights:
a tiny random model saved with save_pretrained and loaded by the engine from disk."""

import json

import pytest
import torch

from anygpt_engine import Engine, ModelConfig, SamplingParams

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=160),
    "gqa": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=200),
}


def _save_tiny_llama(path, kind, seed=0, tie=False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=301, num_hidden_layers=3, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tie, **CONFIGS[kind])
    model = transformers.LlamaForCausalLM(config).eval()
    # HF's init (std 0.02) gives nearly flat logits; wider weights make greedy paths decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = _save_tiny_llama(path, request.param)
    return model, Engine(path, device="cpu", dtype=torch.float32), path


PROMPTS = [[1, 17, 250, 3, 99, 42, 7], [1, 5], [1, 200, 100, 33, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


def test_prefill_logits_match(hf_pair):
    model, engine, _ = hf_pair
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0].float()
        got = engine.logits(prompt)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        rel = (got - expected).abs().max() / expected.abs().max()
        assert rel < 1e-5, rel


def test_greedy_continuation_matches_batched(hf_pair):
    model, engine, _ = hf_pair
    expected = []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             top_k=None, top_p=None, temperature=None, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    params = SamplingParams.greedy(32, stop_token_ids=())
    assert engine.generate(PROMPTS, params) == expected
    # The same prompts one at a time give the same tokens as the mixed-length batch.
    assert [engine.generate([p], params)[0] for p in PROMPTS] == expected


def test_greedy_with_repetition_penalty_matches_hf(hf_pair):
    model, engine, _ = hf_pair
    prompt = PROMPTS[0]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                         repetition_penalty=1.3, top_k=None, top_p=None, temperature=None, pad_token_id=0)
    params = SamplingParams.greedy(24, repetition_penalty=1.3, stop_token_ids=())
    assert engine.generate([prompt], params)[0] == out[0, len(prompt):].tolist()


def test_loads_sharded_and_tied_checkpoints(tmp_path):
    model = _save_tiny_llama(tmp_path / "tied", "gqa", tie=True)
    engine = Engine(tmp_path / "tied", device="cpu", dtype=torch.float32)
    prompt = PROMPTS[2]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(engine.logits(prompt), expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = Engine(tmp_path / "sharded", device="cpu", dtype=torch.float32)
    assert torch.equal(sharded.logits(prompt), engine.logits(prompt))


def test_half_precision_weights_close_to_fp32(hf_pair):
    _, fp32_engine, path = hf_pair
    prompt = PROMPTS[0]
    expected = fp32_engine.logits(prompt)
    for dtype, tol in ((torch.bfloat16, 0.08), (torch.float16, 0.01)):
        got = Engine(path, device="cpu", dtype=dtype).logits(prompt)
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() / expected.abs().max() < tol, dtype


def test_mismatched_checkpoint_is_rejected(tmp_path, hf_pair):
    _, _, path = hf_pair
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \d+ tensors: \['model.layers.2"):
        Engine(bad, device="cpu")
    config["num_hidden_layers"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \d+ tensors: \['layers.3"):
        Engine(bad, device="cpu")


def test_config_reads_both_transformers_spellings(hf_pair):
    _, _, path = hf_pair
    raw = json.loads((path / "config.json").read_text())
    new = ModelConfig.from_pretrained(path)
    # transformers 4.x spelling: rope_theta / torch_dtype at top level.
    old_style = {k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")}
    old_style.update(rope_theta=5e5, torch_dtype="float16")
    old = ModelConfig.from_hf_dict(old_style)
    assert old.rope_theta == 5e5 and old.dtype == "float16"
    # transformers 5.x spelling.
    new_style = {k: v for k, v in raw.items() if k not in ("rope_theta", "torch_dtype")}
    new_style.update(rope_parameters={"rope_type": "default", "rope_theta": 2e4}, dtype="bfloat16")
    five = ModelConfig.from_hf_dict(new_style)
    assert five.rope_theta == 2e4 and five.dtype == "bfloat16"
    assert new.num_kv_heads == raw.get("num_key_value_heads", raw["num_attention_heads"])
    assert new.max_seq_len >= 4096  # never capped at the config's max_position_embeddings
