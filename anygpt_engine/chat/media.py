"""Files in and out of a chat turn: the two hooks between chat text and the codecs.

- `encode_media_file`: a file named in a user turn -> the modality string the message carries.
  Audio files (wav, flac, ...: whatever soundfile reads) go through the codecs: speech ->
  SpeechTokenizer level 1 (`--speech-tokenizer`), music -> EnCodec 32 kHz, its first 5 s as
  AnyGPT's chat takes (`--music-codec`). Image files (png, jpeg, ...: whatever PIL reads) ->
  SEED's 32 codes (`--image-tokenizer`). Codes saved as .npy are read as they are.
- `write_reply_span`: one span of a reply -> a file, its path printed. Speech becomes a 16 kHz
  wav through SoundStorm + the SpeechTokenizer decoder (both flags needed; `--voice-prompt` or a
  line's voice_prompt clones that voice), music a 32 kHz wav through EnCodec, an image a png
  drawn by Stable Diffusion 2.1 unCLIP from SEED's embedding (`--image-tokenizer` and
  `--image-diffusion`; AnyGPT's chat settings: guidance 10, 20 steps). Without those codecs,
  for an image span that is not exactly 32 codes, and for 24 kHz "audio", the codes are saved
  as .npy; `codes_only_reason` says why.

Checkpoints load once, on first use, onto `MediaOptions.device` (the GPU when there is one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from anygpt_engine.chat.template import ReplySpan, modality_string
from anygpt_engine.codecs import Encodec, SeedImageTokenizer, SpeechTokenizer
from anygpt_engine.codecs.audio import read_wav, write_wav
from anygpt_engine.codecs.seed import read_image
from anygpt_engine.models.soundstorm import SoundStorm
from anygpt_engine.pipelines import MusicPipeline, SpeechPipeline
from anygpt_engine.vocab import MUSIC_CODEBOOKS, Vocabulary

_FLAGS = {"speech": "--speech-tokenizer CONFIG CKPT", "music": "--music-codec DIR", "image": "--image-tokenizer PATH"}


@dataclass
class MediaOptions:
    """The codec options of `anygpt-engine chat` / `generate`: checkpoint paths (loaded once, on
    first use, onto `device`), or already loaded objects when used from Python."""

    out_dir: Path = Path("anygpt_output")
    speech_tokenizer: tuple[str, str] | SpeechTokenizer | None = None  # config.json + checkpoint, or the codec
    soundstorm: str | SoundStorm | None = None  # checkpoint (speech replies' acoustic levels), or the model
    music_codec: str | Encodec | None = None  # EnCodec 32 kHz directory, or the codec
    voice_prompt: str | None = None  # wav whose voice speech replies take
    image_tokenizer: str | SeedImageTokenizer | None = None  # seed_quantizer.pt or its directory, or the codec
    image_vit: str | None = None  # eva_vit_g.pth (default: beside seed_quantizer.pt)
    image_diffusion: str | None = None  # Stable Diffusion 2.1 unCLIP directory (image replies)
    seed: int | None = None  # image replies' diffusion noise (None: torch's global RNG)
    device: str | None = None  # where checkpoints load (default: cuda when available)
    loaded: dict = field(default_factory=dict, repr=False, compare=False)  # what was loaded, by what it came from

    def _load(self, given, kind, build):
        if isinstance(given, kind):
            return given
        key = (kind.__name__, str(given))
        if key not in self.loaded:
            self.loaded[key] = build(torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        return self.loaded[key]

    def speech_codec(self) -> SpeechTokenizer:
        return self._load(self.speech_tokenizer, SpeechTokenizer,
                          lambda device: SpeechTokenizer.from_pretrained(*self.speech_tokenizer, device=device))

    def speech_pipeline(self, vocab) -> SpeechPipeline:
        storm = self._load(self.soundstorm, SoundStorm, lambda device: SoundStorm.from_pretrained(self.soundstorm,
                                                                                                device=device))
        return self._load((id(storm), id(self.speech_codec())), SpeechPipeline,
                          lambda _: SpeechPipeline(storm, self.speech_codec(), vocab=vocab))

    def music_pipeline(self, vocab) -> MusicPipeline:
        codec = self._load(self.music_codec, Encodec, lambda device: Encodec.from_pretrained(self.music_codec,
                                                                                            device=device))
        return self._load(id(codec), MusicPipeline, lambda _: MusicPipeline(codec, vocab=vocab))

    def image_codec(self, draw: bool = False) -> SeedImageTokenizer:
        """The SEED tokenizer; with draw, its unCLIP pipeline loaded too (from image_diffusion)."""
        codec = self._load(self.image_tokenizer, SeedImageTokenizer,
                           lambda device: SeedImageTokenizer.from_pretrained(self.image_tokenizer, self.image_vit,
                                                                             device=device))
        if draw and codec.diffusion is None and self.image_diffusion is not None:
            codec.load_diffusion(self.image_diffusion)
        return codec

    def voice(self, speech: SpeechPipeline):
        """The voice prompt's codes [P, 8] (encoded once), or None."""
        if self.voice_prompt is None:
            return None
        return self._load(self.voice_prompt, torch.Tensor,
                          lambda _: speech.voice_prompt(*_read_audio(self.voice_prompt)))


def _read_audio(path) -> tuple[torch.Tensor, int]:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"audio file {file} does not exist")
    return read_wav(file)


def encode_media_file(modality: str, path: str, options: MediaOptions, vocab=None, tokenizer=None) -> str:
    """A file given in a chat turn as the tokens a user message spells (`<sosp>...<eosp>`)."""
    file = Path(path)
    if file.suffix == ".npy":
        if not file.exists():
            raise FileNotFoundError(f"{modality} input {file} does not exist")
        return modality_string(modality, np.load(file), vocab, tokenizer)
    configured = {"speech": options.speech_tokenizer, "music": options.music_codec,
                  "image": options.image_tokenizer}[modality]
    if configured is None:
        raise ValueError(f"{modality} input {file} needs {_FLAGS[modality]} (or its codes as a .npy file)")
    if modality == "image":
        codes = options.image_codec().encode(read_image(f"image input {file}", file))[0]
    else:
        wav, rate = _read_audio(file)
        if modality == "speech":
            codes = options.speech_codec().encode(wav[None], rate, levels=1)[0, 0]
        else:
            codes = options.music_pipeline(vocab).prompt_codes(wav, rate)
    return modality_string(modality, codes.cpu(), vocab, tokenizer)


def codes_only_reason(span: ReplySpan, options: MediaOptions) -> str | None:
    """Why write_reply_span saves a span's codes rather than a wav or png (None: it does not)."""
    n = len(span.values)
    if span.modality == "speech":
        if None in (options.speech_tokenizer, options.soundstorm):
            return "speech replies are played with --speech-tokenizer CONFIG CKPT and --soundstorm PT"
        return None if n else "the span holds no speech tokens"
    if span.modality == "music":
        if options.music_codec is None:
            return "music replies are played with --music-codec DIR"
        return None if n >= MUSIC_CODEBOOKS else f"the span holds {n} tokens, less than one EnCodec frame (4)"
    if span.modality == "image":
        if options.image_tokenizer is None:
            return "image replies are drawn with --image-tokenizer PATH and --image-diffusion DIR"
        if options.image_diffusion is None and getattr(options.image_tokenizer, "diffusion", None) is None:
            return "image replies are drawn with --image-diffusion DIR (Stable Diffusion 2.1 unCLIP)"
        need = options.image_codec().num_tokens
        return None if n == need else f"the span holds {n} codes; SEED draws an image from exactly {need}"
    return f"anygpt-engine has no decoder for {span.modality!r} spans (EnCodec 24 kHz)"


def write_reply_span(span: ReplySpan, stem: str, options: MediaOptions, vocab=None) -> Path:
    """Writes one modality span of a reply under options.out_dir and returns the file's path:
    `{stem}-speech.wav`, `{stem}-music.wav` or `{stem}-image.png` when their codecs are
    configured, else (see codes_only_reason) its codes as `{stem}-{modality}.npy` (speech [T],
    image [N], music and audio [4, T])."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocab if vocab is not None else Vocabulary.anygpt()
    base = f"{_safe(stem)}-{span.modality}"
    if codes_only_reason(span, options) is not None:
        path = options.out_dir / f"{base}.npy"
        np.save(path, np.asarray(span.codes(vocab), dtype=np.int64))
        return path
    if span.modality == "image":
        path = options.out_dir / f"{base}.png"
        options.image_codec(draw=True).decode(span.codes(vocab), seed=options.seed)[0].save(path)
        return path
    if span.modality == "speech":
        speech = options.speech_pipeline(vocab)
        wav, rate = speech.synthesize(span.token_ids(vocab), voice=options.voice(speech)), speech.sample_rate
    else:
        music = options.music_pipeline(vocab)
        wav, rate = music.synthesize(span.token_ids(vocab)), music.sample_rate
    path = options.out_dir / f"{base}.wav"
    write_wav(path, wav, rate)
    return path


def file_stem(turn: int, text: str = "") -> str:
    """A file name stem for a turn's outputs: time, turn number and the start of the message."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-turn{turn}" + (f"-{_safe(text)[:40]}" if text.strip() else "")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
