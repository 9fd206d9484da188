"""AnyGPT's extended vocabulary: text ids, then per modality a run of value tokens and its
start/end tokens. Converts codec codes to token ids and back.

Token spellings are AnyGPT's (anygpt/src/m_utils/anything2token.py): value n of a modality is
`<{prefix}{n}>` with prefixes image '\U0001f440', speech '\U0001f5e3\ufe0f', music '\U0001f3b6',
audio '\U0001f442'; starts/ends are <soim>/<eoim>, <sosp>/<eosp>, <somu>/<eomu>, <soau>/<eoau>.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

MODALITIES = ("image", "speech", "music", "audio")

_PREFIX = {"image": "\U0001f440", "speech": "\U0001f5e3\ufe0f", "music": "\U0001f3b6", "audio": "\U0001f442"}
_MARK = {"image": "im", "speech": "sp", "music": "mu", "audio": "au"}
_NUM_VALUES = {"image": 8192, "speech": 1024, "music": 8192, "audio": 4096}

MUSIC_CODEBOOKS = 4
MUSIC_CODEBOOK_SIZE = 2048


def value_token(modality: str, value: int) -> str:
    """AnyGPT's spelling of a modality value token, e.g. value_token("speech", 12) == "<🗣️12>"."""
    return f"<{_PREFIX[modality]}{value}>"


def start_token_text(modality: str) -> str:
    """The start token's spelling: <soim>, <sosp>, <somu> or <soau>."""
    return f"<so{_MARK[modality]}>"


def end_token_text(modality: str) -> str:
    """The end token's spelling: <eoim>, <eosp>, <eomu> or <eoau>."""
    return f"<eo{_MARK[modality]}>"


@dataclass(frozen=True)
class ModalitySpan:
    first_value: int  # token id of value 0
    num_values: int
    start_token: int  # <soX>
    end_token: int  # <eoX>

    @property
    def values(self) -> range:
        return range(self.first_value, self.first_value + self.num_values)


class Vocabulary:
    """Token-id layout of one checkpoint. Build with `anygpt()`, `from_pretrained(dir)` or
    `text_only(size)` (a plain LLaMA vocabulary without modality tokens)."""

    def __init__(self, size: int, spans: dict[str, ModalitySpan], special: dict[str, int] | None = None):
        if size <= 0:
            raise ValueError(f"size={size}, expected > 0")
        for name, span in spans.items():
            if name not in MODALITIES:
                raise ValueError(f"modality {name!r}, expected one of {MODALITIES}")
            top = max(span.first_value + span.num_values - 1, span.start_token, span.end_token)
            if min(span.first_value, span.start_token, span.end_token) < 0 or top >= size:
                raise ValueError(f"{name} tokens {span} fall outside the vocabulary [0, {size})")
        self.size = size
        self.spans = dict(spans)
        self.special = dict(special or {})

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def anygpt(cls) -> "Vocabulary":
        """AnyGPT-base's layout: 32000 LLaMA tokens, 4 chat tokens, then image, speech, music, audio."""
        special = {"[Human]": 32000, "[MMGPT]": 32001, "<eoh>": 32002, "<eos>": 32003}
        spans, next_id = {}, 32004
        for name in MODALITIES:
            n = _NUM_VALUES[name]
            spans[name] = ModalitySpan(next_id, n, next_id + n, next_id + n + 1)
            next_id += n + 2
        return cls(next_id, spans, special)

    @classmethod
    def text_only(cls, size: int) -> "Vocabulary":
        return cls(size, {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Vocabulary":
        """Reads the added tokens of a checkpoint's tokenizer files (tokenizer.json,
        added_tokens.json or tokenizer_config.json); modality ranges come from them."""
        path = Path(path)
        tokens = _read_added_tokens(path)
        if tokens is None:
            raise FileNotFoundError(f"no tokenizer.json, added_tokens.json or tokenizer_config.json in {path}")
        size = max(tokens.values(), default=-1) + 1
        config = path / "config.json"
        if config.exists():
            size = max(size, int(json.loads(config.read_text()).get("vocab_size", size)))
        spans = {}
        for name in MODALITIES:
            start, end = tokens.get(f"<so{_MARK[name]}>"), tokens.get(f"<eo{_MARK[name]}>")
            first = tokens.get(f"<{_PREFIX[name]}0>")
            if start is None and end is None and first is None:
                continue
            if start is None or end is None or first is None:
                raise ValueError(f"{path}: the {name} tokens are incomplete (start {start}, end {end}, value 0 {first})")
            n = 0
            while tokens.get(f"<{_PREFIX[name]}{n}>") == first + n:
                n += 1
            if f"<{_PREFIX[name]}{n}>" in tokens:
                raise ValueError(f"{path}: {name} value token {n} has id {tokens[f'<{_PREFIX[name]}{n}>']}, "
                                 f"expected {first + n} (values must be consecutive ids)")
            spans[name] = ModalitySpan(first, n, start, end)
        special = {t: tokens[t] for t in ("[Human]", "[MMGPT]", "<eoh>", "<eos>", "<-Res->", "<-Ins->") if t in tokens}
        return cls(size, spans, special)

    # -- lookups ---------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(name for name in MODALITIES if name in self.spans)

    def span(self, modality: str) -> ModalitySpan:
        try:
            return self.spans[modality]
        except KeyError:
            raise ValueError(f"modality={modality!r}, expected one of {self.modalities} for this vocabulary") from None

    def range(self, modality: str) -> range:
        """Token ids of the modality's values (not its start/end tokens)."""
        return self.span(modality).values

    def start_token(self, modality: str) -> int:
        return self.span(modality).start_token

    def end_token(self, modality: str) -> int:
        return self.span(modality).end_token

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        spans = ", ".join(f"{n}={s.first_value}..{s.first_value + s.num_values - 1}" for n, s in self.spans.items())
        return f"Vocabulary(size={self.size}, {spans})"

    # -- codes <-> token ids ---------------------------------------------------------------
    def encode_speech(self, codes):
        """SpeechTokenizer RVQ level-1 codes (0..1023) -> token ids."""
        return self._encode("speech", codes)

    def decode_speech(self, ids):
        return self._decode("speech", ids)

    def values(self, modality: str, ids):
        """The value numbers of a modality's value-token ids (<🎶4100> -> 4100); other ids raise."""
        return self._decode(modality, ids)

    def encode_image(self, codes):
        """SEED codes (0..8191) -> token ids."""
        return self._encode("image", codes)

    def decode_image(self, ids):
        return self._decode("image", ids)

    def encode_music(self, codes):
        """EnCodec codes [4, T] (0..2047) -> T*4 ids, frame-major: frame t gives
        levels 0..3 as value code + 2048*level."""
        tensor, as_list = _as_long_tensor("codes", codes)
        if tensor.dim() != 2 or tensor.shape[0] != MUSIC_CODEBOOKS:
            raise ValueError(f"codes.shape={tuple(tensor.shape)}, expected [{MUSIC_CODEBOOKS}, T]")
        _check_range("codes", tensor, MUSIC_CODEBOOK_SIZE)
        levels = torch.arange(MUSIC_CODEBOOKS, device=tensor.device).unsqueeze(1)
        values = (tensor + MUSIC_CODEBOOK_SIZE * levels).t().reshape(-1)
        ids = values + self.span("music").first_value
        return ids.tolist() if as_list else ids

    def decode_music(self, ids):
        """Inverse of encode_music: T*4 frame-major ids -> codes [4, T]."""
        values, as_list = self._values("music", ids)
        if values.numel() % MUSIC_CODEBOOKS:
            raise ValueError(f"len(ids)={values.numel()}, expected a multiple of {MUSIC_CODEBOOKS} (whole frames)")
        frames = values.view(-1, MUSIC_CODEBOOKS)
        levels = torch.arange(MUSIC_CODEBOOKS, device=frames.device)
        level_of = torch.div(frames, MUSIC_CODEBOOK_SIZE, rounding_mode="floor")
        if not torch.equal(level_of, levels.expand_as(frames)):
            bad = (level_of != levels).nonzero()[0].tolist()
            raise ValueError(f"ids[{bad[0] * MUSIC_CODEBOOKS + bad[1]}] is a level-{level_of[bad[0], bad[1]].item()} "
                             f"music token at level position {bad[1]}; expected frame-major levels 0..3")
        codes = (frames - MUSIC_CODEBOOK_SIZE * levels).t().contiguous()
        return codes.tolist() if as_list else codes

    def _encode(self, modality: str, codes):
        span = self.span(modality)
        tensor, as_list = _as_long_tensor("codes", codes)
        _check_range("codes", tensor, span.num_values)
        ids = tensor + span.first_value
        return ids.tolist() if as_list else ids

    def _values(self, modality: str, ids):
        span = self.span(modality)
        tensor, as_list = _as_long_tensor("ids", ids)
        values = tensor - span.first_value
        bad = (values < 0) | (values >= span.num_values)
        if bad.any():
            i = bad.reshape(-1).nonzero()[0].item()
            raise ValueError(f"ids[{i}]={tensor.reshape(-1)[i].item()} is not a {modality} value token, expected an "
                             f"id in [{span.first_value}, {span.first_value + span.num_values})")
        return values, as_list

    def _decode(self, modality: str, ids):
        values, as_list = self._values(modality, ids)
        return values.tolist() if as_list else values


def _as_long_tensor(name: str, data) -> tuple[torch.Tensor, bool]:
    """(int64 tensor, whether the caller passed a plain sequence and wants a list back)."""
    if isinstance(data, torch.Tensor):
        if data.dtype.is_floating_point or data.dtype == torch.bool or data.is_complex():
            raise TypeError(f"{name}.dtype={data.dtype}, expected an integer dtype")
        return data.long(), False
    try:
        tensor = torch.as_tensor(data)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be integers (a list, array or tensor): {err}") from None
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected integers")
    return tensor.long(), True


def _check_range(name: str, tensor: torch.Tensor, limit: int) -> None:
    bad = (tensor < 0) | (tensor >= limit)
    if bad.any():
        flat = tensor.reshape(-1)
        i = bad.reshape(-1).nonzero()[0].item()
        raise ValueError(f"{name} has value {flat[i].item()} at flat index {i}, expected 0 <= code < {limit}")


def _read_added_tokens(path: Path) -> dict[str, int] | None:
    found = None
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.exists():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        found = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    added = path / "added_tokens.json"
    if added.exists():
        found = {**(found or {}), **{k: int(v) for k, v in json.loads(added.read_text(encoding="utf-8")).items()}}
    config = path / "tokenizer_config.json"
    if config.exists():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder")
        if decoder:
            found = {**(found or {}), **{v["content"]: int(k) for k, v in decoder.items()}}
    return found


def token_ids(name: str, ids: Iterable[int] | Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """A prompt as a list of ints, checked against the vocabulary size."""
    if isinstance(ids, torch.Tensor) or hasattr(ids, "__dlpack__"):
        tensor = ids if isinstance(ids, torch.Tensor) else torch.from_dlpack(ids)
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise TypeError(f"{name} has dtype {tensor.dtype}, expected integer token ids")
        if tensor.dim() != 1:
            raise ValueError(f"{name}.shape={tuple(tensor.shape)}, expected a 1-D sequence of token ids")
        values = tensor.tolist()
    else:
        try:
            values = list(ids)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of token ids, got {type(ids).__name__}") from None
    if not values:
        raise ValueError(f"{name} is empty, expected at least one token id")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            if hasattr(v, "__index__") and not isinstance(v, bool):
                v = values[i] = v.__index__()
            else:
                raise TypeError(f"{name}[{i}]={v!r} is not an integer token id")
        if not 0 <= v < vocab_size:
            raise ValueError(f"{name}[{i}]={v} is outside the vocabulary, expected 0 <= id < {vocab_size}")
    return values
