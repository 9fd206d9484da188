"""Codebook loaders (checkpoint layouts, errors) and codes <-> AnyGPT token ids."""

import pytest
import torch

from anygpt_engine import Vocabulary, codecs, ops
from test_rvq import make_codebooks, random_frames


def _speechtokenizer_state(levels=3, size=16, dim=8, prefix="quantizer."):
    cb = make_codebooks(levels, size, dim, seed=40)
    state = {f"{prefix}vq.layers.{l}._codebook.{name}": (cb[l] if name == "embed" else torch.zeros(size))
             for l in range(levels) for name in ("embed", "cluster_size")}
    state["encoder.model.0.conv.weight"] = torch.randn(4, 1, 7)
    return state, cb


def test_speechtokenizer_loader_reads_checkpoint_files(tmp_path):
    state, cb = _speechtokenizer_state()
    torch.save(state, tmp_path / "SpeechTokenizer.pt")
    loaded = codecs.speechtokenizer_codebooks(tmp_path / "SpeechTokenizer.pt")
    assert isinstance(loaded, ops.RVQCodebooks) and torch.equal(loaded.embed, cb)
    torch.save({"state_dict": state}, tmp_path / "nested.ckpt")
    assert torch.equal(codecs.speechtokenizer_codebooks(tmp_path / "nested.ckpt").embed, cb)
    x = random_frames(5, 8)
    assert torch.equal(loaded.encode(x), ops.rvq_encode(x, cb))


def test_loaders_reject_broken_checkpoints(tmp_path):
    state, _ = _speechtokenizer_state()
    gap = {k: v for k, v in state.items() if ".layers.1." not in k}
    with pytest.raises(ValueError, match=r"levels \[0, 2\], expected 0..1"):
        codecs.speechtokenizer_codebooks(gap)
    odd = dict(state)
    odd["quantizer.vq.layers.2._codebook.embed"] = torch.zeros(16, 9)
    with pytest.raises(ValueError, match=r"level 2 has shape \(16, 9\), expected \(16, 8\)"):
        codecs.speechtokenizer_codebooks(odd)
    untrained = dict(state)
    untrained["quantizer.vq.layers.1._codebook.embed"] = torch.zeros(16, 8)
    with pytest.raises(ValueError, match="all-zero codebook"):
        codecs.speechtokenizer_codebooks(untrained)
    projected = dict(state)
    projected["quantizer.vq.layers.0.project_in.weight"] = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="project_in"):
        codecs.speechtokenizer_codebooks(projected)
    twice = dict(state)
    twice.update({k.replace("quantizer.", "teacher.quantizer."): v for k, v in state.items()})
    with pytest.raises(ValueError, match="several prefixes"):
        codecs.speechtokenizer_codebooks(twice)
    with pytest.raises(KeyError, match="no SpeechTokenizer codebooks"):
        codecs.speechtokenizer_codebooks({"x": torch.zeros(1)})
    with pytest.raises(KeyError, match="no EnCodec codebooks"):
        codecs.encodec_codebooks({"x": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        codecs.speechtokenizer_codebooks(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="holds none of"):
        codecs.speechtokenizer_codebooks(tmp_path)


def test_encodec_loader_accepts_both_layouts(tmp_path):
    from safetensors.torch import save_file

    cb = make_codebooks(4, 32, 16, seed=41)
    hf = {f"quantizer.layers.{l}.codebook.embed": cb[l].clone() for l in range(4)}
    save_file(hf, str(tmp_path / "model.safetensors"))
    assert torch.equal(codecs.encodec_codebooks(tmp_path).embed, cb)
    original = {f"quantizer.vq.layers.{l}._codebook.embed": cb[l] for l in range(4)}
    assert torch.equal(codecs.encodec_codebooks(original).embed, cb)


def test_seed_codebook_is_a_single_level():
    weight = make_codebooks(1, 64, 32, seed=42)[0]
    book = codecs.seed_codebook({"quantize.embedding.weight": weight, "encode_task_layer.0.weight": torch.eye(4)})
    assert book.embed.shape == (1, 64, 32)
    x = random_frames(32, 32)
    expected = torch.cdist(x.double(), weight.double()).argmin(1)  # SEED's plain Euclidean argmin
    assert torch.equal(book.encode(x)[0], expected)
    with pytest.raises(KeyError, match="quantize.embedding.weight"):
        codecs.seed_codebook({"other.weight": weight})


def test_token_helpers_follow_anygpt_layout():
    vocab = Vocabulary.anygpt()
    speech = vocab.range("speech")
    codes = torch.tensor([[5, 1023, 0], [7, 7, 7]])  # [L, T]: only level 1 reaches the LLM
    ids = codecs.speech_tokens(codes, vocab, markers=True)
    assert ids.tolist() == [vocab.start_token("speech"), speech[5], speech[1023], speech[0], vocab.end_token("speech")]
    assert codecs.speech_codes(ids, vocab).tolist() == [5, 1023, 0]
    music = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 2047]])
    ids = codecs.music_tokens(music, vocab)
    first = vocab.range("music")[0]
    assert ids.tolist() == [first + 1, first + 2048 + 3, first + 4096 + 5, first + 6144 + 7,
                            first + 2, first + 2048 + 4, first + 4096 + 6, first + 6144 + 2047]
    assert torch.equal(codecs.music_codes(ids, vocab), music)
    image = torch.arange(32)[None] * 200
    ids = codecs.image_tokens(image, vocab, markers=True)
    assert ids[0] == vocab.start_token("image") and ids[1] == vocab.range("image")[0]
    assert torch.equal(codecs.image_codes(ids, vocab), image[0])
    with pytest.raises(ValueError, match="value 1024"):
        codecs.speech_tokens(torch.tensor([1024]), vocab)
    with pytest.raises(TypeError, match="expected integer codes"):
        codecs.speech_tokens(torch.tensor([1.0]), vocab)
