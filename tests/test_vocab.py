import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anygpt_engine import Vocabulary

V = Vocabulary.anygpt()


def test_anygpt_layout_matches_design_table():
    assert V.size == 53516
    assert V.range("image") == range(32004, 40196)
    assert (V.start_token("image"), V.end_token("image")) == (40196, 40197)
    assert V.range("speech") == range(40198, 41222)
    assert (V.start_token("speech"), V.end_token("speech")) == (41222, 41223)
    assert V.range("music") == range(41224, 49416)
    assert (V.start_token("music"), V.end_token("music")) == (49416, 49417)
    assert V.range("audio") == range(49418, 53514)
    assert (V.start_token("audio"), V.end_token("audio")) == (53514, 53515)
    assert V.special == {"[Human]": 32000, "[MMGPT]": 32001, "<eoh>": 32002, "<eos>": 32003}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1023), min_size=1, max_size=40))
def test_speech_round_trip(codes):
    ids = V.encode_speech(codes)
    assert all(i in V.range("speech") for i in ids)
    assert V.decode_speech(ids) == codes


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 8191), min_size=1, max_size=40))
def test_image_round_trip(codes):
    assert V.decode_image(V.encode_image(codes)) == codes


def test_music_is_frame_major_with_level_offsets():
    codes = torch.tensor([[5, 6, 7], [0, 1, 2], [2047, 10, 11], [3, 4, 1000]])
    ids = V.encode_music(codes)
    first = V.range("music").start
    # frame 0: levels 0..3 -> code + 2048 * level
    assert ids[:4].tolist() == [first + 5, first + 2048 + 0, first + 4096 + 2047, first + 6144 + 3]
    assert torch.equal(V.decode_music(ids), codes)
    assert V.decode_music(V.encode_music(codes.tolist())) == codes.tolist()


def test_out_of_range_input_is_rejected():
    with pytest.raises(ValueError, match="value 1024 at flat index 1, expected 0 <= code < 1024"):
        V.encode_speech([3, 1024])
    with pytest.raises(ValueError, match=r"ids\[0\]=5 is not a speech value token"):
        V.decode_speech([5])
    with pytest.raises(ValueError, match=r"codes.shape=\(3, 2\), expected \[4, T\]"):
        V.encode_music([[1, 2]] * 3)
    with pytest.raises(ValueError, match="value 2048"):
        V.encode_music([[2048], [0], [0], [0]])
    with pytest.raises(ValueError, match="multiple of 4"):
        V.decode_music(list(V.range("music"))[:3])
    first = V.range("music").start
    with pytest.raises(ValueError, match="level-0 music token at level position 1"):
        V.decode_music([first, first, first + 4096, first + 6144])
    with pytest.raises(TypeError, match="integer"):
        V.encode_image([1.5])
    with pytest.raises(ValueError, match="modality='video'"):
        V.range("video")


def test_from_pretrained_reads_added_tokens(tmp_path):
    prefixes = {"image": "\U0001f440", "speech": "\U0001f5e3\ufe0f", "music": "\U0001f3b6"}
    tokens = ["[Human]", "[MMGPT]", "<eoh>", "<eos>"]
    for name, mark in (("image", "im"), ("speech", "sp"), ("music", "mu")):
        n = {"image": 8192, "speech": 1024, "music": 8192}[name]
        tokens += [f"<{prefixes[name]}{i}>" for i in range(n)] + [f"<so{mark}>", f"<eo{mark}>"]
    tokens += ["<-Res->", "<-Ins->"]  # the chat model's extra tokens (AnyGPT's training order)
    added = {t: 32000 + i for i, t in enumerate(tokens)}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 49420}))
    vocab = Vocabulary.from_pretrained(tmp_path)
    assert vocab.size == 49420
    assert vocab.modalities == ("image", "speech", "music")
    assert vocab.range("speech") == range(40198, 41222)
    assert vocab.end_token("music") == 49417
    assert vocab.special["<-Ins->"] == 49419
    with pytest.raises(ValueError, match="modality='audio'"):
        vocab.range("audio")


def test_from_pretrained_rejects_gapped_values(tmp_path):
    added = {"<sosp>": 10, "<eosp>": 11, "<\U0001f5e3\ufe0f0>": 0, "<\U0001f5e3\ufe0f1>": 1, "<\U0001f5e3\ufe0f2>": 5}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    with pytest.raises(ValueError, match="speech value token 2 has id 5, expected 2"):
        Vocabulary.from_pretrained(tmp_path)
