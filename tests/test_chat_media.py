"""Chat turns with real audio: wav inputs become `<sosp>`/`<somu>` strings through the codecs, and
speech / music spans of a reply become wav files through the pipelines (voice prompts included),
from Python objects and, through `anygpt-engine chat`, from checkpoint files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from anygpt_engine import Vocabulary
from anygpt_engine.chat.media import MediaOptions, encode_media_file, write_reply_span
from anygpt_engine.chat.template import ReplySpan, modality_string
from anygpt_engine.codecs.audio import read_wav, write_wav
from anygpt_engine.pipelines import SpeechPipeline
from audio_models import save_tiny_encodec_32khz, small_speech_models
from anygpt_tokenizers import sentencepiece_model, write_sentencepiece_dir
from test_rvq_packages import package_module

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
VOCAB = Vocabulary.anygpt()


def tone(seconds: float, rate: int, hz: float = 180.0) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.4 * torch.sin(2 * torch.pi * hz * t) + 0.05 * torch.sin(2 * torch.pi * 3 * hz * t)


@pytest.fixture(scope="module")
def speech():
    return small_speech_models(seed=2)


@pytest.fixture(scope="module")
def encodec_dir(tmp_path_factory):
    return save_tiny_encodec_32khz(tmp_path_factory.mktemp("encodec32"))


def test_speech_in_and_out_with_a_cloned_voice(speech, tmp_path):
    storm, tokenizer = speech
    write_wav(tmp_path / "q.wav", tone(0.5, 22050), 22050)
    write_wav(tmp_path / "voice.wav", tone(0.2, 16000, hz=240), 16000)
    options = MediaOptions(out_dir=tmp_path / "out", speech_tokenizer=tokenizer, soundstorm=storm,
                           voice_prompt=str(tmp_path / "voice.wav"))
    wav, rate = read_wav(tmp_path / "q.wav")
    expected = modality_string("speech", tokenizer.encode(wav[None], rate, levels=1)[0, 0])
    assert encode_media_file("speech", str(tmp_path / "q.wav"), options) == expected
    assert expected.startswith("<sosp><🗣️") and expected.count("<🗣️") == 25

    values = torch.randint(0, 1024, (17,), generator=torch.Generator().manual_seed(3)).tolist()
    path = write_reply_span(ReplySpan("speech", values, True), "turn1", options)
    assert path.suffix == ".wav" and path.parent == tmp_path / "out"
    written, rate = read_wav(path)
    pipeline = SpeechPipeline(storm, tokenizer)
    voice = pipeline.voice_prompt(*read_wav(tmp_path / "voice.wav"))
    expected = pipeline.synthesize([VOCAB.range("speech").start + v for v in values], voice=voice)
    assert rate == 16000 and written.shape == (1, 17 * 320)
    assert (written[0] - expected.clamp(-1, 1)).abs().max() <= 1 / 32767 + 1e-6  # 16-bit PCM
    assert not torch.allclose(written[0], pipeline.synthesize([VOCAB.range("speech").start + v for v in values]),
                              atol=1e-3)  # the voice changed it
    without = MediaOptions(out_dir=tmp_path / "codes", speech_tokenizer=tokenizer)  # no SoundStorm: codes
    assert np.load(write_reply_span(ReplySpan("speech", values, True), "t", without)).tolist() == values


def test_music_in_and_out_load_the_codec_once(encodec_dir, tmp_path):
    write_wav(tmp_path / "song.wav", tone(6.0, 44100, hz=330), 44100)
    options = MediaOptions(out_dir=tmp_path / "out", music_codec=str(encodec_dir), device="cpu")
    message = encode_media_file("music", str(tmp_path / "song.wav"), options)
    assert message.startswith("<somu>") and message.endswith("<eomu>") and message.count("<🎶") == 4 * 250
    codes = [[5, 6], [7, 8], [9, 10], [11, 12]]
    values = [codes[level][t] + 2048 * level for t in range(2) for level in range(4)]
    path = write_reply_span(ReplySpan("music", values, True), "turn2", options)
    wav, rate = read_wav(path)
    codec = options.music_pipeline(VOCAB).codec
    assert len([k for k in options.loaded if k[0] == "Encodec"]) == 1
    assert rate == 32000 and wav.shape == (1, 2 * 640)
    assert (wav[0] - codec.decode(torch.tensor(codes)[None])[0].clamp(-1, 1)).abs().max() <= 1 / 32767 + 1e-6


def test_chat_command_reads_speech_and_writes_music(encodec_dir, tmp_path):
    """The command line end to end: a SpeechTokenizer checkpoint in the published format reads a
    spoken question, and the forced music reply is written as a 32 kHz wav."""
    model_module = package_module("speechtokenizer", "model")
    config = dict(n_filters=4, dimension=32, semantic_dimension=16, strides=[8, 5, 4, 2], lstm_layers=2,
                  bidirectional=True, dilation_base=2, residual_kernel_size=3, n_residual_layers=1,
                  activation="ELU", sample_rate=16000, n_q=8, codebook_size=1024)
    torch.manual_seed(1)
    upstream = model_module.SpeechTokenizer(config).eval()
    with torch.no_grad():
        for layer in upstream.quantizer.vq.layers:
            layer._codebook.embed.normal_(0.0, 0.05)
    (tmp_path / "st.json").write_text(json.dumps(config))
    torch.save(upstream.state_dict(), tmp_path / "st.pt")
    write_wav(tmp_path / "question.wav", tone(0.4, 16000), 16000)
    tok_dir = write_sentencepiece_dir(tmp_path / "tok", sentencepiece_model())
    out = tmp_path / "out"
    lines = [f"Speech-Instruction||music|||{tmp_path / 'question.wav'}|", "quit"]
    result = subprocess.run(
        [sys.executable, "-m", "anygpt_engine.cli", "chat", "--model", "tiny", "--tokenizer", str(tok_dir),
         "--speech-tokenizer", str(tmp_path / "st.json"), str(tmp_path / "st.pt"), "--music-codec", str(encodec_dir),
         "--force-modality", "--temperature", "0", "--max-new-tokens", "9", "--out", str(out), "--device", "cpu"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = [line.split("music saved: ")[1] for line in result.stdout.splitlines() if "music saved: " in line]
    assert len(saved) == 1 and saved[0].endswith(".wav"), result.stdout
    wav, rate = read_wav(saved[0])
    assert rate == 32000 and wav.shape == (1, 2 * 640)  # 9 tokens: <somu> then two whole frames
