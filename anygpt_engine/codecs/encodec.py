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

from anygpt_engine.codecs.base import RVQCodec
from anygpt_engine.models.encodec import ANYGPT_LEVELS, EncodecConfig, EncodecNetwork


class Encodec(RVQCodec):
    def __init__(self, network: EncodecNetwork):
        if not isinstance(network, EncodecNetwork):
            raise TypeError(f"network must be an EncodecNetwork, got {type(network).__name__}")
        super().__init__(network.codebooks())
        self.network = network
        config = network.config
        self.config: EncodecConfig = config
        self.sample_rate: int = config.sampling_rate
        self.hop_length: int = config.hop_length  # samples per frame
        self.levels: int = min(ANYGPT_LEVELS, self.num_codebooks)
        self.dtype: torch.dtype = network.encoder.layers[0].weight.dtype

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "Encodec":
        """From a transformers-format directory (config.json + model.safetensors). dtype is the
        network's (float32 by default); the codebooks and the RVQ stay float32."""
        return cls(EncodecNetwork.from_pretrained(path, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.network.encoder.layers[0].weight.device

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate  # Hz (transformers' ceil(sample_rate / hop_length))

    def __repr__(self) -> str:
        return (f"Encodec({self.sample_rate} Hz, {self.frame_rate} frames/s, {self.num_codebooks} x "
                f"{self.codebook_size} codebooks, levels={self.levels}, device={self.device})")

    def levels_for_bandwidth(self, bandwidth: float) -> int:
        """Codebooks transformers' EncodecModel uses at `bandwidth` kbps (floor, at least 1)."""
        return self.config.levels_for_bandwidth(bandwidth)

    def _encode_frames(self, wav: torch.Tensor) -> torch.Tensor:
        return self.network.embed(wav)

    def _decode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.network.decode_frames(frames)
