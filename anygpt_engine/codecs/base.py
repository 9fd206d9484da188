"""What every waveform codec facade shares (SpeechTokenizer, EnCodec): an encoder network to
frames, RVQ on the engine's ops, a decoder network back to samples, and one contract:

    encode(wav, sample_rate, levels=None) -> int64 codes [B, levels, T]
        wav [samples] (B = 1), [B, samples] or [B, C, samples] (mixed to mono by the channel
        mean), resampled to the codec's rate inside (codecs.audio.resample); or a list of
        [samples] / [C, samples] wavs of any lengths, giving a list of [levels, T_b], each item
        coded alone (padding them into one batch would change the last frames: the convs look
        ahead). Items of one batch never affect each other.
    decode(codes [B, L, T], [L, T] or a list of [L, T_b]) -> float32 wav [B, T * hop] (or a
        list of [T_b * hop]) at the codec's sample_rate, L <= the codec's codebooks.

A subclass provides `_encode_frames(wav [B, 1, S]) -> [B, D, T]` and
`_decode_frames(frames [B, D, T]) -> [B, 1, S']`, and sets sample_rate, hop_length, levels
(the default number of levels) and the codebooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from anygpt_engine import ops
from anygpt_engine.codecs.audio import as_batch, resample
from anygpt_engine.ops.rvq import RVQCodebooks


class RVQCodec(ABC):
    sample_rate: int
    hop_length: int
    levels: int  # what encode() computes by default
    codebooks: RVQCodebooks
    device: torch.device
    dtype: torch.dtype

    def __init__(self, codebooks: RVQCodebooks):
        self.codebooks = codebooks
        self._leading = {codebooks.levels: codebooks}  # first-L-level views, made on first use

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.levels

    @property
    def codebook_size(self) -> int:
        return self.codebooks.codebook_size

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @abstractmethod
    def _encode_frames(self, wav: torch.Tensor) -> torch.Tensor:
        """The encoder network: wav [B, 1, S] -> frames [B, D, T]."""

    @abstractmethod
    def _decode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """The decoder network: frames [B, D, T] -> wav [B, 1, S']."""

    def _first_levels(self, levels: int) -> RVQCodebooks:
        if levels not in self._leading:
            self._leading[levels] = RVQCodebooks(self.codebooks.embed[:levels])
        return self._leading[levels]

    def _check_levels(self, levels) -> int:
        if levels is None:
            return self.levels
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= self.num_codebooks:
            raise ValueError(f"levels={levels!r}, expected an int in [1, {self.num_codebooks}] (this model's "
                             "codebooks)")
        return levels

    def encode(self, wav, sample_rate: int, levels: int | None = None):
        """Codes int64 [B, levels, T] of wav (see module doc) sampled at `sample_rate` Hz; for a
        list of wavs, a list of [levels, T_i]."""
        _check_rate(sample_rate)
        levels = self._check_levels(levels)
        if isinstance(wav, (list, tuple)):
            if not wav:
                raise ValueError("wav is an empty list, expected at least one waveform")
            items = [_as_one(f"wav[{i}]", w) for i, w in enumerate(wav)]
            return [self._encode(item, sample_rate, levels)[0] for item in items]
        return self._encode(as_batch("wav", wav), sample_rate, levels)

    @torch.inference_mode()
    def _encode(self, wav: torch.Tensor, sample_rate: int, levels: int) -> torch.Tensor:
        wav = resample(wav.to(self.device), sample_rate, self.sample_rate)
        frames = self._encode_frames(wav.unsqueeze(1).to(self.dtype))  # [B, D, T]
        codes = ops.rvq_encode(frames.transpose(1, 2).float(), self._first_levels(levels))  # [L, B, T]
        return codes.permute(1, 0, 2).contiguous()

    def decode(self, codes):
        """float32 wav [B, T * hop_length] at sample_rate from codes [B, L, T] or [L, T]; for a
        list of [L, T_i], a list of [T_i * hop_length]."""
        if isinstance(codes, (list, tuple)):
            if not codes:
                raise ValueError("codes is an empty list, expected at least one [levels, frames] tensor")
            items = [self._check_codes(f"codes[{i}]", c, ndim=(2,)) for i, c in enumerate(codes)]
            return [self._decode(item)[0] for item in items]
        return self._decode(self._check_codes("codes", codes, ndim=(2, 3)))

    @torch.inference_mode()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        frames = ops.rvq_decode(codes.transpose(0, 1), self.codebooks, check_codes=False)  # [B, T, D]
        return self._decode_frames(frames.transpose(1, 2).to(self.dtype)).float()[:, 0]

    def _check_codes(self, name: str, codes, ndim: tuple[int, ...]) -> torch.Tensor:
        """codes as int64 [B, L, T] on the codec's device; raises naming `name` for anything else."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integer codes, got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"{name}.dtype={codes.dtype}, expected integer codes (int64)")
        if codes.dim() not in ndim:
            shapes = " or ".join({2: "[levels, frames]", 3: "[B, levels, frames]"}[n] for n in ndim)
            raise ValueError(f"{name}.shape={tuple(codes.shape)}, expected {shapes}")
        given_dim = codes.dim()
        if given_dim == 2:
            codes = codes[None]
        if codes.shape[0] == 0 or codes.shape[2] == 0:
            raise ValueError(f"{name}.shape={tuple(codes.shape)} is empty, expected at least one item and frame")
        if not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"{name} has {codes.shape[1]} levels, expected 1 to {self.num_codebooks} "
                             "(this model's codebooks)")
        codes = codes.to(device=self.device, dtype=torch.int64)
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            value = codes[tuple(where)].item()
            raise ValueError(f"{name}{where[3 - given_dim:]}={value} is out of range, expected 0 <= code < "
                             f"{self.codebook_size}")
        return codes


def _check_rate(sample_rate) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate!r}, expected a positive int (Hz)")


def _as_one(name: str, wav) -> torch.Tensor:
    """One item of a list: [samples] or [C, samples] -> [1, samples]."""
    if isinstance(wav, torch.Tensor) and wav.dim() == 2:
        wav = wav[None]  # [C, samples] -> [1, C, samples]
    elif isinstance(wav, torch.Tensor) and wav.dim() != 1:
        raise ValueError(f"{name}.shape={tuple(wav.shape)}, expected [samples] or [channels, samples]")
    return as_batch(name, wav)
