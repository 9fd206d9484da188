"""codecs.Encodec against transformers' EncodecModel (the oracle; the engine does not import it) on
the same random weights: a tiny 32 kHz-like model (non-causal, identity shortcuts, 4 x 2048
codebooks) and a tiny 24 kHz-like one (causal, conv shortcuts, 8 x 1024), each saved the way
transformers 5 saves it (parametrizations.weight.original0/1) and converted to the published
weight_g/weight_v spelling; then the real encodec_32khz / encodec_24khz shapes.

Codes must equal transformers' except at certified float32 near-ties of its expanded-form RVQ
(test_rvq.assert_same_or_certified_near_tie); wavs decoded from the same codes must agree to
float32 rounding."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from anygpt_engine import codecs
from anygpt_engine.codecs.audio import resample
from anygpt_engine.models.encodec import EncodecConfig, EncodecNetwork
from test_rvq import assert_same_or_certified_near_tie

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=2)
CONFIGS = {
    "32k": dict(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048, target_bandwidths=[2.2],
                use_causal_conv=False, use_conv_shortcut=False),
    "24k": dict(sampling_rate=24000, upsampling_ratios=[8, 5, 4, 2], codebook_size=1024,
                target_bandwidths=[1.5, 3.0, 6.0], use_causal_conv=True, use_conv_shortcut=True),
}
BANDWIDTH = {"32k": 2.2, "24k": 3.0}  # 4 codebooks, AnyGPT's


def _randomize(model, seed):
    """transformers initialises g = ||v|| (so w = v: a loader ignoring g would pass) and zero
    codebooks: draw g around ||v||, and codebooks at the scale of the encoder's output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "parametrizations"):
                g = module.parametrizations.weight.original0
                g.mul_(torch.rand(g.shape, generator=gen) + 0.5)
        probe = model.encoder(torch.randn(1, 1, 8000, generator=gen) * 0.3)
        for layer in model.quantizer.layers:
            embed = layer.codebook.embed
            embed.copy_(torch.randn(embed.shape, generator=gen) * probe.std() + probe.mean())


def _legacy_copy(src, dst):
    """The published files' spelling: conv.weight_g / conv.weight_v."""
    state = load_file(src / "model.safetensors")
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    assert any(k.endswith("weight_g") for k in renamed) and not any("parametrizations" in k for k in renamed)
    dst.mkdir()
    save_file(renamed, dst / "model.safetensors")
    shutil.copy(src / "config.json", dst / "config.json")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    """(name, transformers model, {spelling: directory})."""
    name = request.param
    torch.manual_seed(len(name) + CONFIGS[name]["sampling_rate"])
    model = transformers.EncodecModel(transformers.EncodecConfig(**CONFIGS[name], **TINY)).eval()
    _randomize(model, seed=CONFIGS[name]["sampling_rate"])
    root = tmp_path_factory.mktemp(f"encodec_{name}")
    model.save_pretrained(root / "parametrized")
    assert any("parametrizations.weight.original0" in k for k in load_file(root / "parametrized/model.safetensors"))
    _legacy_copy(root / "parametrized", root / "legacy")
    # transformers reads the legacy spelling into the same weights (so the copy is a faithful one)
    reloaded = transformers.EncodecModel.from_pretrained(root / "legacy").eval()
    x = torch.randn(1, 1, 3000)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encoder(x), model.encoder(x), rtol=0, atol=0)
    return name, model, {"parametrized": root / "parametrized", "legacy": root / "legacy"}


def _wav(samples, batch=1, seed=0):
    """Noise plus a tone: music-like amplitude, never all zeros."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    return 0.2 * torch.randn(batch, samples, generator=gen) + 0.3 * torch.sin(2 * torch.pi * 440 * t)


def _reference_codes(model, wav, bandwidth):
    with torch.no_grad():
        return model.encode(wav[:, None], bandwidth=bandwidth).audio_codes[0]  # [B, L, T]


def _reference_wav(model, codes):
    with torch.no_grad():
        return model.decode(codes[None], [None]).audio_values[:, 0]  # AnyGPT's call: one chunk, scales None


def _assert_codes(ours, theirs, codec, wav):
    """Equal, or at certified near-ties of transformers' float32 expanded-form RVQ."""
    assert ours.shape == theirs.shape and ours.dtype == torch.int64
    if not torch.equal(ours, theirs):
        with torch.no_grad():
            frames = codec.network.embed(wav[:, None]).transpose(1, 2)  # [B, T, D]
        assert_same_or_certified_near_tie(ours.transpose(0, 1), theirs.transpose(0, 1), frames,
                                          codec.codebooks.embed[:ours.shape[1]])


def _assert_wav(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()) + 1e-7)


# ---- against transformers -------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["parametrized", "legacy"])
def test_codes_and_wav_match_transformers(tiny, spelling):
    name, model, dirs = tiny
    codec = codecs.Encodec.from_pretrained(dirs[spelling])
    hop = model.config.hop_length
    assert (codec.sample_rate, codec.frame_rate, codec.hop_length) == (model.config.sampling_rate,
                                                                        model.config.frame_rate, hop)
    assert codec.num_codebooks == model.config.num_quantizers and codec.levels == 4
    assert codec.levels_for_bandwidth(BANDWIDTH[name]) == 4
    # the spelling only changes loading: the legacy copy runs the longest clip alone
    for samples in (1, hop, 16001) if spelling == "parametrized" else (16001,):
        wav = _wav(samples, seed=samples)
        codes = codec.encode(wav, codec.sample_rate)
        assert codes.shape == (1, 4, -(-samples // hop))
        _assert_codes(codes, _reference_codes(model, wav, BANDWIDTH[name]), codec, wav)
        # decode transformers' own codes, so a near-tie cannot hide a decoder difference
        theirs = _reference_codes(model, wav, BANDWIDTH[name])
        decoded = codec.decode(theirs)
        assert decoded.shape == (1, theirs.shape[-1] * hop)
        _assert_wav(decoded, _reference_wav(model, theirs))


def test_levels_follow_transformers_bandwidths(tiny):
    name, model, dirs = tiny
    codec = codecs.Encodec.from_pretrained(dirs["parametrized"])
    wav = _wav(7 * model.config.hop_length + 5, batch=2, seed=3)
    for bandwidth in model.config.target_bandwidths:
        levels = codec.levels_for_bandwidth(bandwidth)
        theirs = _reference_codes(model, wav, bandwidth)
        assert theirs.shape[1] == levels
        _assert_codes(codec.encode(wav, codec.sample_rate, levels=levels), theirs, codec, wav)
        _assert_wav(codec.decode(theirs), _reference_wav(model, theirs))
    one = codec.encode(wav, codec.sample_rate, levels=1)
    assert torch.equal(one, codec.encode(wav, codec.sample_rate)[:, :1])  # RVQ levels are a prefix


def test_resampled_input(tiny):
    name, model, dirs = tiny
    codec = codecs.Encodec.from_pretrained(dirs["legacy"])
    wav44 = _wav(13231, seed=5)  # 0.3 s at 44.1 kHz
    at_rate = resample(wav44, 44100, codec.sample_rate)
    assert at_rate.shape[-1] == -(-13231 * codec.sample_rate // 44100)
    codes = codec.encode(wav44, 44100)
    _assert_codes(codes, _reference_codes(model, at_rate, BANDWIDTH[name]), codec, at_rate)


def test_batch_channels_and_lists_equal_items_alone(tiny):
    name, model, dirs = tiny
    codec = codecs.Encodec.from_pretrained(dirs["parametrized"])
    wav = _wav(4001, batch=3, seed=7)
    batch = codec.encode(wav, codec.sample_rate)
    alone = torch.cat([codec.encode(w, codec.sample_rate) for w in wav])
    assert torch.equal(batch, alone)
    decoded = codec.decode(batch)
    for i in range(3):
        torch.testing.assert_close(decoded[i:i + 1], codec.decode(batch[i]), rtol=0, atol=1e-6)
    # [B, C, samples] is mixed to mono by the channel mean
    stereo = torch.stack([wav, 0.5 * wav.flip(-1)], dim=1)
    assert torch.equal(codec.encode(stereo, codec.sample_rate), codec.encode(stereo.mean(1), codec.sample_rate))
    # ragged lists: each item coded alone
    items = [_wav(n, seed=n)[0] for n in (1500, 3333, 700)]
    listed = codec.encode(items, codec.sample_rate)
    for item, codes in zip(items, listed):
        assert torch.equal(codes, codec.encode(item, codec.sample_rate)[0])
    wavs = codec.decode(listed)
    assert [w.shape[-1] for w in wavs] == [c.shape[-1] * codec.hop_length for c in listed]
    for codes, w in zip(listed, wavs):
        torch.testing.assert_close(w, codec.decode(codes)[0], rtol=0, atol=1e-6)


def test_anygpt_music_tokens_decode_like_transformers(tiny):
    name, model, dirs = tiny
    if name != "32k":
        pytest.skip("music tokens are encodec_32khz's")
    codec = codecs.Encodec.from_pretrained(dirs["legacy"])
    wav = _wav(3200, seed=11)
    ids = codecs.music_tokens(codec.encode(wav, 32000)[0], markers=True)  # what the LLM sees
    codes = codecs.music_codes(ids)  # [4, T]
    _assert_wav(codec.decode(codes), _reference_wav(model, codes[None]))


@pytest.mark.parametrize("fields", [
    dict(use_causal_conv=True, trim_right_ratio=0.5, num_residual_layers=2, kernel_size=5, last_kernel_size=3,
         residual_kernel_size=5, dilation_growth_rate=3, compress=4, num_lstm_layers=1, use_conv_shortcut=False),
    dict(use_causal_conv=False, pad_mode="constant", num_residual_layers=2, upsampling_ratios=[3, 5]),
], ids=["causal-trim-half", "noncausal-zero-pad"])
def test_other_config_fields_match_transformers(tmp_path, fields):
    """Fields the published models leave at their defaults still build what transformers builds."""
    settings = dict(sampling_rate=16000, upsampling_ratios=[4, 2], codebook_size=256, target_bandwidths=[64.0],
                    num_filters=4, hidden_size=8, codebook_dim=8)
    torch.manual_seed(4)
    model = transformers.EncodecModel(transformers.EncodecConfig(**{**settings, **fields})).eval()
    _randomize(model, seed=4)
    model.save_pretrained(tmp_path)
    codec = codecs.Encodec.from_pretrained(tmp_path)
    wav = _wav(2001, batch=2, seed=4)
    levels = codec.levels
    theirs = _reference_codes(model, wav, 64.0)[:, :levels]
    _assert_codes(codec.encode(wav, 16000), theirs, codec, wav)
    _assert_wav(codec.decode(theirs), _reference_wav(model, theirs))


def test_bfloat16_network_stays_close(tiny):
    name, model, dirs = tiny
    codec = codecs.Encodec.from_pretrained(dirs["parametrized"], dtype=torch.bfloat16)
    assert codec.network.encoder.layers[0].weight.dtype == torch.bfloat16
    assert codec.codebooks.embed.dtype == torch.float32
    codes = _reference_codes(model, _wav(3000, seed=2), BANDWIDTH[name])
    out, ref = codec.decode(codes), _reference_wav(model, codes)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 0.05


# ---- the real models' shapes ------------------------------------------------------------------------
REAL = {
    # facebook/encodec_32khz config.json (current revision: use_conv_shortcut false)
    "encodec_32khz": dict(sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                          codebook_size=2048, codebook_dim=128, hidden_size=128, num_lstm_layers=2,
                          use_causal_conv=False, norm_type="weight_norm", pad_mode="reflect", compress=2,
                          residual_kernel_size=3, dilation_growth_rate=2, kernel_size=7, last_kernel_size=7,
                          num_residual_layers=1, normalize=False, target_bandwidths=[2.2], chunk_length_s=None,
                          overlap=None, trim_right_ratio=1.0, use_conv_shortcut=False),
    # facebook/encodec_24khz config.json (no use_conv_shortcut key: transformers' default, true)
    "encodec_24khz": dict(sampling_rate=24000, audio_channels=1, num_filters=32, upsampling_ratios=[8, 5, 4, 2],
                          codebook_size=1024, codebook_dim=128, hidden_size=128, num_lstm_layers=2,
                          use_causal_conv=True, norm_type="weight_norm", pad_mode="reflect", compress=2,
                          residual_kernel_size=3, dilation_growth_rate=2, kernel_size=7, last_kernel_size=7,
                          num_residual_layers=1, normalize=False, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
                          chunk_length_s=None, overlap=None, trim_right_ratio=1.0),
}


@pytest.mark.parametrize("name, rate, frames_per_s, codebooks", [("encodec_32khz", 32000, 50, 4),
                                                                 ("encodec_24khz", 24000, 75, 32)])
def test_real_model_shapes_match_transformers(tmp_path, name, rate, frames_per_s, codebooks):
    """The published configs: same tensor names and shapes as transformers (weights drawn at
    random straight into a safetensors file, legacy spelling), same codes and wav on 0.1 s."""
    with torch.device("meta"):
        reference = transformers.EncodecModel(transformers.EncodecConfig(**REAL[name]))
    gen = torch.Generator().manual_seed(rate)
    state = {}
    for key, t in reference.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        fan_in = t[0].numel() if t.dim() > 1 else 1
        state[key] = torch.randn(t.shape, generator=gen) / fan_in ** 0.5 if t.dtype.is_floating_point else \
            torch.ones(t.shape, dtype=t.dtype)
    for level in range(codebooks):
        state[f"quantizer.layers.{level}.codebook.embed"] *= 0.05
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "encodec", **REAL[name]}))
    codec = codecs.Encodec.from_pretrained(tmp_path)
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.levels) == (rate, frames_per_s,
                                                                                       codebooks, 4)
    model = transformers.EncodecModel.from_pretrained(tmp_path).eval()
    wav = _wav(rate // 10, seed=1)
    codes = codec.encode(wav, rate)
    _assert_codes(codes, _reference_codes(model, wav, 2.2 if rate == 32000 else 3.0), codec, wav)
    _assert_wav(codec.decode(codes), _reference_wav(model, codes))


# ---- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec(tiny):
    name, model, dirs = tiny
    return codecs.Encodec.from_pretrained(dirs["parametrized"])


def test_bad_wavs_and_levels(codec):
    rate = codec.sample_rate
    wav = _wav(1000)
    cases = [
        (TypeError, "wav must be a torch.Tensor", lambda: codec.encode("a.wav", rate)),
        (TypeError, r"wav\[0\] must be a torch.Tensor", lambda: codec.encode([[0.1, 0.2]], rate)),
        (TypeError, "wav.dtype", lambda: codec.encode(torch.ones(1, 100, dtype=torch.int16), rate)),
        (ValueError, r"wav.shape=\(1, 0\)", lambda: codec.encode(torch.zeros(1, 0), rate)),
        (ValueError, r"wav.shape=\(1, 0\)", lambda: codec.encode(torch.zeros(0), rate)),  # as_batch names it [1, 0]
        (ValueError, r"wav.shape=\(1, 1, 1, 100\)", lambda: codec.encode(wav.view(1, 1, 1, -1)[..., :100], rate)),
        (ValueError, "wav holds NaN", lambda: codec.encode(torch.cat([wav, torch.full((1, 1), float("nan"))], 1),
                                                           rate)),
        (ValueError, "wav holds NaN", lambda: codec.encode(torch.full((2, 10), float("inf")), rate)),
        (ValueError, "sample_rate=0", lambda: codec.encode(wav, 0)),
        (ValueError, "sample_rate=44100.0", lambda: codec.encode(wav, 44100.0)),
        (ValueError, "sample_rate=True", lambda: codec.encode(wav, True)),
        (ValueError, "levels=0", lambda: codec.encode(wav, rate, levels=0)),
        (ValueError, r"levels=\d+, expected an int in \[1, \d+\]", lambda: codec.encode(
            wav, rate, levels=codec.num_codebooks + 1)),
        (ValueError, "levels=True", lambda: codec.encode(wav, rate, levels=True)),
        (ValueError, "wav is an empty list", lambda: codec.encode([], rate)),
        (ValueError, r"wav\[1\].shape=\(1, 2, 100\)", lambda: codec.encode([wav[0], torch.zeros(1, 2, 100)], rate)),
        (ValueError, r"wav\[0\] holds NaN", lambda: codec.encode([torch.full((50,), float("nan"))], rate)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_bad_codes(codec):
    k, n = codec.codebook_size, codec.num_codebooks
    good = torch.randint(0, k, (2, n, 5))
    cases = [
        (TypeError, "codes must be a torch.Tensor", lambda: codec.decode(7)),
        (TypeError, r"codes\[0\] must be a torch.Tensor", lambda: codec.decode([[1, 2]])),
        (TypeError, "codes.dtype=torch.float32", lambda: codec.decode(good.float())),
        (TypeError, "codes.dtype=torch.bool", lambda: codec.decode(good > 3)),
        (ValueError, r"codes.shape=\(5,\)", lambda: codec.decode(good[0, 0])),
        (ValueError, r"codes.shape=\(1, 2, \d+, 5\)", lambda: codec.decode(good[None])),
        (ValueError, r"codes.shape=\(2, \d+, 0\) is empty", lambda: codec.decode(good[..., :0])),
        (ValueError, f"codes has {n + 1} levels, expected 1 to {n}", lambda: codec.decode(
            torch.cat([good, good[:, :1]], 1))),
        (ValueError, r"codes\[1, 2, 3\]=-1 is out of range", lambda: codec.decode(good.index_put(
            (torch.tensor(1), torch.tensor(2), torch.tensor(3)), torch.tensor(-1)))),
        (ValueError, rf"codes\[0, 4\]={k} is out of range, expected 0 <= code < {k}", lambda: codec.decode(
            good[1].index_put((torch.tensor(0), torch.tensor(4)), torch.tensor(k)))),
        (ValueError, r"codes\[1\]\[0, 0\]=-7", lambda: codec.decode([good[0], torch.full((n, 3), -7)])),
        (ValueError, r"codes\[0\].shape=\(2, \d+, 5\)", lambda: codec.decode([good])),
        (ValueError, "codes is an empty list", lambda: codec.decode([])),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def _variant(src, dst, edit_state=None, edit_config=None, drop=()):
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    if "model.safetensors" not in drop:
        save_file(state, dst / "model.safetensors")
    if "config.json" not in drop:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_checkpoints(tiny, tmp_path):
    name, model, dirs = tiny
    src = dirs["legacy"]
    conv = "encoder.layers.0.conv"
    g0 = f"{conv}.weight_g"

    def both_spellings(s):
        s[f"{conv}.parametrizations.weight.original0"] = s[g0].clone()
        s[f"{conv}.parametrizations.weight.original1"] = s[f"{conv}.weight_v"].clone()

    def zero_codebook(s):
        s["quantizer.layers.1.codebook.embed"] = torch.zeros_like(s["quantizer.layers.1.codebook.embed"])

    def extra_level(s):
        s["quantizer.layers.99.codebook.embed"] = s["quantizer.layers.0.codebook.embed"].clone()

    cases = [
        (ValueError, rf"missing 1 \[{g0}/weight_v\]; unexpected 1 \[{conv}.weight_v\]",
         dict(edit_state=lambda s: s.pop(g0))),
        (ValueError, r"missing 1 \[decoder.layers.1.lstm.weight_hh_l1\]",
         dict(edit_state=lambda s: s.pop("decoder.layers.1.lstm.weight_hh_l1"))),
        (ValueError, r"missing 1 \[quantizer.layers.2.codebook.embed\]",
         dict(edit_state=lambda s: s.pop("quantizer.layers.2.codebook.embed"))),
        (ValueError, r"unexpected 2 \[decoder.extra.weight, encoder.layers.0.conv.bogus\]",
         dict(edit_state=lambda s: s.update({"decoder.extra.weight": torch.ones(3),
                                             "encoder.layers.0.conv.bogus": torch.ones(3)}))),
        (ValueError, r"unexpected 4 \[encoder.layers.0.conv.parametrizations", dict(edit_state=both_spellings)),
        (ValueError, r"unexpected 1 \[quantizer.layers.99.codebook.embed\]", dict(edit_state=extra_level)),
        (ValueError, rf"wrong shape 1 \[{g0} \(3, 1, 1\)",
         dict(edit_state=lambda s: s.update({g0: s[g0][:3]}))),
        (ValueError, r"wrong shape 1 \[decoder.layers.0.conv.bias \(2,\)",
         dict(edit_state=lambda s: s.update({"decoder.layers.0.conv.bias": torch.ones(2)}))),
        (ValueError, "all-zero codebook", dict(edit_state=zero_codebook)),
        (ValueError, "normalize=True is not supported", dict(edit_config=lambda c: c.update(normalize=True))),
        (ValueError, "chunk_length_s=1.0 is not supported", dict(edit_config=lambda c: c.update(
            chunk_length_s=1.0, overlap=0.01))),
        (ValueError, "norm_type='time_group_norm' is not supported", dict(edit_config=lambda c: c.update(
            norm_type="time_group_norm"))),
        (ValueError, "audio_channels=2 is not supported", dict(edit_config=lambda c: c.update(audio_channels=2))),
        (ValueError, "model_type='llama'", dict(edit_config=lambda c: c.update(model_type="llama"))),
        (FileNotFoundError, "has no config.json", dict(drop=("config.json",))),
        (FileNotFoundError, "model.safetensors", dict(drop=("model.safetensors",))),
    ]
    for i, (error, match, edits) in enumerate(cases):
        directory = _variant(src, tmp_path / f"case{i}", **edits)
        with pytest.raises(error, match=match):
            codecs.Encodec.from_pretrained(directory)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        codecs.Encodec.from_pretrained(tmp_path / "absent")
    with pytest.raises(TypeError, match="path must be a directory path"):
        codecs.Encodec.from_pretrained(model.state_dict())
    # the unedited copy loads (the cases above fail for their edit alone)
    codecs.Encodec.from_pretrained(_variant(src, tmp_path / "unedited"))


def test_config_from_real_json_values():
    c32 = EncodecConfig.from_dict(REAL["encodec_32khz"])
    assert (c32.hop_length, c32.frame_rate, c32.num_quantizers, c32.levels_for_bandwidth(2.2)) == (640, 50, 4, 4)
    c24 = EncodecConfig.from_dict(REAL["encodec_24khz"])
    assert (c24.hop_length, c24.frame_rate, c24.num_quantizers) == (320, 75, 32)
    assert [c24.levels_for_bandwidth(b) for b in c24.target_bandwidths] == [2, 4, 8, 16, 32]
    assert c24.use_conv_shortcut and not c32.use_conv_shortcut
    with pytest.raises(ValueError, match="codebook_dim=64 != hidden_size=128"):
        EncodecConfig.from_dict({**REAL["encodec_32khz"], "codebook_dim": 64})
    with pytest.raises(ValueError, match="trim_right_ratio=0.5 only applies to causal convs"):
        EncodecConfig.from_dict({**REAL["encodec_32khz"], "trim_right_ratio": 0.5})
    with pytest.raises(ValueError, match=r"target_bandwidths=\(0.5,\) give no codebook"):
        EncodecConfig.from_dict({**REAL["encodec_32khz"], "target_bandwidths": [0.5]})
    with pytest.raises(ValueError, match=r"codebooks have shape \(4, 2048, 64\)"):
        EncodecNetwork(c32, torch.ones(4, 2048, 64), device="meta")
