"""Speech for the server: wav bytes in (a SpeechTokenizer: level-1 codes as `<sosp>...<eosp>`),
wav bytes out (a SpeechPipeline: SoundStorm + decoder), and AnyGPT's speech instructions.

The instructions are the chat model's task prompts (AnyGPT's m_utils/prompter.py `task_prompts`,
whose later 'Text-to-Speech' / 'Speech-to-Text' entries win): text to speech is
"{text} Please read the given text." with the reply forced to start with <sosp>; speech to text is
"{speech} Please transcribe the given speech.".
"""

from __future__ import annotations

import asyncio
import io
import queue
import threading
from pathlib import Path

import torch

from anygpt_engine.codecs.tokens import speech_tokens

TEXT_TO_SPEECH = "{text} Please read the given text."
SPEECH_TO_TEXT = "{speech} Please transcribe the given speech."


def wav_bytes(wav: torch.Tensor, sample_rate: int) -> bytes:
    """16-bit PCM wav file bytes of [samples] float audio (clipped to [-1, 1])."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wav.detach().float().cpu().clamp(-1, 1).numpy(), sample_rate, format="WAV",
                    subtype="PCM_16")
    return buffer.getvalue()


def pcm16_bytes(wav: torch.Tensor) -> bytes:
    """Raw 16-bit little-endian PCM of [samples] float audio (clipped to [-1, 1]): OpenAI's
    streaming audio format, at the pipeline's rate (16 kHz mono)."""
    samples = (wav.detach().float().cpu().clamp(-1, 1) * 32767).round().to(torch.int16)
    return samples.numpy().astype("<i2").tobytes()


def read_wav_bytes(name: str, data: bytes) -> tuple[torch.Tensor, int]:
    """float32 [channels, samples] and the rate of an audio file's bytes; ValueError naming
    `name` when they are not audio soundfile can read."""
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"{name} is not a readable audio file (expected wav): {err}") from None
    if samples.shape[0] == 0:
        raise ValueError(f"{name} holds no audio samples")
    return torch.from_numpy(samples.T.copy()), int(rate)


class SpeechIO:
    """The server's speech codecs: `tokenizer` (SpeechTokenizer) turns input speech into prompt
    tokens; `pipeline` (SpeechPipeline, needs SoundStorm) turns reply tokens into audio, in the
    default `voice` (a SoundStorm voice prompt, or none) or one of the named `voices` a request
    picks. Either codec may be missing; the endpoints that need it then answer 400. Codec work
    runs one call at a time (a lock), off the event loop."""

    def __init__(self, tokenizer=None, pipeline=None, voice: torch.Tensor | None = None, vocab=None,
                 voices: dict[str, torch.Tensor] | None = None):
        if pipeline is not None and tokenizer is None:
            tokenizer = pipeline.tokenizer
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.voice = voice
        self.voices = dict(voices or {})
        self.vocab = vocab
        self._lock = threading.Lock()
        if pipeline is not None and pipeline.soundstorm.graphs_by_default:
            # SoundStorm's graphs now, not on a request's first audio (the longest voice's buckets
            # cover the shorter voices').
            longest = max([voice, *self.voices.values()], key=lambda v: 0 if v is None else v.shape[0])
            pipeline.capture_graphs(longest)

    def voice_prompt(self, name: str | None) -> torch.Tensor | None:
        """The voice prompt a request's voice name picks. Without named voices every name (OpenAI's
        "alloy", ...) gets the default voice; with them, an unknown name is a ValueError."""
        if name is None or not self.voices:
            return self.voice
        if name not in self.voices:
            raise ValueError(f"voice={name!r} is not one of this server's voices: {sorted(self.voices)}")
        return self.voices[name]

    @classmethod
    def from_files(cls, speech_tokenizer: tuple[str, str] | None, soundstorm: str | None,
                   voice_prompt: str | None = None, device=None, vocab=None,
                   voices_dir: str | None = None) -> "SpeechIO | None":
        """From `anygpt-engine serve`'s flags (the chat command's: --speech-tokenizer CONFIG CKPT,
        --soundstorm PT, --voice-prompt WAV; and --voices DIR: each NAME.wav in it a voice a
        request can pick by NAME). None when no speech tokenizer is given."""
        if speech_tokenizer is None:
            if soundstorm is not None or voice_prompt is not None or voices_dir is not None:
                raise ValueError("--soundstorm, --voice-prompt and --voices need --speech-tokenizer CONFIG CKPT")
            return None
        from anygpt_engine.codecs import SpeechTokenizer
        from anygpt_engine.codecs.audio import read_wav
        from anygpt_engine.models.soundstorm import SoundStorm
        from anygpt_engine.pipelines import SpeechPipeline

        tokenizer = SpeechTokenizer.from_pretrained(*speech_tokenizer, device=device)
        pipeline = None
        if soundstorm is not None:
            pipeline = SpeechPipeline(SoundStorm.from_pretrained(soundstorm, device=device), tokenizer, vocab=vocab)
        voice = None
        if voice_prompt is not None:
            if pipeline is None:
                raise ValueError("--voice-prompt needs --soundstorm PT (it conditions speech output)")
            voice = pipeline.voice_prompt(*read_wav(voice_prompt), max_seconds=3)
        voices = {}
        if voices_dir is not None:
            if pipeline is None:
                raise ValueError("--voices needs --soundstorm PT (voices condition speech output)")
            files = sorted(Path(voices_dir).glob("*.wav")) if Path(voices_dir).is_dir() else []
            if not files:
                raise FileNotFoundError(f"--voices {voices_dir}: expected a directory of NAME.wav files")
            voices = {f.stem: pipeline.voice_prompt(*read_wav(str(f)), max_seconds=3) for f in files}
        return cls(tokenizer, pipeline, voice, vocab, voices)

    def prompt_ids(self, wav: torch.Tensor, sample_rate: int) -> list[int]:
        """`<sosp>` + level-1 ids + `<eosp>` of one utterance ([channels, samples], mixed to mono)."""
        with self._lock:
            codes = self.tokenizer.encode(wav.mean(dim=0, keepdim=True), sample_rate, levels=1)[0]
            return speech_tokens(codes, self.vocab, markers=True).tolist()

    def synthesize(self, reply_ids: list[int], audio_format: str = "wav", voice: str | None = None) -> bytes:
        """wav bytes (or raw pcm16 with audio_format="pcm16") of a reply's speech tokens (other
        tokens are ignored) in the voice named `voice` (voice_prompt); a reply without any gives
        no samples."""
        vocab = self.pipeline.vocab
        speech = [t for t in reply_ids if t in vocab.range("speech")]
        prompt = self.voice_prompt(voice)
        wav = torch.zeros(0)
        if speech:
            with self._lock:
                wav = self.pipeline.synthesize(speech, voice=prompt)
        return pcm16_bytes(wav) if audio_format == "pcm16" else wav_bytes(wav, self.pipeline.sample_rate)

    def stream(self, loop: asyncio.AbstractEventLoop, voice: str | None = None) -> "SpeechStream":
        """Audio of one reply while its tokens arrive (SpeechStream), in the voice named `voice`."""
        return SpeechStream(self, loop, self.voice_prompt(voice))


class SpeechStream:
    """A reply's audio while the engine still generates it: `feed` the reply's token ids as they
    come, `end()` when it is over, and take pcm16 chunks from `ready()` (what is done now) and
    `rest()` (everything after end()). SpeechPipeline.stream runs on a worker thread; it holds
    SpeechIO's lock only while it computes, never while it waits for tokens, so other replies'
    codec work interleaves with it."""

    def __init__(self, speech: SpeechIO, loop: asyncio.AbstractEventLoop, voice: torch.Tensor | None = None):
        self._speech, self._loop, self._voice = speech, loop, voice
        self._tokens: queue.Queue = queue.Queue()
        self._audio: asyncio.Queue = asyncio.Queue()
        self._ended = False
        threading.Thread(target=self._run, name="anygpt-speech-stream", daemon=True).start()

    def feed(self, token_ids: list[int]) -> None:
        if token_ids:
            self._tokens.put(list(token_ids))

    def end(self) -> None:
        """No more tokens (also what a client that left calls): the worker finishes the audio and stops."""
        if not self._ended:
            self._ended = True
            self._tokens.put(None)

    def ready(self) -> list[bytes]:
        chunks = []
        while not self._audio.empty():
            item = self._audio.get_nowait()
            if item is None:
                self._audio.put_nowait(None)  # the end stays visible to rest()
                break
            if isinstance(item, BaseException):
                raise item
            chunks.append(item)
        return chunks

    async def rest(self):
        self.end()
        while (item := await self._audio.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        lock = self._speech._lock

        def tokens():
            while True:
                lock.release()  # waiting for the engine: let other replies use the codecs
                try:
                    ids = self._tokens.get()
                finally:
                    lock.acquire()
                if ids is None:
                    return
                yield from ids

        def put(item):
            try:
                self._loop.call_soon_threadsafe(self._audio.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        try:
            with lock:
                for wav in self._speech.pipeline.stream(tokens(), voice=self._voice):
                    if len(wav):
                        put(pcm16_bytes(wav))
        except Exception as err:  # noqa: BLE001 - handed to the listener
            put(err)
        put(None)
