"""AnyGPT's prompt formats, string for string, and reply parsing. The expected strings are written
out by hand from AnyGPT's conversation.py (get_prompt) and prompter.py."""

import pytest
import torch

from anygpt_engine import ChatTemplate, Vocabulary, codecs
from anygpt_engine.chat import base_prompt, modality_string, parse_reply, task_message

SYSTEM = ("You are an AI assistant named MMGPT who can understand and generate multimodal content, including text, "
          "speech, images and audio.")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_mmgpt_prompts():
    t = ChatTemplate.anygpt()
    assert t.render([user("Hello!")]) == SYSTEM + "\n[Human]: Hello!<eoh>\n[MMGPT]:"
    assert t.render([user("Hello!"), assistant("Hi!"), user("How are you?")]) == (
        SYSTEM + "\n[Human]: Hello!<eoh>\n[MMGPT]: Hi!<eos>\n[Human]: How are you?<eoh>\n[MMGPT]:")
    # A conversation that ends with a reply: get_history-like, no trailing newline or role.
    assert t.render([user("Hello!"), assistant("Hi!")]) == SYSTEM + "\n[Human]: Hello!<eoh>\n[MMGPT]: Hi!<eos>"
    for modality, token in (("image", "<soim>"), ("speech", "<sosp>"), ("music", "<somu>")):
        assert t.render([user("Draw.")], force_modality=modality) == SYSTEM + f"\n[Human]: Draw.<eoh>\n[MMGPT]: {token}"
    assert t.render([{"role": "system", "content": "Be brief."}, user("x")]) == "Be brief.\n[Human]: x<eoh>\n[MMGPT]:"
    # get_prompt writes an empty message as the bare role (how AnyGPT builds "[MMGPT]:" itself).
    assert t.render([user("x"), assistant("")]) == SYSTEM + "\n[Human]: x<eoh>\n[MMGPT]:"
    assert t.render([]) == SYSTEM + "\n"
    # Modality tokens in a user message pass through untouched.
    speech = "<sosp><🗣️12><🗣️0><eosp>"
    assert t.render([user(speech + " Please transcribe.")]) == (
        SYSTEM + "\n[Human]: <sosp><🗣️12><🗣️0><eosp> Please transcribe.<eoh>\n[MMGPT]:")


def test_anygpt_template():
    t = ChatTemplate.anygpt("AnyGPT")
    assert t.render([user("Hello!"), assistant("Hi!"), user("How are you?")], force_modality="image") == (
        "You are an AI assistant named AnyGPT who can understand and generate multimodal content, including text, "
        "speech, images and audio.\n[Human]: Hello!<eoh>\n[AnyGPT]: Hi!<eom>\n[Human]: How are you?<eoh>\n"
        "[AnyGPT]: <soim>")


def test_template_rejects_bad_conversations():
    t = ChatTemplate.anygpt()
    with pytest.raises(ValueError, match="name='GPT'"):
        ChatTemplate.anygpt("GPT")
    with pytest.raises(ValueError, match="expected 'user'"):
        t.render([assistant("Hi!")])
    with pytest.raises(ValueError, match="expected 'assistant'"):
        t.render([user("a"), user("b")])
    with pytest.raises(ValueError, match="only messages\\[0\\]"):
        t.render([user("a"), {"role": "system", "content": "s"}])
    with pytest.raises(ValueError, match="role'\\]='tool'"):
        t.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="force_modality='audio'"):
        t.render([user("a")], force_modality="audio")
    with pytest.raises(ValueError, match="ends with a user message"):
        t.render([user("a"), assistant("b")], force_modality="speech")
    with pytest.raises(TypeError, match="content'\\] must be a str"):
        t.render([user(3)])


def test_base_model_prompts():
    assert base_prompt("Please read this text aloud.", "hello world") == (
        "[Human]: Please read this text aloud. This is input: hello world<eoh> [MMGPT]:")
    assert base_prompt("Transcribe this speech.", "<sosp><🗣️1><eosp>", "speech") == (
        "[Human]: Transcribe this speech. <sosp><🗣️1><eosp><eoh> [MMGPT]:")
    with pytest.raises(ValueError, match="modality='video'"):
        base_prompt("x", "y", "video")


def test_chat_cli_task_messages():
    img, img2, sp = "<soim><👀1><eoim>", "<soim><👀2><eoim>", "<sosp><🗣️3><eosp>"
    assert task_message("Text-to-Image Generation", "draw a cute dog") == "draw a cute dog. Please generation an image."
    assert task_message("Text-to-Image Generation", "A dog!") == "A dog! Please generation an image."
    assert task_message("Image Captioning", "", images=[img]) == (
        img + " Please provide an accurate and concisedescription of the given image.")
    assert task_message("Multi-Image Understanding", "Same?", images=[img, img2]) == (
        f"This is the first image. {img} This is the second image. {img2} Same?")
    assert task_message("Speech-Instruction", "", speech=[sp]) == (
        sp + " Please recognize the voice command and give reply and voice")
    assert task_message("Text-Instruction", "what are primary colors?") == (
        "what are primary colors? Please interpret the user's text input, create a textual response.")
    assert task_message("interleaved", "What emotion?", images=[img], speech=[sp]) == (
        f"{img} {sp} What emotion? Please recognize the voice command and give reply and voice")
    assert task_message("interleaved", "Give me music.", images=[img]) == f"{img} Give me music."
    assert task_message("customized", "  free text  ") == "free text"
    assert task_message("", "plain") == "plain"
    with pytest.raises(ValueError, match="needs 1 image"):
        task_message("Image QA", "what?")
    with pytest.raises(ValueError, match="needs a speech input"):
        task_message("Speech-Instruction2", "")


def test_parse_reply_from_a_sentencepiece_decode():
    # What transformers 4.34's slow tokenizer decodes (spaces around added tokens), whole conversation.
    decoded = ("You are ... \n [Human] : hi <eoh> \n [MMGPT] : hello <eos> \n [Human] : speak <eoh> \n "
               "[MMGPT] : Sure. <sosp> <🗣️12> <🗣️7> <🗣️1023> <eosp> Done. <eos>")
    reply = parse_reply(decoded)
    assert reply.text == "Sure. Done."
    assert reply.raw == "Sure. <sosp> <🗣️12> <🗣️7> <🗣️1023> <eosp> Done."
    assert reply.modality == "speech" and len(reply.spans) == 1
    span = reply.spans[0]
    assert (span.modality, span.values, span.closed) == ("speech", [12, 7, 1023], True)
    assert span.codes() == [12, 7, 1023]
    assert span.token_ids(Vocabulary.anygpt()) == [40210, 40205, 41221]
    assert parse_reply("just text<eos>").text == "just text" and parse_reply("just text<eos>").modality == "text"
    assert parse_reply("[AnyGPT]: hi<eom>", ChatTemplate.anygpt("AnyGPT")).raw == "hi"


def test_parse_reply_spans_as_codes():
    vocab = Vocabulary.anygpt()
    music = torch.tensor([[5, 2047, 0], [1, 2, 3], [4, 5, 6], [2000, 7, 8]])
    ids = codecs.music_tokens(music, markers=True)
    text = "".join(f"<🎶{i - vocab.range('music').start}>" if i in vocab.range("music") else
                   {vocab.start_token("music"): "<somu>", vocab.end_token("music"): "<eomu>"}[i] for i in ids.tolist())
    reply = parse_reply(f"[MMGPT]: {text}<eos>")
    assert reply.spans[0].codes() == music.tolist() == vocab.decode_music(ids[1:-1]).tolist()
    # An unclosed span (the reply hit its length limit), a partial music frame dropped as AnyGPT does.
    reply = parse_reply("[MMGPT]: <somu><🎶5><🎶2049><🎶4098><🎶6150><🎶7>")
    assert (reply.spans[0].closed, reply.spans[0].codes()) == (False, [[5], [1], [2], [6]])
    image = parse_reply("<soim><👀8191><👀0><eoim> and <soau><👂1025><👂3><👂2050><👂4095><eoau>")
    assert [s.modality for s in image.spans] == ["image", "audio"] and image.modality == "image"
    assert image.spans[0].codes() == [8191, 0]
    assert image.spans[1].codes() == [[1], [3], [2], [1023]]  # EnCodec 24 kHz: value mod 1024
    assert image.text == "and"
    with pytest.raises(ValueError, match="outside \\[0, 1024\\)"):
        parse_reply("<sosp><🗣️1024><eosp>").spans[0].codes()


def test_modality_string_round_trips():
    vocab = Vocabulary.anygpt()
    assert modality_string("speech", [12, 0]) == "<sosp><🗣️12><🗣️0><eosp>"
    music = [[1, 2], [3, 4], [5, 6], [7, 2047]]
    assert modality_string("music", music) == "<somu><🎶1><🎶2051><🎶4101><🎶6151><🎶2><🎶2052><🎶4102><🎶8191><eomu>"
    for modality, codes in (("speech", [5, 1023, 0, 7]), ("image", list(range(0, 8192, 257))), ("music", music)):
        assert parse_reply(modality_string(modality, codes, vocab)).spans[0].codes(vocab) == codes
    with pytest.raises(ValueError, match="modality='audio'"):
        modality_string("audio", [1])
    with pytest.raises(ValueError, match="expected 0 <= code < 1024"):
        modality_string("speech", [1024])
