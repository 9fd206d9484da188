"""EnCodec as a codec: wav in, codes out, and back (models.encodec holds the network).

    codec = Encodec.from_pretrained("facebook/encodec_32khz")   # a local transformers-format directory
    codes = codec.encode(wav, 44100)           # int64 [B, 4, T], T = ceil(samples at 32 kHz / 640)
    wav32k = codec.decode(codes)               # float32 [B, T * 640] at codec.sample_rate

encode takes [samples] (B = 1), [B, samples] or [B, C, samples] (mixed to mono by the channel
mean) at any sample rate (resampled inside with codecs.audio.resample), or a list of such wavs of
different lengths, each coded alone (a list of [levels, T_i] comes back). Items of one batch
never affect each other: a batch gives what each item gives alone. decode takes [B, L, T] or
[L, T] (B = 1) with L <= num_codebooks, or a list of [L, T_i].

`levels` defaults to 4, what AnyGPT uses for both models (encodec_32khz: all 4 codebooks, its
2.2 kbps; encodec_24khz: 4 of 32, transformers' bandwidth=3.0); levels_for_bandwidth gives
transformers' bandwidth rule.
"""

from __future__ import annotations

import os

import torch

from anygpt_engine.codecs.audio import as_batch, resample
from anygpt_engine.models.encodec import ANYGPT_LEVELS, EncodecConfig, EncodecNetwork


class Encodec:
    def __init__(self, network: EncodecNetwork):
        if not isinstance(network, EncodecNetwork):
            raise TypeError(f"network must be an EncodecNetwork, got {type(network).__name__}")
        self.network = network
        config = network.config
        self.config: EncodecConfig = config
        self.sample_rate: int = config.sampling_rate
        self.frame_rate: int = config.frame_rate  # Hz (transformers' ceil(sample_rate / hop_length))
        self.hop_length: int = config.hop_length  # samples per frame
        self.num_codebooks: int = config.num_quantizers
        self.codebook_size: int = config.codebook_size
        self.levels: int = min(ANYGPT_LEVELS, self.num_codebooks)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "Encodec":
        """From a transformers-format directory (config.json + model.safetensors). dtype is the
        network's (float32 by default); the codebooks and the RVQ stay float32."""
        return cls(EncodecNetwork.from_pretrained(path, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.network.encoder.layers[0].weight.device

    def __repr__(self) -> str:
        return (f"Encodec({self.sample_rate} Hz, {self.frame_rate} frames/s, {self.num_codebooks} x "
                f"{self.codebook_size} codebooks, levels={self.levels}, device={self.device})")

    def levels_for_bandwidth(self, bandwidth: float) -> int:
        """Codebooks transformers' EncodecModel uses at `bandwidth` kbps (floor, at least 1)."""
        return self.config.levels_for_bandwidth(bandwidth)

    # -- wav -> codes ------------------------------------------------------------------------------
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
        return self.network.encode(wav[:, None], levels)

    def _check_levels(self, levels) -> int:
        if levels is None:
            return self.levels
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= self.num_codebooks:
            raise ValueError(f"levels={levels!r}, expected an int in [1, {self.num_codebooks}] (this model's "
                             "codebooks)")
        return levels

    # -- codes -> wav ------------------------------------------------------------------------------
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
        return self.network.decode(codes)[:, 0]

    def _check_codes(self, name: str, codes, ndim: tuple[int, ...]) -> torch.Tensor:
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
