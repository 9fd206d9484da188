"""Music in and out around the LLM through EnCodec 32 kHz (4 codebooks x 2048, 50 Hz):
wav -> `<somu>` frame-major ids `<eomu>` (value = code + 2048 * level, frame t gives levels 0..3),
and a reply's music ids -> codes -> EnCodec decoder -> 32 kHz wav.

    music = MusicPipeline(codecs.Encodec.from_pretrained("encodec_32khz"))
    ids = music.prompt_tokens(wav, 44100)           # the first 5 s, as AnyGPT's chat takes
    wav32k = music.synthesize(reply_ids)
"""

from __future__ import annotations

import torch

from anygpt_engine.codecs.audio import as_batch
from anygpt_engine.codecs.base import RVQCodec
from anygpt_engine.codecs.tokens import music_tokens
from anygpt_engine.vocab import MUSIC_CODEBOOK_SIZE, MUSIC_CODEBOOKS, Vocabulary

CHAT_PROMPT_SECONDS = 5.0  # AnyGPT's chat keeps the first 5 s of input music; its base model 20 s


class MusicPipeline:
    def __init__(self, codec: RVQCodec, vocab: Vocabulary | None = None):
        if codec.num_codebooks < MUSIC_CODEBOOKS:
            raise ValueError(f"the music codec has {codec.num_codebooks} codebooks, AnyGPT's music tokens need "
                             f"{MUSIC_CODEBOOKS}")
        self.codec = codec
        self.vocab = vocab if vocab is not None else Vocabulary.anygpt()
        self.sample_rate = codec.sample_rate

    def prompt_tokens(self, wav: torch.Tensor, sample_rate: int,
                      max_seconds: float | None = CHAT_PROMPT_SECONDS) -> list[int]:
        """`<somu>` + frame-major ids + `<eomu>` of one clip ([samples] or [channels, samples]),
        cut to its first max_seconds (None keeps it all)."""
        return music_tokens(self.prompt_codes(wav, sample_rate, max_seconds), self.vocab, markers=True).tolist()

    def prompt_codes(self, wav: torch.Tensor, sample_rate: int,
                     max_seconds: float | None = CHAT_PROMPT_SECONDS) -> torch.Tensor:
        """EnCodec codes [4, T] of one clip, cut to its first max_seconds (None keeps it all)."""
        if isinstance(wav, torch.Tensor) and wav.dim() == 2:
            wav = wav.unsqueeze(0)
        wav = as_batch("wav", wav)
        if wav.shape[0] != 1:
            raise ValueError(f"wav holds {wav.shape[0]} clips, expected one")
        if max_seconds is not None:
            if not max_seconds > 0:
                raise ValueError(f"max_seconds={max_seconds!r}, expected > 0 or None")
            wav = wav[:, :max(1, int(max_seconds * sample_rate))]
        return self.codec.encode(wav, sample_rate, levels=MUSIC_CODEBOOKS)[0]

    def codes(self, ids) -> torch.Tensor:
        """EnCodec codes [4, T] of a reply's music ids (`<somu>`/`<eomu>` allowed), decoded as
        AnyGPT decodes them: a value's position in its 4-token frame is its level and its code is
        the value mod 2048 (a well-formed reply gives exactly Vocabulary.decode_music's codes); a
        reply cut off mid-frame (max_new_tokens) loses its incomplete last frame. Ids that are not
        music values raise."""
        ids = torch.as_tensor(ids).reshape(-1)
        start, end = self.vocab.start_token("music"), self.vocab.end_token("music")
        if ids.numel() and ids[0] == start:
            ids = ids[1:]
        if ids.numel() and ids[-1] == end:
            ids = ids[:-1]
        values = self.vocab.values("music", ids)
        values = values[:values.numel() - values.numel() % MUSIC_CODEBOOKS]
        if values.numel() == 0:
            raise ValueError("the music reply holds no complete frame of music tokens")
        return (values % MUSIC_CODEBOOK_SIZE).view(-1, MUSIC_CODEBOOKS).T.contiguous()

    def synthesize(self, ids) -> torch.Tensor:
        """float32 wav [samples] at the codec's sample_rate of one reply's music ids."""
        return self.codec.decode(self.codes(ids)[None])[0]
