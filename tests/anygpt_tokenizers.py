"""Small LLaMA-style tokenizers with AnyGPT's added tokens, built offline for tests.

A sentencepiece BPE model is trained on a generated corpus with LLaMA's settings (byte
fallback, split digits, dummy prefix, whitespace kept, <unk> <s> </s> = 0 1 2) and padded with
unused pieces to LLaMA's 32000, so AnyGPT's added tokens get AnyGPT-base's ids (32000...).
The directories look like what transformers 4.34 (AnyGPT's version) saved: tokenizer.model,
tokenizer_config.json with `added_tokens_decoder` and `legacy`, special_tokens_map.json.
"""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path

from anygpt_engine.vocab import MODALITIES, Vocabulary, end_token_text, start_token_text, value_token

CHAT_TOKENS = ["[Human]", "[MMGPT]", "<eoh>", "<eos>"]
LLAMA_PIECES = 32000
_WORDS = ("the a an speech music image hello world you are assistant named who can understand and generate "
          "multimodal content including text images audio please read this input human reply listen play song "
          "picture describe what how today fine thank transcribe given compose piece from The You Hello What "
          "Please Sure I am MMGPT AI is it of to in").split()


def anygpt_added_tokens(modalities=MODALITIES) -> list[str]:
    """AnyGPT's added tokens in the order its training script added them."""
    tokens = list(CHAT_TOKENS)
    layout = Vocabulary.anygpt()
    for name in modalities:
        tokens += [value_token(name, v) for v in range(layout.span(name).num_values)]
        tokens += [start_token_text(name), end_token_text(name)]
    return tokens


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _unused_piece(i: int) -> bytes:
    """ModelProto.pieces entry {piece: "<unusedN>", score: 0, type: UNUSED}, serialized."""
    text = f"<unused{i}>".encode()
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(5)
    return b"\x0a" + _varint(len(body)) + body


def sentencepiece_model(pieces: int = LLAMA_PIECES, seed: int = 0) -> bytes:
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?", ",", ""])
             for _ in range(2000)]
    lines += ["Numbers 12 345 6789 and symbols: [x] <y> (z) {w} - _ ; ' \" :"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=600, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    proto = model.getvalue()
    trained = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    # Repeated fields of a serialized message may be appended: these pieces follow the trained ones.
    return proto + b"".join(_unused_piece(i) for i in range(pieces - trained))


def _added(content: str, index: int, special: bool = False, strip: bool = False) -> dict:
    return {"content": content, "lstrip": strip, "normalized": not special, "rstrip": strip, "single_word": False,
            "special": special}


def write_sentencepiece_dir(path: Path, model: bytes, *, legacy: bool | None = True, added=None,
                            strip_tokens=(), added_tokens_json: bool = False) -> Path:
    """A tokenizer directory as transformers 4.34's slow LlamaTokenizer saves it after AnyGPT's
    add_tokens calls. strip_tokens get lstrip/rstrip; added_tokens_json writes the older format
    (added_tokens.json, no flags) instead of `added_tokens_decoder`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model)
    added = anygpt_added_tokens() if added is None else added
    decoder = {"0": _added("<unk>", 0, True), "1": _added("<s>", 1, True), "2": _added("</s>", 2, True)}
    for i, token in enumerate(added):
        decoder[str(LLAMA_PIECES + i)] = _added(token, LLAMA_PIECES + i, strip=token in strip_tokens)
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "LlamaTokenizer", "sp_model_kwargs": {}, "model_max_length": 4096}
    if legacy is not None:
        config["legacy"] = legacy
    if added_tokens_json:
        (path / "added_tokens.json").write_text(json.dumps({t: LLAMA_PIECES + i for i, t in enumerate(added)},
                                                           ensure_ascii=False), encoding="utf-8")
    else:
        config["added_tokens_decoder"] = decoder
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    specials = {name: {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
                for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    (path / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    return path


def write_tokenizers_dir(source: Path, path: Path, *, legacy: bool) -> Path:
    """tokenizer.json as transformers 5 converts and saves the sentencepiece directory; `legacy`
    is written back to tokenizer_config.json (transformers 5 drops it, then reloads with
    legacy=False whatever tokenizer.json says)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(source), legacy=legacy).save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["legacy"] = legacy
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path
