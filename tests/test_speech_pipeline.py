"""pipelines.SpeechPipeline on a small random SoundStorm and SpeechTokenizer: the whole-utterance
path is exactly SoundStorm.generate + RVQ decode + decoder; batches equal items alone; voice
cloning conditions SoundStorm on the prompt's 8 levels; a stream whose first chunk covers the
utterance equals the whole path sample for sample, and small chunks give the right sample
count, start as soon as the first chunk's tokens exist and stop at <eosp>."""

import pytest
import torch

from anygpt_engine import Engine, SamplingParams, SoundStorm, SoundStormConfig, Vocabulary
from anygpt_engine.pipelines import SpeechPipeline, StreamConfig, stream_tokens
from audio_models import small_speech_models

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = Vocabulary.anygpt()
SOSP, EOSP = VOCAB.start_token("speech"), VOCAB.end_token("speech")
FIRST = VOCAB.range("speech").start
CODES = 64  # codebook size of the small models


@pytest.fixture(scope="module")
def speech():
    return SpeechPipeline(*small_speech_models(codebook_size=CODES, depth=2, seed=3))


def reply(frames: int, seed: int) -> list[int]:
    values = torch.randint(0, CODES, (frames,), generator=torch.Generator().manual_seed(seed))
    return [SOSP] + (values + FIRST).tolist() + [EOSP]


def voice_wav(seconds: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * 16000)) / 16000
    return 0.4 * torch.sin(2 * torch.pi * 150 * t) + 0.05 * torch.sin(2 * torch.pi * 1100 * t)


def test_whole_utterance_is_soundstorm_then_decode(speech):
    ids = reply(37, seed=1)
    wav = speech.synthesize(ids)
    semantic = torch.tensor(ids[1:-1]) - FIRST
    codes = speech.soundstorm.generate(semantic[None], steps=3, seeds=[0])[0]  # [T, 8]
    assert torch.equal(codes[:, 0], semantic) and bool((codes[:, 1:] < CODES).all())
    expected = speech.tokenizer.decode(codes.T[None])[0]
    assert wav.shape == (37 * 320,) and torch.equal(wav, expected)
    assert wav.abs().max() > 0


def test_batched_replies_equal_each_alone(speech):
    replies = [reply(12, seed=2), reply(30, seed=3)]
    together = speech.synthesize(replies)
    assert [w.shape[0] for w in together] == [12 * 320, 30 * 320]
    for ids, wav in zip(replies, together):
        assert torch.equal(wav, speech.synthesize(ids))


def test_voice_prompt_conditions_soundstorm(speech):
    wav = voice_wav(0.3)
    voice = speech.voice_prompt(wav, 16000)
    assert voice.shape == (15, 8)
    assert torch.equal(voice, speech.tokenizer.encode(wav, 16000)[0].T)
    assert speech.voice_prompt(torch.stack([wav, wav]), 16000, max_seconds=0.1).shape == (5, 8)
    ids = reply(20, seed=4)
    cloned = speech.synthesize(ids, voice=voice)
    semantic = torch.tensor(ids[1:-1]) - FIRST
    codes = speech.soundstorm.generate([semantic], prompt=([voice[:, 0]], [voice[:, 1:]]), steps=3, seeds=[0])[0]
    assert torch.equal(cloned, speech.tokenizer.decode(codes.T[None])[0])
    assert not torch.equal(cloned, speech.synthesize(ids))


def test_prompt_tokens_are_level_one_codes(speech):
    wav = voice_wav(0.5)
    ids = speech.prompt_tokens(wav, 16000)
    assert ids[0] == SOSP and ids[-1] == EOSP and len(ids) == 27
    assert ids[1:-1] == (speech.tokenizer.encode(wav, 16000, levels=1)[0, 0] + FIRST).tolist()


class Recorder:
    """Token iterator that counts the tokens taken and passes close() on to its source."""

    def __init__(self, ids):
        self.source, self.taken, self.closed = iter(ids), 0, False

    def __iter__(self):
        return self

    def __next__(self):
        token = next(self.source)
        self.taken += 1
        return token

    def close(self):
        self.closed = True
        if hasattr(self.source, "close"):
            self.source.close()


@pytest.mark.parametrize("frames", [24, 25])  # shorter than, and exactly, the first chunk
def test_stream_with_one_chunk_equals_the_whole_utterance(speech, frames):
    ids = reply(frames, seed=frames)
    voice = speech.voice_prompt(voice_wav(0.2), 16000)
    config = StreamConfig(first_chunk_frames=25, chunk_frames=25, decoder_context_frames=4, lookahead_frames=3)
    for v in (None, voice):
        chunks = list(speech.stream(iter(ids), voice=v, config=config))
        assert torch.equal(torch.cat(chunks), speech.synthesize(ids, voice=v))


def test_small_chunks_stream_early_with_the_right_length(speech):
    ids = reply(61, seed=9) + [FIRST, FIRST]  # tokens after <eosp> are not read
    config = StreamConfig(first_chunk_frames=8, chunk_frames=16, context_frames=20, decoder_context_frames=6,
                          lookahead_frames=2)
    tokens = Recorder(ids)
    stream = speech.stream(tokens, config=config)
    first = next(stream)
    assert tokens.taken == 1 + 8 and not tokens.closed  # <sosp> and the first chunk's frames, nothing more
    assert first.shape == ((8 - 2) * 320,)
    rest = list(stream)
    assert tokens.taken == 1 + 61 + 1 and tokens.closed  # closed at <eosp>
    assert sum(c.shape[0] for c in [first, *rest]) == 61 * 320
    assert len(rest) == 4  # chunks ending at 24, 40 and 56 frames, then the 5-frame tail with the held-back end
    whole = speech.synthesize(ids[:63])
    streamed = torch.cat([first, *rest])
    assert streamed.abs().max() > 0 and not torch.equal(streamed, whole)  # chunked: close in kind, not equal


def test_stream_skips_text_and_ends_with_the_iterator(speech):
    ids = reply(10, seed=11)[:-1]  # no <eosp>
    with_text = [5, 6] + ids[:4] + [7] + ids[4:]
    config = StreamConfig(first_chunk_frames=32)
    assert torch.equal(torch.cat(list(speech.stream(iter(with_text), config=config))), speech.synthesize(ids))


def test_bad_input(speech):
    with pytest.raises(ValueError, match="voice is"):
        speech.synthesize(reply(5, 1), voice=torch.zeros(4, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="voice has no frames"):
        speech.synthesize(reply(5, 1), voice=torch.zeros(0, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="not a speech value token"):
        speech.synthesize([SOSP, 5, EOSP])
    with pytest.raises(ValueError, match="no speech tokens"):
        speech.synthesize([SOSP, EOSP])
    with pytest.raises(ValueError, match="2 utterances"):
        speech.prompt_tokens(torch.zeros(2, 1, 100), 16000)
    with pytest.raises(ValueError, match="first_chunk_frames"):
        StreamConfig(first_chunk_frames=0)
    with pytest.raises(ValueError, match="SoundStorm fills"):
        SpeechPipeline(SoundStorm(SoundStormConfig(dim=32, depth=1, heads=2, dim_head=16, num_quantizers=3,
                                                   codebook_size=CODES)), speech.tokenizer)


@pytest.fixture(scope="module")
def speech1024():
    """AnyGPT's codebook size, for replies the LLM samples (values 0..1023)."""
    return SpeechPipeline(*small_speech_models())


def test_speech_streams_from_the_engine_while_it_generates(speech1024):
    speech = speech1024
    engine = Engine("tiny", device="cpu", max_batch_size=2)
    prompt = [1, 32000, 3, 4, 5, 32002, 32001, SOSP]  # [Human] ... <eoh> [MMGPT] <sosp>
    params = SamplingParams.greedy(30, min_new_tokens=30, stop_token_ids=(EOSP,))
    reply_ids = engine.generate([prompt], params)[0]
    assert all(t in VOCAB.range("speech") for t in reply_ids)  # constrained decoding inside <sosp>
    assert list(stream_tokens(engine, prompt, params)) == reply_ids
    tokens = Recorder(stream_tokens(engine, prompt, params))
    config = StreamConfig(first_chunk_frames=10, chunk_frames=10, lookahead_frames=2)
    chunks = speech.stream(tokens, config=config)
    first = next(chunks)
    assert tokens.taken == 10 and first.shape == (8 * 320,)
    chunks.close()  # the listener hangs up: the request is aborted and its blocks freed
    stats = engine.stats()
    assert not engine.has_unfinished() and stats.running == 0 and stats.used_blocks == 0
    whole = torch.cat(list(speech.stream(stream_tokens(engine, prompt, params), config=StreamConfig(64))))
    assert torch.equal(whole, speech.synthesize(reply_ids))


def test_servers_capture_soundstorm_graphs_up_front(monkeypatch):
    """Where SoundStorm replays graphs, a SpeechIO captures every frame bucket of a reply of up to
    500 frames after its longest voice when it is made, not during a request's first audio."""
    from anygpt_engine.serving.speech import SpeechIO

    storm, tokenizer = small_speech_models(codebook_size=CODES, seed=3)
    pipeline = SpeechPipeline(storm, tokenizer)
    captured = []
    monkeypatch.setattr(storm, "capture_graphs", lambda batches, frames: captured.append((batches, list(frames))))
    voices = {"short": torch.zeros(40, 8, dtype=torch.long), "long": torch.zeros(150, 8, dtype=torch.long)}
    SpeechIO(tokenizer, pipeline, voices=voices)
    assert captured == []  # on the CPU generate runs eagerly
    monkeypatch.setattr(SoundStorm, "graphs_by_default", property(lambda self: True))
    SpeechIO(tokenizer, pipeline, voices=voices)
    bucket = storm.frame_bucket
    assert captured == [((1,), list(range(bucket, -(-650 // bucket) * bucket + 1, bucket)))]
    SpeechIO(tokenizer, pipeline)
    assert captured[-1][1][-1] == -(-500 // bucket) * bucket
    with pytest.raises(ValueError, match="reply_frames=0, expected a positive int"):
        pipeline.capture_graphs(reply_frames=0)
