"""Chat turns with images, on the tiny preset with a tiny random SEED (the vocabulary's 8192 codes)
and a tiny unCLIP pipeline: an image file in a line becomes the `<soim>...<eoim>` of its SEED
codes, exactly as encoding the image directly spells it; an image reply becomes a png drawn from
its codes (or its codes as .npy, saying why); `anygpt-engine generate` does both from checkpoint
files through --image-tokenizer and --image-diffusion."""

import io
import json

import numpy as np
import pytest

from anygpt_engine import Chat, ChatTemplate, Engine, cli
from anygpt_engine.chat.media import MediaOptions, codes_only_reason, encode_media_file, write_reply_span
from anygpt_engine.chat.template import ReplySpan, modality_string, parse_reply, task_message
from anygpt_engine.chat.terminal import Turns, parse_line
from anygpt_engine.models.seed import SeedConfig
from anygpt_tokenizers import sentencepiece_model, write_sentencepiece_dir
from image_models import CHAT_CONFIG, chat_image_tokenizer, picture, save_published, tiny_unclip_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("sentencepiece")
pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return write_sentencepiece_dir(tmp_path_factory.mktemp("sp"), sentencepiece_model())


@pytest.fixture(scope="module")
def engine(sp_dir):
    return Engine("tiny", device="cpu", tokenizer=sp_dir, num_blocks=160)


@pytest.fixture(scope="module")
def seed_tokenizer(tmp_path_factory):
    return chat_image_tokenizer(tmp_path_factory.mktemp("unclip"))


def spelled(engine, seed_tokenizer, image) -> str:
    """The message text of an image encoded directly, as the checkpoint's tokenizer spells it."""
    return modality_string("image", seed_tokenizer.encode(image)[0], engine.vocab, engine.tokenizer)


def test_image_files_become_the_tokens_of_their_codes(engine, seed_tokenizer, tmp_path):
    png, jpeg = tmp_path / "cat.png", tmp_path / "dog.jpg"
    picture(37, 53, seed=1).save(png)
    picture(64, 30, seed=2, mode="L").save(jpeg, quality=90)
    options = MediaOptions(out_dir=tmp_path / "out", image_tokenizer=seed_tokenizer)
    expected = [spelled(engine, seed_tokenizer, Image.open(f)) for f in (png, jpeg)]
    assert expected[0] != expected[1] and len(set(seed_tokenizer.encode(Image.open(png))[0].tolist())) > 5
    for path, message in zip((png, jpeg), expected):
        assert encode_media_file("image", str(path), options, engine.vocab, engine.tokenizer) == message

    # a line of AnyGPT's format: the turn's prompt is the template around the task's message
    chat = Chat(engine)
    turns = Turns(chat, options, max_new_tokens=3, temperature=0.0, out=io.StringIO())
    reply, _ = turns.run(parse_line(f"Multi-Image Understanding|Which is brighter?|text||{png}, {jpeg}"))
    message = task_message("Multi-Image Understanding", "Which is brighter?", expected)
    prompt = engine.tokenizer.encode(ChatTemplate.anygpt().render([{"role": "user", "content": message}]))
    assert reply.prompt_tokens == len(prompt) and chat.token_ids[:len(prompt)] == prompt
    codes = seed_tokenizer.encode(Image.open(png))[0]
    first = prompt.index(engine.vocab.start_token("image"))
    assert prompt[first + 1:first + 33] == engine.vocab.encode_image(codes).tolist()

    (tmp_path / "notes.png").write_bytes(b"not a picture")
    with pytest.raises(ValueError, match=r"image input .*notes.png is not an image PIL can read"):
        encode_media_file("image", str(tmp_path / "notes.png"), options)
    with pytest.raises(FileNotFoundError, match="no image file"):
        encode_media_file("image", str(tmp_path / "missing.png"), options)
    with pytest.raises(ValueError, match=r"image input cat.png needs --image-tokenizer PATH"):
        encode_media_file("image", "cat.png", MediaOptions(out_dir=tmp_path))


def test_image_reply_is_drawn_as_a_png(engine, seed_tokenizer, tmp_path):
    options = MediaOptions(out_dir=tmp_path / "out", image_tokenizer=seed_tokenizer, seed=4)
    out = io.StringIO()
    turns = Turns(Chat(engine), options, force_modality=True, max_new_tokens=32, seed=1, out=out)
    reply, written = turns.run(parse_line("Text-to-Image Generation|a red square|image"))
    [span] = reply.spans
    assert span.modality == "image" and len(span.values) == 32 and len(set(span.values)) > 5
    assert written == [("image", written[0][1])] and written[0][1].suffix == ".png"
    assert f"image saved: {written[0][1]}" in out.getvalue()
    drawn = Image.open(written[0][1])
    native = seed_tokenizer.diffusion.unet.config.sample_size * seed_tokenizer.diffusion.vae_scale_factor
    assert drawn.size == (native, native) and drawn.mode == "RGB"
    expected = seed_tokenizer.decode(span.values, seed=4)[0]  # AnyGPT's guidance 10, 20 steps
    assert np.array_equal(np.asarray(drawn), np.asarray(expected)) and np.asarray(drawn).std() > 0
    other = seed_tokenizer.decode([(v + 1) % 8192 for v in span.values], seed=4)[0]
    assert not np.array_equal(np.asarray(other), np.asarray(expected))  # the picture follows the codes

    # what cannot be drawn is saved as codes, and the terminal says why
    short = ReplySpan("image", span.values[:31], closed=True)
    path = write_reply_span(short, "short", options)
    assert path.suffix == ".npy" and np.load(path).tolist() == span.values[:31]
    assert codes_only_reason(short, options) == "the span holds 31 codes; SEED draws an image from exactly 32"
    plain = MediaOptions(out_dir=tmp_path / "codes")
    assert np.load(write_reply_span(span, "t.5", plain)).tolist() == span.values
    assert (tmp_path / "codes" / "t.5-image.npy").exists()
    assert "--image-tokenizer PATH and --image-diffusion DIR" in codes_only_reason(span, plain)
    out = io.StringIO()
    Turns(Chat(engine), plain, force_modality=True, max_new_tokens=32, seed=1, out=out).run(
        parse_line("Text-to-Image Generation|a red square|image"))
    assert "image saved: " in out.getvalue() and "(codes only: image replies are drawn with" in out.getvalue()


def test_generate_command_reads_and_draws_images_from_files(sp_dir, tmp_path, monkeypatch, capsys):
    """--image-tokenizer (published layout), --image-vit, --image-diffusion (a saved pipeline)
    through `anygpt-engine generate`, in-process. The published sizes are too large for a CPU
    test, so the config that SeedImageTokenizer.from_pretrained takes for them is the tiny one."""
    root, _, _ = save_published(tmp_path / "seed", CHAT_CONFIG, seed=3)
    (root / "eva_vit_g.pth").rename(tmp_path / "vit.pth")
    tiny_unclip_pipeline(CHAT_CONFIG.image_embed_dim, tmp_path).save_pretrained(tmp_path / "unclip")
    from_any = SeedConfig.from_any
    monkeypatch.setattr(SeedConfig, "from_any", classmethod(lambda cls, c: CHAT_CONFIG if c is None else from_any(c)))
    picture(40, 40, seed=5).save(tmp_path / "in.png")
    line = f"Multimodal Prompt Image Generation|make it blue|image||{tmp_path / 'in.png'}"
    args = ["generate", "--model", "tiny", "--tokenizer", str(sp_dir), "--device", "cpu", "--temperature", "0",
            "--max-new-tokens", "32", "--force-modality", "--json", "--out", str(tmp_path / "out"),
            "--image-tokenizer", str(root), "--image-vit", str(tmp_path / "vit.pth"),
            "--image-diffusion", str(tmp_path / "unclip"), line]
    assert cli.main(args) == 0
    reply = json.loads(capsys.readouterr().out)
    from anygpt_engine.codecs import SeedImageTokenizer

    seed_tokenizer = SeedImageTokenizer.from_pretrained(root, tmp_path / "vit.pth", device="cpu")
    engine = Engine("tiny", device="cpu", tokenizer=sp_dir)
    message = task_message("Multimodal Prompt Image Generation", "make it blue",
                           [spelled(engine, seed_tokenizer, Image.open(tmp_path / "in.png"))])
    prompt = engine.tokenizer.encode(ChatTemplate.anygpt().render([{"role": "user", "content": message}],
                                                                  force_modality="image"))
    assert reply["prompt_tokens"] == len(prompt) and reply["modality"] == "image"
    [file] = reply["files"]
    assert file["modality"] == "image" and file["path"].endswith(".png")
    [span] = parse_reply(reply["raw"]).spans
    assert span.modality == "image" and len(span.values) == 32
    seed_tokenizer.load_diffusion(tmp_path / "unclip")
    expected = seed_tokenizer.decode(span.values, seed=0)[0]  # --seed 0
    assert np.array_equal(np.asarray(Image.open(file["path"])), np.asarray(expected))
