"""Tokenizer: ids and text equal to transformers' tokenizers on the same directory.

tokenizer.model directories reproduce the slow LlamaTokenizer of transformers 4.34, which AnyGPT
trained and ran with. The oracles here: transformers 5's sentencepiece tokenizer (the same
split-then-encode code, legacy mode) for ids, and strings and ids recorded from transformers
4.34.1 for what transformers 5 no longer does (decode spacing, legacy=False prefixes).
"""

import json
import shutil

import pytest
import torch

from anygpt_engine import Engine, SamplingParams, Tokenizer, Vocabulary
from anygpt_engine.config import ModelConfig
from anygpt_tokenizers import (CHAT_TOKENS, LLAMA_PIECES, anygpt_added_tokens, sentencepiece_model,
                               write_sentencepiece_dir, write_tokenizers_dir)

pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world",
    "You are an AI assistant named MMGPT who can understand and generate multimodal content, including text, "
    "speech, images and audio.\n[Human]: hello there<eoh>\n[MMGPT]: Sure, I am fine.<eos>\n[Human]: how are "
    "you?<eoh>\n[MMGPT]:",
    "[Human]: read this <sosp><🗣️12><🗣️1023><🗣️0><eosp> please<eoh> [MMGPT]: <soim>",
    "  leading spaces and  double  spaces ",
    "[MMGPT]: <sosp><🗣️5><eosp><eos>",
    "tab\tnewline\n\nend",
    "<s>text</s> after",
    "Unicode: héllo 你好 😀",
    "<🗣️12> <🗣️13>",
    "[Human]:hello<eoh>",
    "digits 1234567 and <🎶8191><👂4095><👀0><somu><eoau>",
    "",
    " ",
    "\n",
    "<eos>",
    "\u2581underscore\u2581marker",
    "<🗣️1024> is not a token, <🗣️12 neither",
]


@pytest.fixture(scope="module")
def model_bytes():
    return sentencepiece_model()


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, model_bytes):
    return write_sentencepiece_dir(tmp_path_factory.mktemp("sp"), model_bytes)


def slow_oracle(path, legacy):
    """transformers 5's sentencepiece tokenizer with the directory's added tokens."""
    from transformers import AddedToken
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = {int(i): AddedToken(**t) for i, t in config["added_tokens_decoder"].items()}
    return SentencePieceBackend(vocab_file=str(path / "tokenizer.model"), legacy=legacy, unk_token="<unk>",
                                bos_token="<s>", eos_token="</s>", added_tokens_decoder=decoder)


@pytest.mark.parametrize("strip", [False, True])
def test_sentencepiece_ids_equal_the_slow_tokenizer(tmp_path, model_bytes, strip):
    # strip: AddedTokens with lstrip/rstrip eat the whitespace beside them (4.34's split rules).
    path = write_sentencepiece_dir(tmp_path, model_bytes, strip_tokens=("[Human]", "<eoh>", "<sosp>") if strip else ())
    ours, oracle = Tokenizer.from_pretrained(path), slow_oracle(path, legacy=True)
    assert ours.backend == "sentencepiece" and ours.vocab_size == 53516
    for text in TEXTS:
        assert ours.encode(text) == [1] + oracle(text, add_special_tokens=False).input_ids, text
        assert ours.encode(text, add_bos=False) == oracle(text, add_special_tokens=False).input_ids, text


def test_sentencepiece_legacy_pieces(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    space = tok.token_to_id("\u2581")
    # Every piece between added tokens gets sentencepiece's dummy prefix (4.34, legacy=True).
    assert tok.encode("<🗣️12> <🗣️13>") == [1, 40210, space, space, 40211]
    assert tok.encode(" ") == [1, space, space]
    assert tok.encode("[Human]:") == [1, 32000] + tok.encode(":", add_bos=False)
    assert tok.encode("<sosp><🗣️0><🗣️1023><eosp>", add_bos=False) == [41222, 40198, 41221, 41223]


def test_sentencepiece_decode_matches_transformers_4_34(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    # (text, decode, decode skipping special tokens), recorded from transformers 4.34.1's LlamaTokenizer.
    expected = [
        ("hello world", "<s>hello world", "hello world"),
        ("[MMGPT]: <sosp><🗣️5><eosp><eos>", "<s> [MMGPT] :  <sosp> <🗣️5> <eosp> <eos>",
         "[MMGPT] :  <sosp> <🗣️5> <eosp> <eos>"),
        ("<s>text</s> after", "<s><s> text</s> after", "text  after"),
        ("Unicode: héllo 你好 😀", "<s>Unicode: héllo 你好 😀", "Unicode: héllo 你好 😀"),
        ("<🗣️12> <🗣️13>", "<s> <🗣️12> <🗣️13>", "<🗣️12> <🗣️13>"),
        ("[Human]:hello<eoh>", "<s> [Human] :hello <eoh>", "[Human] :hello <eoh>"),
        (" ", "<s> ", ""),
        ("tab\tnewline\n\nend", "<s>tab\tnewline\n\nend", "tab\tnewline\n\nend"),
    ]
    for text, plain, skipped in expected:
        ids = tok.encode(text)
        assert tok.decode(ids) == plain, text
        assert tok.decode(ids, skip_special_tokens=True) == skipped, text


def test_sentencepiece_non_legacy_matches_transformers_4_34(tmp_path, model_bytes):
    path = write_sentencepiece_dir(tmp_path / "sp", model_bytes, legacy=False)
    ours = Tokenizer.from_pretrained(path)
    fast = transformers.AutoTokenizer.from_pretrained(str(path))  # converted; legacy=False: "▁" on the first piece
    space = ours.token_to_id("\u2581")
    for text in TEXTS:
        expected = fast(text).input_ids
        # 4.34 prefixed the whole text with "▁" and kept it as a piece before a leading added token
        # (unless it is a special token) or leading whitespace; transformers 5 drops that piece.
        starts_with_added = any(text.startswith(t) for t in anygpt_added_tokens()) or text[:1] in (" ", "\u2581")
        if starts_with_added:
            expected = [1, space] + expected[1:]
        assert ours.encode(text) == expected, text
    expected = [("hello world", "<s> hello world", "hello world"),
                ("[MMGPT]: <sosp><🗣️5><eosp><eos>", "<s>  [MMGPT] :  <sosp> <🗣️5> <eosp> <eos>",
                 "[MMGPT] :  <sosp> <🗣️5> <eosp> <eos>"),
                ("<s>text</s> after", "<s><s>text</s> after", "text after"),
                (" ", "<s>  ", " ")]
    for text, plain, skipped in expected:
        ids = ours.encode(text)
        assert (ours.decode(ids), ours.decode(ids, skip_special_tokens=True)) == (plain, skipped), text


def test_added_tokens_json_reads_like_the_config(tmp_path, model_bytes, sp_dir):
    old = Tokenizer.from_pretrained(write_sentencepiece_dir(tmp_path, model_bytes, added_tokens_json=True))
    new = Tokenizer.from_pretrained(sp_dir)
    assert old.added_tokens == new.added_tokens
    for text in TEXTS:
        assert old.encode(text) == new.encode(text), text
        assert old.decode(old.encode(text)) == new.decode(new.encode(text)), text


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_json_equals_transformers(tmp_path, sp_dir, legacy):
    path = write_tokenizers_dir(sp_dir, tmp_path / "json", legacy=legacy)
    ours = Tokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.backend == "tokenizers" and ours.vocab_size == len(theirs) == 53516
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False).input_ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    # With tokenizer.model beside it, the sentencepiece backend can still be asked for (AnyGPT's scripts
    # always used the slow tokenizer); it then reads tokenizer_config.json's added tokens and legacy.
    shutil.copy(sp_dir / "tokenizer.model", path / "tokenizer.model")
    slow = Tokenizer.from_pretrained(path, backend="sentencepiece")
    reference = Tokenizer.from_pretrained(write_sentencepiece_dir(tmp_path / "sp", sp_dir.joinpath(
        "tokenizer.model").read_bytes(), legacy=legacy))
    assert slow.backend == "sentencepiece"
    assert [slow.encode(t) for t in TEXTS] == [reference.encode(t) for t in TEXTS]


def test_vocabulary_and_lookups(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    layout = Vocabulary.anygpt()
    assert tok.added_tokens["<sosp>"] == layout.start_token("speech") == 41222
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == [layout.special[t] for t in CHAT_TOKENS]
    assert tok.id_to_token(40210) == "<🗣️12>" and tok.token_to_id("<🗣️12>") == 40210
    assert tok.token_to_id("no such piece") is None
    assert Vocabulary.from_pretrained(sp_dir).spans == layout.spans


def test_bad_input(tmp_path, sp_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="backend='bpe'"):
        Tokenizer.from_pretrained(sp_dir, backend="bpe")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(sp_dir, backend="tokenizers")
    tok = Tokenizer.from_pretrained(sp_dir)
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode([1, 2])
    with pytest.raises(ValueError, match="outside the tokenizer's ids"):
        tok.decode([1, 53516])


def test_engine_takes_text_prompts(sp_dir):
    engine = Engine("tiny", device="cpu", tokenizer=sp_dir, num_blocks=64)
    text = "[Human]: hello there<eoh> [MMGPT]:"
    ids = engine.tokenizer.encode(text)
    params = SamplingParams.greedy(max_new_tokens=3)
    assert engine.generate([text], params) == engine.generate([ids], params)
    assert torch.equal(engine.logits(text), engine.logits(ids))
    with pytest.raises(TypeError, match="no tokenizer"):
        Engine("tiny", device="cpu", num_blocks=8).add_request("hello")


def test_engine_reads_a_checkpoints_tokenizer(tmp_path, model_bytes):
    # A small checkpoint whose vocabulary is LLaMA's plus AnyGPT's chat tokens and speech tokens.
    added = CHAT_TOKENS + anygpt_added_tokens(("speech",))[4:]
    path = write_sentencepiece_dir(tmp_path, model_bytes, added=added)
    config = ModelConfig(vocab_size=LLAMA_PIECES + len(added), hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=2, intermediate_size=64, dtype="float32")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    model.save_pretrained(str(path))
    engine = Engine(path, device="cpu", num_blocks=16)
    assert engine.tokenizer is not None and engine.tokenizer.path == path
    assert engine.vocab.modalities == ("speech",) and engine.vocab.start_token("speech") == LLAMA_PIECES + 4 + 1024
    assert engine.generate(["<sosp>"], SamplingParams.greedy(max_new_tokens=2))[0][0] in engine.vocab.range("speech")
    with pytest.raises(ValueError, match="tokenizer has 53516 ids"):
        Engine(config, device="cpu", num_blocks=8, tokenizer=write_sentencepiece_dir(tmp_path / "big", model_bytes))
