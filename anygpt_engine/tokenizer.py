"""Text <-> token ids for a checkpoint, with AnyGPT's added tokens.

    tok = Tokenizer.from_pretrained("/ckpt/AnyGPT-chat")
    ids = tok.encode("[Human]: hello<eoh>")            # [1, 32000, ...]: BOS first
    text = tok.decode(ids, skip_special_tokens=True)

Two backends, chosen by the files a directory ships:
- tokenizer.json: the `tokenizers` library runs the file as written; ids and text equal those of
  transformers' tokenizer loaded from the same directory (when its tokenizer_config.json's
  `legacy` matches the file's pre-tokenizer, see ENV_NOTES).
- tokenizer.model only: sentencepiece with the added tokens of tokenizer_config.json
  (`added_tokens_decoder`) or added_tokens.json, reproducing the slow LlamaTokenizer of
  transformers 4.34 that AnyGPT trained and ran with: the text is split on added tokens
  (leftmost-longest; lstrip/rstrip flags honoured) and each piece between them is encoded by
  sentencepiece on its own. `legacy` (tokenizer_config.json, default true as in 4.34) keeps the
  model's dummy prefix on every piece; legacy false gives the whole text one leading "▁" and no
  piece its own. Decoding joins added tokens and the text between them with single spaces, as
  4.34 did (AnyGPT's reply parsing expects "[MMGPT] : ...").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

SPIECE_UNDERLINE = "\u2581"
BACKENDS = ("tokenizers", "sentencepiece")


class Tokenizer:
    """A checkpoint's text tokenizer. Build with `from_pretrained(dir)`."""

    def __init__(self, backend: "_Backend", path: Path | None = None):
        self._backend = backend
        self.path = path  # the directory it was read from (None when built in memory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str | None = None) -> "Tokenizer":
        """Reads tokenizer.json (preferred) or tokenizer.model with its added-token files.
        `backend="sentencepiece"` reads tokenizer.model even when a tokenizer.json is there
        (AnyGPT's own scripts always used the sentencepiece tokenizer)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        if backend not in (None, *BACKENDS):
            raise ValueError(f"backend={backend!r}, expected None or one of {BACKENDS}")
        has_json, has_model = (path / "tokenizer.json").exists(), (path / "tokenizer.model").exists()
        if backend is None:
            backend = "tokenizers" if has_json else "sentencepiece" if has_model else None
        if backend is None:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
        config = _read_json(path / "tokenizer_config.json") or {}
        if backend == "tokenizers":
            if not has_json:
                raise FileNotFoundError(f"backend='tokenizers' needs {path / 'tokenizer.json'}")
            return cls(_TokenizersBackend(path, config), path)
        if not has_model:
            raise FileNotFoundError(f"backend='sentencepiece' needs {path / 'tokenizer.model'}")
        return cls(_SentencePieceBackend(path, config), path)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether a directory ships a tokenizer this class can read."""
        path = Path(path)
        return (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()

    @classmethod
    def for_model(cls, tokenizer, checkpoint: Path | None, vocab_size: int) -> "Tokenizer | None":
        """The tokenizer an Engine uses: the one given (a Tokenizer or a directory), else the
        checkpoint directory's own when it ships one, else None; checked against the model's
        vocabulary size."""
        if tokenizer is None and checkpoint is not None and cls.exists(checkpoint):
            tokenizer = checkpoint
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = cls.from_pretrained(tokenizer)
        if tokenizer is None:
            return None
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a Tokenizer or a directory, got {type(tokenizer).__name__}")
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {vocab_size}")
        return tokenizer

    # -- the API -------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the highest id + 1)."""
        return self._backend.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._backend.bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self._backend.eos_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids has {bad[:5]}, outside the tokenizer's ids [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token spelled as the tokenizer spells it (e.g. '<sosp>', '▁hello'), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id={token_id}, expected 0 <= id < {self.vocab_size}")
        return self._backend.id_to_token(token_id)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Added tokens (AnyGPT's chat and modality tokens among them): spelling -> id."""
        return dict(self._backend.added)

    def __repr__(self) -> str:
        return f"Tokenizer({self.backend}, {self.vocab_size} ids, path={str(self.path) if self.path else None})"


class _Backend:
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    added: dict[str, int]


def _read_json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or
    an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class _TokenizersBackend(_Backend):
    name = "tokenizers"

    def __init__(self, path: Path, config: dict):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as err:
            raise ImportError("reading tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from err
        self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        specials = _read_json(path / "special_tokens_map.json") or {}
        bos = _token_content(config.get("bos_token", specials.get("bos_token", "<s>")))
        eos = _token_content(config.get("eos_token", specials.get("eos_token", "</s>")))
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        self.eos_id = self._tok.token_to_id(eos) if eos else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


class _AddedToken:
    __slots__ = ("content", "lstrip", "rstrip", "single_word", "special")

    def __init__(self, content: str, lstrip=False, rstrip=False, single_word=False, special=False):
        self.content, self.lstrip, self.rstrip = content, bool(lstrip), bool(rstrip)
        self.single_word, self.special = bool(single_word), bool(special)


class _SentencePieceBackend(_Backend):
    """transformers 4.34's slow LlamaTokenizer, on the sentencepiece library."""

    name = "sentencepiece"

    def __init__(self, path: Path, config: dict):
        try:
            import sentencepiece
        except ImportError as err:
            raise ImportError("reading tokenizer.model needs the `sentencepiece` package "
                              "(pip install sentencepiece)") from err
        self.legacy = config.get("legacy")
        self.legacy = True if self.legacy is None else bool(self.legacy)
        proto = (path / "tokenizer.model").read_bytes()
        if not self.legacy:
            # Turn off the dummy prefix as 4.34 did for legacy=False. A serialized protobuf
            # message followed by another merges field by field, so appending
            # ModelProto{normalizer_spec (field 3): {add_dummy_prefix (field 3): false}} sets just
            # that flag (no protobuf package needed).
            proto += b"\x1a\x02\x18\x00"
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(proto)
        self._num_pieces = self._sp.get_piece_size()

        specials = _read_json(path / "special_tokens_map.json") or {}

        def special(name, default):
            value = config.get(name, specials.get(name, default))
            return _token_content(value)

        self.unk_token, self.bos_token = special("unk_token", "<unk>"), special("bos_token", "<s>")
        self.eos_token, self.pad_token = special("eos_token", "</s>"), special("pad_token", None)
        extra = config.get("additional_special_tokens", specials.get("additional_special_tokens")) or []
        self.special_tokens = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t]
        self.special_tokens += [_token_content(t) for t in extra if _token_content(t) not in self.special_tokens]
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

        # Added tokens: 4.34's tokenizer_config.json lists them with their flags; older checkpoints
        # have added_tokens.json (4.34 read those with no stripping); newer ones only tokenizer.json.
        # Special tokens are added tokens too, so the text is split on them.
        decoder: dict[int, _AddedToken] = {}
        for index, entry in (config.get("added_tokens_decoder") or {}).items():
            decoder[int(index)] = _AddedToken(entry["content"], entry.get("lstrip"), entry.get("rstrip"),
                                              entry.get("single_word"), entry.get("special"))
        if not decoder:
            for content, index in (_read_json(path / "added_tokens.json") or {}).items():
                decoder[int(index)] = _AddedToken(content, special=content in self.special_tokens)
        if not decoder and (path / "tokenizer.json").exists():
            for entry in (_read_json(path / "tokenizer.json") or {}).get("added_tokens", []):
                decoder[int(entry["id"])] = _AddedToken(entry["content"], entry.get("lstrip"), entry.get("rstrip"),
                                                        entry.get("single_word"), entry.get("special"))
        for content in self.special_tokens:
            if content not in {t.content for t in decoder.values()}:
                index = self._sp.piece_to_id(content)
                if index != self._sp.unk_id() or content == self.unk_token:
                    decoder[index] = _AddedToken(content, special=True)
        self._decoder = decoder
        self.added = {t.content: i for i, t in decoder.items()}
        self.vocab_size = max(self._num_pieces, max(decoder, default=-1) + 1)
        missing = [i for i in range(self._num_pieces, self.vocab_size) if i not in decoder]
        if missing:
            raise ValueError(f"{path}: added token ids skip {missing[:5]} (ids past tokenizer.model's "
                             f"{self._num_pieces} pieces must all be added tokens)")
        self.bos_id = self.added.get(self.bos_token) if self.bos_token else None
        self.eos_id = self.added.get(self.eos_token) if self.eos_token else None
        self._special_ids = {self.added[t] for t in self.special_tokens if t in self.added}
        # For the split: candidate lengths of added tokens, by first character, longest first.
        self._lengths: dict[str, list[int]] = {}
        for content in self.added:
            self._lengths.setdefault(content[0], []).append(len(content))
        for lengths in self._lengths.values():
            lengths[:] = sorted(set(lengths), reverse=True)
        self._unk_length = len(self._sp.encode(str(self.unk_token))) if self.unk_token else 0

    # -- encoding ------------------------------------------------------------------------------
    def _split(self, text: str) -> list[str]:
        """Text cut at added tokens, leftmost-longest match first (4.34's trie split)."""
        parts, start, i, n = [], 0, 0, len(text)
        while i < n:
            match = None
            for length in self._lengths.get(text[i], ()):
                if text[i:i + length] in self.added:
                    match = length
                    break
            if match is None:
                i += 1
                continue
            if i > start:
                parts.append(text[start:i])
            parts.append(text[i:i + match])
            i = start = i + match
        if start < n:
            parts.append(text[start:])
        return parts

    def _tokenize(self, text: str) -> list[str]:
        parts = self._split(text)
        for i, part in enumerate(parts):
            if part not in self.added:
                continue
            token = self._decoder[self.added[part]]
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if token.rstrip and right:
                parts[i + 1] = right.lstrip()
            if token.lstrip and left:
                parts[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif token.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        pieces = []
        for part in parts:
            if not part:
                continue
            if part in self.added:
                pieces.append(part)
            else:
                pieces.extend(self._encode_piece(part))
        return pieces

    def _encode_piece(self, text: str) -> list[str]:
        pieces = self._sp.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return pieces
        # Without the dummy prefix sentencepiece drops a leading "▁"; encoding "<unk>" + text
        # and cutting the unk's pieces keeps it (4.34's trick).
        pieces = self._sp.encode(self.unk_token + text, out_type=str)
        return pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces

    def encode(self, text: str) -> list[int]:
        if self.legacy or not text:
            pieces = self._tokenize(text)
        else:
            pieces = self._tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
            if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.special_tokens:
                pieces = pieces[1:]
        # 4.34's piece -> id: added tokens first, then sentencepiece (unknown pieces -> <unk>).
        return [self.added[p] if p in self.added else self._sp.piece_to_id(p) for p in pieces]

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        texts, run = [], []
        for index in ids:
            if skip_special_tokens and index in self._special_ids:
                continue
            token = self.id_to_token(index)
            if index in self._decoder and token not in self.special_tokens:
                if run:
                    string = self._pieces_to_string(run)
                    if string:
                        texts.append(string)
                    run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(self._pieces_to_string(run))
        text = " ".join(texts)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def _pieces_to_string(self, pieces: list[str]) -> str:
        if pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = [pieces[0][1:], *pieces[1:]]
        out, run, previous_special = "", [], False
        for i, piece in enumerate(pieces):
            if piece in self.special_tokens:
                if not previous_special and i != 0 and self.legacy:
                    out += " "
                out += self._sp.decode(run) + piece
                previous_special, run = True, []
            else:
                run.append(piece)
                previous_special = False
        return out + self._sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        index = self.added.get(token)
        if index is not None:
            return index
        index = self._sp.piece_to_id(token)
        return index if self._sp.id_to_piece(index) == token else None

    def id_to_token(self, token_id: int) -> str:
        token = self._decoder.get(token_id)
        return token.content if token is not None else self._sp.id_to_piece(token_id)


def _clean_up_spaces(text: str) -> str:
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text
