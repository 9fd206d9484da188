"""Files in and out of a chat turn: the two hooks between chat text and the codecs.

- `encode_media_file`: a file named in a user turn -> the modality string the message carries.
  Audio files (wav, flac, ...: whatever soundfile reads) go through the codecs: speech ->
  SpeechTokenizer level 1 (`--speech-tokenizer`), music -> EnCodec 32 kHz, its first 5 s as
  AnyGPT's chat takes (`--music-codec`). Codes saved as .npy are read as they are.
- `write_reply_span`: one span of a reply -> a file, its path printed. Speech becomes a 16 kHz
  wav through SoundStorm + the SpeechTokenizer decoder (both flags needed; `--voice-prompt` or a
  line's voice_prompt clones that voice), music a 32 kHz wav through EnCodec. Without those
  codecs, and for images (the SEED de-tokenizer is not included) and 24 kHz "audio", the codes
  are saved as .npy.

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
from anygpt_engine.codecs import Encodec, SpeechTokenizer
from anygpt_engine.codecs.audio import read_wav, write_wav
from anygpt_engine.models.soundstorm import SoundStorm
from anygpt_engine.pipelines import MusicPipeline, SpeechPipeline
from anygpt_engine.vocab import MUSIC_CODEBOOKS, Vocabulary

_FLAGS = {"speech": "--speech-tokenizer CONFIG CKPT", "music": "--music-codec DIR"}


@dataclass
class MediaOptions:
    """The codec options of `anygpt-engine chat` / `generate`: checkpoint paths (loaded once, on
    first use, onto `device`), or already loaded objects when used from Python."""

    out_dir: Path = Path("anygpt_output")
    speech_tokenizer: tuple[str, str] | SpeechTokenizer | None = None  # config.json + checkpoint, or the codec
    soundstorm: str | SoundStorm | None = None  # checkpoint (speech replies' acoustic levels), or the model
    music_codec: str | Encodec | None = None  # EnCodec 32 kHz directory, or the codec
    voice_prompt: str | None = None  # wav whose voice speech replies take
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
    if modality == "image":
        raise ValueError(f"image input {file}: images need the SEED image tokenizer, which anygpt-engine does not "
                         "include; give SEED codes as a .npy file")
    configured = options.speech_tokenizer if modality == "speech" else options.music_codec
    if configured is None:
        raise ValueError(f"{modality} input {file} needs {_FLAGS[modality]} (or its codes as a .npy file)")
    wav, rate = _read_audio(file)
    if modality == "speech":
        codes = options.speech_codec().encode(wav[None], rate, levels=1)[0, 0]
    else:
        codes = options.music_pipeline(vocab).prompt_codes(wav, rate)
    return modality_string(modality, codes.cpu(), vocab, tokenizer)


def write_reply_span(span: ReplySpan, stem: str, options: MediaOptions, vocab=None) -> Path:
    """Writes one modality span of a reply under options.out_dir and returns the file's path:
    `{stem}-{modality}.wav` for speech and music when their codecs are configured, else its codes
    as `{stem}-{modality}.npy` (speech [T], image [N], music and audio [4, T])."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocab if vocab is not None else Vocabulary.anygpt()
    wav = None
    if span.values and span.modality == "speech" and None not in (options.speech_tokenizer, options.soundstorm):
        speech = options.speech_pipeline(vocab)
        wav, rate = speech.synthesize(span.token_ids(vocab), voice=options.voice(speech)), speech.sample_rate
    elif span.modality == "music" and options.music_codec is not None and len(span.values) >= MUSIC_CODEBOOKS:
        music = options.music_pipeline(vocab)
        wav, rate = music.synthesize(span.token_ids(vocab)), music.sample_rate
    if wav is not None:
        path = options.out_dir / f"{_safe(stem)}-{span.modality}.wav"
        write_wav(path, wav, rate)
        return path
    path = options.out_dir / f"{_safe(stem)}-{span.modality}.npy"
    np.save(path, np.asarray(span.codes(vocab), dtype=np.int64))
    return path


def file_stem(turn: int, text: str = "") -> str:
    """A file name stem for a turn's outputs: time, turn number and the start of the message."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-turn{turn}" + (f"-{_safe(text)[:40]}" if text.strip() else "")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
