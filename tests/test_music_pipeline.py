"""pipelines.MusicPipeline on a tiny random EnCodec 32 kHz-like model (4 x 2048 codebooks):
prompt tokens are AnyGPT's frame-major music ids of the clip's first 5 s, and a reply's ids decode
to exactly what the codec decodes from the same codes."""

import pytest
import torch

from anygpt_engine import Vocabulary, codecs
from anygpt_engine.pipelines import MusicPipeline
from audio_models import save_tiny_encodec_32khz

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = Vocabulary.anygpt()
SOMU, EOMU = VOCAB.start_token("music"), VOCAB.end_token("music")


@pytest.fixture(scope="module")
def music(tmp_path_factory):
    return MusicPipeline(codecs.Encodec.from_pretrained(save_tiny_encodec_32khz(tmp_path_factory.mktemp("encodec32")),
                                                        device="cpu"))


def clip(seconds: float, rate: int) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 660 * t) * torch.cos(t)


def test_prompt_tokens_take_the_first_five_seconds(music):
    wav = clip(6.5, 44100)
    ids = music.prompt_tokens(wav, 44100)
    assert ids[0] == SOMU and ids[-1] == EOMU and len(ids) == 2 + 4 * 250
    codes = music.codec.encode(wav[:5 * 44100], 44100)[0]  # [4, 250]
    assert ids[1:-1] == codecs.music_tokens(codes).tolist()
    assert ids[1:5] == [VOCAB.range("music").start + int(codes[level, 0]) + 2048 * level for level in range(4)]
    assert len(music.prompt_tokens(torch.stack([wav, wav]), 44100, max_seconds=None)) == 2 + 4 * 325


def test_reply_decodes_like_the_codec(music):
    codes = torch.randint(0, 2048, (4, 37), generator=torch.Generator().manual_seed(1))
    ids = [SOMU] + codecs.music_tokens(codes).tolist() + [EOMU]
    wav = music.synthesize(ids)
    assert wav.shape == (37 * 640,) and wav.abs().max() > 0
    assert torch.equal(wav, music.codec.decode(codes[None])[0])
    cut = ids[:-1][:1 + 4 * 20 + 3]  # max_new_tokens stopped inside frame 21
    assert torch.equal(music.codes(cut), codes[:, :20])


def test_bad_replies(music):
    with pytest.raises(ValueError, match="no complete frame"):
        music.codes([SOMU, VOCAB.range("music").start, EOMU])
    # AnyGPT's decoding: the position in the frame is the level, the code the value mod 2048
    first = VOCAB.range("music").start
    assert music.codes([first + 2048 + 5, first + 7, first + 3 * 2048 + 1, first + 9]).tolist() == [[5], [7], [1], [9]]
    with pytest.raises(ValueError, match="not a music value token"):
        music.codes([5, 6, 7, 8])
    with pytest.raises(ValueError, match="2 clips"):
        music.prompt_tokens(torch.zeros(2, 1, 100), 32000)
