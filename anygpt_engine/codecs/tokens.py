"""Codec codes <-> AnyGPT token ids, through the Vocabulary (AnyGPT-base's layout by default).

- Speech: the LLM sees SpeechTokenizer's first RVQ level (the semantic one, "RVQ-1").
- Music: EnCodec's 4 levels flattened frame-major, value = code + 2048 * level.
- Image: SEED's 32 codes per image.
Each *_tokens helper optionally wraps the ids in the modality's start/end tokens.
"""

from __future__ import annotations

import torch

from anygpt_engine.vocab import Vocabulary


def _vocab(vocab: Vocabulary | None) -> Vocabulary:
    return vocab if vocab is not None else Vocabulary.anygpt()


def _wrap(ids: torch.Tensor, vocab: Vocabulary, modality: str, markers: bool) -> torch.Tensor:
    if not markers:
        return ids
    start = torch.tensor([vocab.start_token(modality)], dtype=ids.dtype, device=ids.device)
    end = torch.tensor([vocab.end_token(modality)], dtype=ids.dtype, device=ids.device)
    return torch.cat([start, ids, end])


def _unwrap(ids: torch.Tensor, vocab: Vocabulary, modality: str) -> torch.Tensor:
    if ids.numel() and ids[0].item() == vocab.start_token(modality):
        ids = ids[1:]
    if ids.numel() and ids[-1].item() == vocab.end_token(modality):
        ids = ids[:-1]
    return ids


def _as_codes(name: str, codes) -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"{name}.dtype={codes.dtype}, expected integer codes")
    return codes.long()


def speech_tokens(codes, vocab: Vocabulary | None = None, *, markers: bool = False) -> torch.Tensor:
    """SpeechTokenizer codes [L, T] (rvq_encode of [T, D] frames) or level-1 codes [T] -> ids [T]."""
    codes = _as_codes("codes", codes)
    if codes.dim() == 2:
        codes = codes[0]
    if codes.dim() != 1:
        raise ValueError(f"codes.shape={tuple(codes.shape)}, expected [levels, T] or [T]")
    vocab = _vocab(vocab)
    return _wrap(vocab.encode_speech(codes), vocab, "speech", markers)


def speech_codes(ids, vocab: Vocabulary | None = None) -> torch.Tensor:
    """Speech ids (start/end tokens allowed) -> level-1 codes [T], SoundStorm's semantic input."""
    vocab = _vocab(vocab)
    return vocab.decode_speech(_unwrap(_as_codes("ids", ids).reshape(-1), vocab, "speech"))


def music_tokens(codes, vocab: Vocabulary | None = None, *, markers: bool = False) -> torch.Tensor:
    """EnCodec codes [4, T] -> ids [4 T], frame-major (frame t: levels 0..3)."""
    vocab = _vocab(vocab)
    return _wrap(vocab.encode_music(_as_codes("codes", codes)), vocab, "music", markers)


def music_codes(ids, vocab: Vocabulary | None = None) -> torch.Tensor:
    """Music ids (start/end tokens allowed) -> EnCodec codes [4, T] for rvq_decode."""
    vocab = _vocab(vocab)
    return vocab.decode_music(_unwrap(_as_codes("ids", ids).reshape(-1), vocab, "music"))


def image_tokens(codes, vocab: Vocabulary | None = None, *, markers: bool = False) -> torch.Tensor:
    """SEED codes [32] (or [1, 32] from rvq_encode) -> ids."""
    codes = _as_codes("codes", codes).reshape(-1)
    vocab = _vocab(vocab)
    return _wrap(vocab.encode_image(codes), vocab, "image", markers)


def image_codes(ids, vocab: Vocabulary | None = None) -> torch.Tensor:
    """Image ids (start/end tokens allowed) -> SEED codes."""
    vocab = _vocab(vocab)
    return vocab.decode_image(_unwrap(_as_codes("ids", ids).reshape(-1), vocab, "image"))
