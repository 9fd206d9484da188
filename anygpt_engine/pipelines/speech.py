"""Speech in and out around the LLM: wav -> `<sosp> ... <eosp>` prompt tokens, and a reply's
semantic tokens -> SoundStorm (levels 2..8) -> RVQ decode -> SpeechTokenizer decoder -> 16 kHz wav,
whole or streamed while the LLM is still speaking.

    speech = SpeechPipeline(SoundStorm.from_pretrained(pt), codecs.SpeechTokenizer.from_pretrained(cfg, ckpt))
    prompt_ids = speech.prompt_tokens(wav, 44100)               # <sosp> level-1 ids <eosp>
    voice = speech.voice_prompt(wav3s, 16000)                    # [P, 8] codes: voice cloning
    wav = speech.synthesize(reply_ids, voice=voice)              # whole utterance, AnyGPT's way
    for chunk in speech.stream(token_iterator, voice=voice): ... # audio while tokens arrive

Whole utterance (the exact default): one SoundStorm.generate over every frame, steps=3 greedy as
AnyGPT's chat runs it, the voice prompt (all 8 levels of the prompt wav) as SoundStorm's prompt,
then one decode.

Streaming (`stream`): SoundStorm runs on chunks of the semantic frames as they arrive: the first
after `first_chunk_frames` tokens, then every `chunk_frames`. Each chunk is generated with the
voice prompt plus the last `context_frames` frames already generated (all 8 levels) as its
prompt, exactly as a voice prompt conditions the whole utterance; it cannot see semantic frames
that do not exist yet. The decoder then turns codes into samples over a window reaching
`decoder_context_frames` back, and holds back the last `lookahead_frames` frames of each chunk
until the next chunk (or the end) gives them right-hand context. While the utterance is still
within its first chunk the decoder reads it from frame 0, so a stream whose first chunk covers
the whole utterance gives exactly the whole-utterance samples. Trade-off: smaller chunks give
earlier audio; acoustic codes at a chunk start see only the left context (prosody and timbre
carry over through it, future phonemes do not), and the decoder's receptive field at a chunk
edge is cut to the lookahead, so longer context, chunks and lookahead sound closer to the
whole-utterance output at the cost of latency and compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from anygpt_engine.codecs.audio import as_batch
from anygpt_engine.codecs.speechtokenizer import SpeechTokenizer
from anygpt_engine.codecs.tokens import speech_codes, speech_tokens
from anygpt_engine.models.soundstorm import SoundStorm
from anygpt_engine.vocab import Vocabulary

SOUNDSTORM_STEPS = 3  # AnyGPT's chat: generate_config's vc_steps, greedy


@dataclass(frozen=True)
class StreamConfig:
    """Chunking of `SpeechPipeline.stream`, in 20 ms frames (50 Hz). See the module docstring."""

    first_chunk_frames: int = 25
    chunk_frames: int = 50
    context_frames: int = 150
    decoder_context_frames: int = 50
    lookahead_frames: int = 5

    def __post_init__(self):
        for name in ("first_chunk_frames", "chunk_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StreamConfig.{name}={value!r}, expected an int >= 1")
        for name in ("context_frames", "decoder_context_frames", "lookahead_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StreamConfig.{name}={value!r}, expected an int >= 0")


class SpeechPipeline:
    def __init__(self, soundstorm: SoundStorm, tokenizer: SpeechTokenizer, *, steps: int = SOUNDSTORM_STEPS,
                 vocab: Vocabulary | None = None, seed: int = 0):
        """`seed`: SoundStorm's per-item noise seed (its level-0 passes draw Gumbel noise even when
        greedy), fixed so the same tokens always give the same audio, streamed or whole."""
        if soundstorm.config.num_quantizers + 1 != tokenizer.num_codebooks:
            raise ValueError(f"SoundStorm fills {soundstorm.config.num_quantizers} levels but the tokenizer has "
                             f"{tokenizer.num_codebooks}; expected 1 + SoundStorm's levels")
        if soundstorm.config.codebook_size != tokenizer.codebook_size:
            raise ValueError(f"SoundStorm codebook_size {soundstorm.config.codebook_size} != the tokenizer's "
                             f"{tokenizer.codebook_size}")
        self.soundstorm = soundstorm
        self.tokenizer = tokenizer
        self.steps = steps
        self.vocab = vocab if vocab is not None else Vocabulary.anygpt()
        self.seed = seed
        self.sample_rate = tokenizer.sample_rate

    # -- speech in -------------------------------------------------------------------------------
    def prompt_tokens(self, wav: torch.Tensor, sample_rate: int) -> list[int]:
        """`<sosp>` + level-1 ids + `<eosp>` of one utterance (mono or [C, samples] channels)."""
        codes = self.tokenizer.encode(self._one("wav", wav), sample_rate, levels=1)[0]
        return speech_tokens(codes, self.vocab, markers=True).tolist()

    def voice_prompt(self, wav: torch.Tensor, sample_rate: int, max_seconds: float | None = None) -> torch.Tensor:
        """All 8 levels of a prompt voice, [P, 8] (AnyGPT clones from about 3 s of speech; pass
        max_seconds to cut a longer recording)."""
        wav = self._one("wav", wav)
        if max_seconds is not None:
            if not max_seconds > 0:
                raise ValueError(f"max_seconds={max_seconds!r}, expected > 0")
            wav = wav[..., :max(1, int(max_seconds * sample_rate))]
        return self.tokenizer.encode(wav, sample_rate)[0].T.contiguous()

    @staticmethod
    def _one(name: str, wav: torch.Tensor) -> torch.Tensor:
        """One utterance: [samples] or [channels, samples] -> [1, samples] (channel mean)."""
        if isinstance(wav, torch.Tensor) and wav.dim() == 2:
            wav = wav.unsqueeze(0)
        batch = as_batch(name, wav)
        if batch.shape[0] != 1:
            raise ValueError(f"{name} holds {batch.shape[0]} utterances, expected one")
        return batch

    # -- speech out ------------------------------------------------------------------------------
    def semantic(self, ids) -> torch.Tensor:
        """Level-1 codes [T] of a reply's speech ids (`<sosp>`/`<eosp>` allowed; other tokens
        raise)."""
        codes = speech_codes(ids, self.vocab)
        if codes.numel() == 0:
            raise ValueError("the speech reply holds no speech tokens")
        return codes

    def codes(self, semantic: list[torch.Tensor], prompt: torch.Tensor | None = None,
              seed: int | None = None) -> list[torch.Tensor]:
        """SoundStorm: level-1 codes [T_b] each -> all levels [T_b, 8]. `prompt` [P, 8] (a voice
        from voice_prompt(), or a stream's context) conditions every item."""
        batch = len(semantic)
        seeds = [self.seed if seed is None else seed] * batch
        device = self.soundstorm.code_embed.weight.device
        semantic = [s.to(device) for s in semantic]
        if prompt is None:
            return self.soundstorm.generate(semantic, steps=self.steps, seeds=seeds)
        prompt = self._check_prompt(prompt).to(device)
        return self.soundstorm.generate(semantic, prompt=([prompt[:, 0]] * batch, [prompt[:, 1:]] * batch),
                                        steps=self.steps, seeds=seeds)

    def _check_prompt(self, voice) -> torch.Tensor:
        levels = self.tokenizer.num_codebooks
        if not isinstance(voice, torch.Tensor) or voice.dim() != 2 or voice.shape[1] != levels:
            shape = tuple(voice.shape) if isinstance(voice, torch.Tensor) else type(voice).__name__
            raise ValueError(f"voice is {shape}, expected codes [P, {levels}] from voice_prompt()")
        if voice.shape[0] == 0:
            raise ValueError("voice has no frames, expected codes [P >= 1, 8] from voice_prompt()")
        return voice

    def capture_graphs(self, voice: torch.Tensor | None = None, reply_frames: int = 500) -> float:
        """Captures SoundStorm's CUDA graphs for every frame bucket that a reply of up to
        `reply_frames` frames (500: 10 s) meets, whole or streamed, after `voice` as its prompt;
        a server calls it at start-up so no request pays for a capture. Returns the seconds spent."""
        if isinstance(reply_frames, bool) or not isinstance(reply_frames, int) or reply_frames < 1:
            raise ValueError(f"reply_frames={reply_frames!r}, expected a positive int")
        longest = (0 if voice is None else self._check_prompt(voice).shape[0]) + reply_frames
        bucket = self.soundstorm.frame_bucket
        return self.soundstorm.capture_graphs((1,), range(bucket, longest + bucket, bucket))

    def synthesize(self, replies, voice: torch.Tensor | None = None):
        """16 kHz float32 wav of a reply's speech ids (a list of ints or a 1-D tensor), or a list
        of wavs for a list of replies (batched through SoundStorm)."""
        single = isinstance(replies, torch.Tensor) or (replies and isinstance(replies[0], int))
        items = [replies] if single else list(replies)
        if not items:
            raise ValueError("replies is empty, expected speech ids or a list of them")
        codes = self.codes([self.semantic(ids) for ids in items], prompt=voice)
        wavs = self.tokenizer.decode([c.T for c in codes])
        return wavs[0] if single else wavs

    def stream(self, tokens: Iterable[int], voice: torch.Tensor | None = None,
               config: StreamConfig | None = None) -> Iterator[torch.Tensor]:
        """Yields 16 kHz float32 wav chunks while `tokens` (LLM output ids, e.g. as the engine
        emits them) are still arriving. Speech value tokens are the utterance; it ends at
        `<eosp>` or when the iterator ends; other tokens (`<sosp>`, text) are skipped. When the
        stream stops reading (at `<eosp>`, or closed early by its listener) it closes `tokens`
        if that has a close() (stream_tokens then aborts its request)."""
        return _SpeechStream(self, voice, config or StreamConfig()).run(tokens)


class _SpeechStream:
    def __init__(self, pipeline: SpeechPipeline, voice, config: StreamConfig):
        self.p, self.config = pipeline, config
        self.voice = None if voice is None else pipeline._check_prompt(voice)
        self.semantic: list[int] = []
        self.codes: list[torch.Tensor] = []  # generated chunks, [t, 8] each
        self.generated = 0  # frames with all levels
        self.emitted = 0  # frames whose samples were yielded
        self.chunks = 0

    def run(self, tokens: Iterable[int]) -> Iterator[torch.Tensor]:
        iterator = iter(tokens)
        try:
            yield from self._consume(iterator)
        finally:  # stopped reading (<eosp>, or the listener closed the stream): tell the source
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _consume(self, tokens: Iterator[int]) -> Iterator[torch.Tensor]:
        speech = self.p.vocab.range("speech")
        end = self.p.vocab.end_token("speech")
        for token in tokens:
            if token == end:
                break
            if token in speech:
                self.semantic.append(token - speech.start)
                want = self.config.first_chunk_frames if self.chunks == 0 else self.config.chunk_frames
                if len(self.semantic) - self.generated == want:
                    self._generate()
                    yield from self._emit(final=False)
        if len(self.semantic) > self.generated:
            self._generate()
        yield from self._emit(final=True)

    def _generate(self) -> None:
        c = self.config
        device = self.p.soundstorm.code_embed.weight.device
        prompt = [self.voice.to(device)] if self.voice is not None else []
        if self.chunks and c.context_frames:
            prompt.append(torch.cat(self.codes)[-c.context_frames:].to(device))
        target = torch.tensor(self.semantic[self.generated:])
        chunk = self.p.codes([target], prompt=torch.cat(prompt) if prompt else None, seed=self.p.seed + self.chunks)[0]
        self.codes.append(chunk)
        self.generated = len(self.semantic)
        self.chunks += 1

    def _emit(self, final: bool) -> Iterator[torch.Tensor]:
        c = self.config
        until = self.generated if final else max(self.emitted, self.generated - c.lookahead_frames)
        if until <= self.emitted:
            return
        start = 0 if self.chunks == 1 else max(0, self.emitted - c.decoder_context_frames)
        codes = torch.cat(self.codes)[start:self.generated]
        wav = self.p.tokenizer.decode([codes.T])[0]
        hop = self.p.tokenizer.hop_length
        yield wav[(self.emitted - start) * hop:(until - start) * hop]
        self.emitted = until


__all__ = ["SOUNDSTORM_STEPS", "SpeechPipeline", "StreamConfig"]
