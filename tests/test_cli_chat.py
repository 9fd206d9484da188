"""`anygpt-engine chat` and `generate` on the tiny preset (random weights), driven as a user would:
lines on stdin, output read back."""

import json
import subprocess
import sys

import numpy as np
import pytest

from anygpt_engine.chat.media import MediaOptions, encode_media_file
from anygpt_engine.chat.terminal import parse_line
from anygpt_tokenizers import sentencepiece_model, write_sentencepiece_dir

pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return write_sentencepiece_dir(tmp_path_factory.mktemp("sp"), sentencepiece_model())


def run_cli(args, stdin="", timeout=180):
    return subprocess.run([sys.executable, "-m", "anygpt_engine.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_parse_line_reads_anygpts_fields():
    line = parse_line("Speech-Instruction||speech|voice.wav||a.wav, b.wav|")
    assert (line.task, line.instruction, line.to_modality, line.voice_prompt) == ("Speech-Instruction", "", "speech",
                                                                                  "voice.wav")
    assert (line.images, line.speech, line.music) == ([], ["a.wav", "b.wav"], [])
    line = parse_line("interleaved|Translate this picture into music.|music||x.npy, y.npy||z.npy")
    assert (line.images, line.music, line.voice_prompt) == (["x.npy", "y.npy"], ["z.npy"], None)
    assert parse_line("|clear").is_clear and not parse_line("clear the table").is_clear
    plain = parse_line("  just a question?  ")
    assert (plain.task, plain.instruction, plain.to_modality) == ("", "just a question?", "text")
    with pytest.raises(ValueError, match="to_modality='video'"):
        parse_line("task|x|video")
    with pytest.raises(ValueError, match="at most 7"):
        parse_line("a|b|c|d|e|f|g|h")


def test_media_inputs_name_the_missing_flag(tmp_path):
    options = MediaOptions(out_dir=tmp_path)
    with pytest.raises(ValueError, match="needs --speech-tokenizer CONFIG CKPT"):
        encode_media_file("speech", "q.wav", options)
    with pytest.raises(ValueError, match="needs --music-codec DIR"):
        encode_media_file("music", "song.wav", options)
    with pytest.raises(ValueError, match="needs --image-tokenizer PATH"):
        encode_media_file("image", "cat.png", options)
    np.save(tmp_path / "codes.npy", np.array([3, 1023, 0]))
    assert encode_media_file("speech", str(tmp_path / "codes.npy"), options) == "<sosp><🗣️3><🗣️1023><🗣️0><eosp>"


def test_chat_session_over_stdin(tmp_path, sp_dir):
    out = tmp_path / "out"
    np.save(tmp_path / "question.npy", np.array([5, 6, 7]))
    lines = ["Hello there!",
             "Text-Instruction|what are primary colors?|speech",
             "|clear",
             f"Speech-Instruction||text|||{tmp_path / 'question.npy'}",
             "||text|||question.wav",
             "quit",
             "never read"]
    result = run_cli(["chat", "--model", "tiny", "--tokenizer", str(sp_dir), "--temperature", "0",
                      "--max-new-tokens", "5", "--force-modality", "--out", str(out), "--device", "cpu"],
                     "\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.count("[MMGPT]: ") == 3 and "history cleared" in text
    saved = [line.split("speech saved: ")[1] for line in text.splitlines() if "speech saved: " in line]
    assert len(saved) == 1 and "what_are_primary_colors" in saved[0]
    codes = np.load(saved[0])
    assert codes.dtype == np.int64 and 1 <= codes.size <= 5 and ((0 <= codes) & (codes < 1024)).all()
    assert "error: speech input question.wav needs --speech-tokenizer CONFIG CKPT" in text


def test_chat_needs_a_tokenizer():
    result = run_cli(["chat", "--model", "tiny", "--device", "cpu"], "quit\n", timeout=120)
    assert result.returncode == 2 and "give --tokenizer DIR" in result.stderr


def test_generate_one_turn_for_scripts(tmp_path, sp_dir):
    common = ["--model", "tiny", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"]
    result = run_cli(["generate", "--tokenizer", str(sp_dir), "--json", "--out", str(tmp_path), "--force-modality",
                      "Text-to-Music Generation|A calm piano piece|music", *common])
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["modality"] == "music" and reply["completion_tokens"] == 4 and reply["finish_reason"] == "length"
    assert [f["modality"] for f in reply["files"]] == ["music"]
    assert np.load(reply["files"][0]["path"]).shape == (4, 1)  # 4 tokens: one EnCodec frame
    ids = run_cli(["generate", "--prompt-ids", "1 32000 29871", *common])
    assert ids.returncode == 0, ids.stderr
    assert len(ids.stdout.split()) == 4 and all(0 <= int(t) < 53516 for t in ids.stdout.split())
