"""Files in and out of a chat turn: the two hooks between chat text and codecs.

- `encode_media_file`: a file named in a user turn -> the modality string the message carries.
- `write_reply_span`: one speech / music / image span of a reply -> a file, its path printed.

For now both read and write codec codes as .npy (speech level-1 codes [T], music codes [4, T],
image codes [32]); turning wav files into codes and codes into wav through the speech and music
pipelines replaces the bodies of these two functions, with the options in MediaOptions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from anygpt_engine.chat.template import ReplySpan, modality_string

_FLAGS = {"speech": "--speech-tokenizer CONFIG CKPT", "music": "--music-codec DIR"}


@dataclass
class MediaOptions:
    """The codec options of `anygpt-engine chat` / `generate`."""

    out_dir: Path = Path("anygpt_output")
    speech_tokenizer: tuple[str, str] | None = None  # SpeechTokenizer config.json and checkpoint
    soundstorm: str | None = None  # SoundStorm checkpoint (speech replies' acoustic levels)
    music_codec: str | None = None  # EnCodec 32 kHz directory
    voice_prompt: str | None = None  # wav whose voice speech replies take


def encode_media_file(modality: str, path: str, options: MediaOptions, vocab=None, tokenizer=None) -> str:
    """A file given in a chat turn as the tokens a user message spells (`<sosp>...<eosp>`).
    Reads codes saved as .npy (what write_reply_span writes); audio files need the codecs."""
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
    raise ValueError(f"{modality} input {file}: encoding audio files is not available in this build yet; give its "
                     "codes as a .npy file")


def write_reply_span(span: ReplySpan, stem: str, options: MediaOptions, vocab=None) -> Path:
    """Writes one modality span of a reply under options.out_dir and returns the file's path:
    its codes as `{stem}-{modality}.npy` (speech [T], image [N], music and audio [4, T])."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    path = options.out_dir / f"{_safe(stem)}-{span.modality}.npy"
    np.save(path, np.asarray(span.codes(vocab), dtype=np.int64))
    return path


def file_stem(turn: int, text: str = "") -> str:
    """A file name stem for a turn's outputs: time, turn number and the start of the message."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-turn{turn}" + (f"-{_safe(text)[:40]}" if text.strip() else "")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
