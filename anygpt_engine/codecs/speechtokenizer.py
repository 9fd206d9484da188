"""SpeechTokenizer as a codec: wav <-> 8-level RVQ codes at 50 Hz (16 kHz audio).

    tok = codecs.SpeechTokenizer.from_pretrained("config.json", "SpeechTokenizer.pt")
    semantic = tok.encode(wav, 44100, levels=1)     # [B, 1, T]: all AnyGPT's input needs
    wav16k = tok.decode(codes)                      # codes [B, L, T], L <= 8

The network is models/speechtokenizer.py; the contract is codecs/base.py's.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from anygpt_engine.codecs.base import RVQCodec
from anygpt_engine.codecs.loaders import load_state_dict, speechtokenizer_codebooks
from anygpt_engine.models.speechtokenizer import SpeechTokenizerConfig, SpeechTokenizerNet, load_network
from anygpt_engine.ops.rvq import RVQCodebooks


class SpeechTokenizer(RVQCodec):
    """The encode/decode contract is RVQCodec's; `levels` defaults to all 8 (the upstream
    encode's default), and AnyGPT's speech input needs only levels=1."""

    def __init__(self, config: SpeechTokenizerConfig, state: Mapping[str, torch.Tensor] | None, device=None,
                 dtype=None, seed: int = 0):
        """`state`: the package's state dict; None gives random weights from `seed` (benchmarks)."""
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype if dtype is not None else torch.float32
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={self.dtype}, expected torch.float32, float16 or bfloat16")
        self.config = config
        self.net = SpeechTokenizerNet(config)
        if state is None:
            generator = torch.Generator().manual_seed(seed + 1)
            books = RVQCodebooks(torch.randn(config.n_q, config.codebook_size, config.dimension, generator=generator)
                                 .mul_(config.dimension ** -0.5).to(self.device))
            self.net.init_random(seed)
        else:
            books = speechtokenizer_codebooks(state, device=self.device)
            load_network(self.net, state)
        if books.levels != config.n_q or books.codebook_size != config.codebook_size or books.dim != config.dimension:
            raise ValueError(f"SpeechTokenizer codebooks {tuple(books.embed.shape)} do not match the config "
                             f"(n_q={config.n_q}, codebook_size={config.codebook_size}, dimension={config.dimension})")
        super().__init__(books)
        self.net.to(device=self.device, dtype=self.dtype).eval()
        self.sample_rate = config.sample_rate
        self.hop_length = config.hop_length
        self.levels = config.n_q

    @classmethod
    def from_pretrained(cls, config_path: str | os.PathLike, ckpt_path, device=None, dtype=None) -> "SpeechTokenizer":
        """The published pair that speechtokenizer.SpeechTokenizer.load_from_checkpoint reads:
        config.json and the .pt state dict (or an already loaded state dict)."""
        return cls(SpeechTokenizerConfig.from_json(config_path), load_state_dict(ckpt_path), device, dtype)

    def __repr__(self) -> str:
        return (f"SpeechTokenizer({self.num_codebooks} x {self.codebook_size} codes at {self.frame_rate:g} Hz, "
                f"{self.sample_rate} Hz audio, {self.dtype}, {self.device})")

    def _encode_frames(self, wav: torch.Tensor) -> torch.Tensor:
        return self.net.encoder(wav)

    def _decode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net.decoder(frames)

