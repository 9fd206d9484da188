"""The engine through its Triton kernels on the CPU (Triton interpreter), as a GPU runs it: every
op of the backbone (decode GEMVs and fused projections included), the LM head and the sampler
forced to Triton (ANYGPT_BACKEND=triton) give the torch path's tokens, through packed and chunked
prefill, decode steps with context splits, a restricted LM head inside a modality span and
seeded sampling.

The tiny preset's backbone with a 640-token vocabulary (a speech span at 400-601) keeps the
interpreter to seconds: the LM head and the sampler cost it per vocabulary block."""


from anygpt_engine import Engine, ModelConfig, SamplingParams, Vocabulary, tuning
from anygpt_engine.ops import backend
from anygpt_engine.vocab import ModalitySpan

CONFIG = ModelConfig.preset("tiny").replace(vocab_size=640, name="tiny-640")
VOCAB = Vocabulary(640, {"speech": ModalitySpan(400, 200, 600, 601)})
SOSP = VOCAB.start_token("speech")
# A fresh prompt, one the token budget cuts (its second chunk reads its cached prefix) and one
# that opens a speech span. The sampled request outlives the others, so its last steps decode
# alone inside the span, where the LM head reads only the span's rows.
PROMPTS = [[1, 5, 9, 200, 7], [1] + list(range(300, 317)), [1, 77, 78, SOSP]]
PARAMS = [SamplingParams.greedy(5, stop_token_ids=()), SamplingParams.greedy(3, stop_token_ids=()),
          SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.1, seed=3, max_new_tokens=7,
                         stop_token_ids=())]
# Blocks of 4 tokens: decode contexts span several blocks, so their context splits and the
# merge of them decide tokens (with blocks of 16 a mis-weighted merge went unseen).
ENGINE = dict(device="cpu", vocab=VOCAB, max_batch_size=4, max_num_batched_tokens=16, block_size=4)


def test_triton_faces_give_the_torch_paths_tokens(monkeypatch):
    reference = Engine(CONFIG, **ENGINE)
    expected = reference.generate(PROMPTS, PARAMS)
    assert all(t in VOCAB.range("speech") for t in expected[2])  # speech values, no <eosp>: all in the span
    decoded = sum(len(o) - 1 for o in expected)  # each request's first token comes from its prefill
    assert reference.head_rows_read < decoded * CONFIG.vocab_size  # some decode steps read only the span

    faces = set()
    choose = backend.choose

    def recording(op, device, requested, preferred, supported):
        face = choose(op, device, requested, preferred, supported)
        faces.add((op, face))
        return face

    monkeypatch.setattr(backend, "choose", recording)
    monkeypatch.setenv("ANYGPT_BACKEND", "triton")
    # Two context splits at most: the decode kernel still merges splits, the interpreter does less.
    with tuning.override("attention", decode_max_splits=2):
        got = Engine(CONFIG, **ENGINE).generate(PROMPTS, PARAMS)
    assert faces == {(op, "triton") for op in ("rope_kv_append", "varlen_attention", "linear",
                                               "linear_rope_kv_append", "paged_decode_attention", "lm_head",
                                               "sample_tokens")}
    assert got == expected
