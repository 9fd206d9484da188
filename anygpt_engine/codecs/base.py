"""What every waveform codec facade shares (SpeechTokenizer, EnCodec): an encoder network to
frames, RVQ on the engine's ops, a decoder network back to samples, and one contract:

    encode(wav, sample_rate, levels=None) -> int64 codes [B, levels, T]
        wav [samples] (B = 1), [B, samples] or [B, C, samples] (mixed to mono by the channel
        mean), resampled to the codec's rate inside (codecs.audio.resample); or a list of 1-D
        wavs of any lengths, giving a list of [levels, T_b] (each item encoded alone).
    decode(codes [B, L, T] or a list of [L, T_b]) -> float32 wav [B, samples] (or a list),
        at the codec's sample_rate, L <= the codec's levels.

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
            raise ValueError(f"levels={levels!r}, expected an int in 1..{self.num_codebooks}")
        return levels

    @torch.inference_mode()
    def encode(self, wav, sample_rate: int, levels: int | None = None):
        levels = self._check_levels(levels)
        if isinstance(wav, (list, tuple)):
            if not wav:
                raise ValueError("wav is an empty list, expected at least one waveform")
            return [self.encode(self._item("wav", i, w, 1), sample_rate, levels)[0] for i, w in enumerate(wav)]
        batch = resample(as_batch("wav", wav).to(self.device), sample_rate, self.sample_rate)
        frames = self._encode_frames(batch.unsqueeze(1).to(self.dtype))  # [B, D, T]
        codes = ops.rvq_encode(frames.transpose(1, 2).float(), self._first_levels(levels))  # [L, B, T]
        return codes.permute(1, 0, 2).contiguous()

    @torch.inference_mode()
    def decode(self, codes):
        if isinstance(codes, (list, tuple)):
            if not codes:
                raise ValueError("codes is an empty list, expected at least one [levels, T] tensor")
            return [self.decode(self._item("codes", i, c, 2).unsqueeze(0))[0] for i, c in enumerate(codes)]
        codes = self._check_codes("codes", codes)
        frames = ops.rvq_decode(codes.permute(1, 0, 2), self.codebooks, check_codes=False)  # [B, T, D]
        return self._decode_frames(frames.transpose(1, 2).to(self.dtype)).float().squeeze(1)

    @staticmethod
    def _item(name: str, index: int, item, dims: int) -> torch.Tensor:
        """An element of a ragged list input: a tensor of `dims` dimensions."""
        if not isinstance(item, torch.Tensor) or item.dim() != dims:
            what = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"{name}[{index}] is {what}, expected a {dims}-D tensor "
                             f"({'[samples]' if dims == 1 else '[levels, T]'})")
        return item

    def _check_codes(self, name: str, codes) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, levels, T], got {type(codes).__name__}")
        if codes.dtype.is_floating_point or codes.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"{name}.dtype={codes.dtype}, expected integer codes")
        if codes.dim() != 3 or 0 in codes.shape:
            raise ValueError(f"{name}.shape={tuple(codes.shape)}, expected a non-empty [B, levels, T]")
        if codes.shape[1] > self.num_codebooks:
            raise ValueError(f"{name}.shape={tuple(codes.shape)}: {codes.shape[1]} levels, the codec has "
                             f"{self.num_codebooks}")
        codes = codes.to(device=self.device, dtype=torch.int64)
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"{name}{where}={codes[tuple(where)].item()} is outside the codebook, expected "
                             f"0 <= code < {self.codebook_size}")
        return codes
