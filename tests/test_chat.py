"""Chat sessions on the tiny preset with an AnyGPT-layout tokenizer: each turn's prompt extends the
history token for token, so the prefix cache serves it and only the new tokens are prefilled."""

import pytest

from anygpt_engine import Chat, ChatTemplate, Engine, SamplingParams, Tokenizer, codecs
from anygpt_engine.chat import modality_string
from anygpt_tokenizers import sentencepiece_model, write_sentencepiece_dir, write_tokenizers_dir

pytest.importorskip("sentencepiece")

GREEDY = SamplingParams.greedy(max_new_tokens=7)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return write_sentencepiece_dir(tmp_path_factory.mktemp("sp"), sentencepiece_model())


@pytest.fixture(scope="module")
def engine(sp_dir):
    return Engine("tiny", device="cpu", tokenizer=sp_dir, num_blocks=160, block_size=16)


def test_second_turn_prefills_only_its_new_tokens(engine):
    chat = Chat(engine, params=GREEDY)
    first = chat.send("Hello there, who are you?")
    history = chat.token_ids
    second_prompt = chat.prompt_ids("And what can you do?")
    assert second_prompt[:len(history)] == history  # token for token
    second = chat.send("And what can you do?")
    assert second.prompt_tokens == len(second_prompt)
    # The first turn computed K/V for its prompt and all generated tokens but the last; every full
    # block of that is served from the cache. So the second prefill computes the new turn's tokens,
    # and of the history only the last partial block (< 16), the last sampled token and the <eos>
    # that closed the reply.
    computed_before = first.prompt_tokens + len(first.token_ids) - 1
    assert second.cached_tokens == computed_before // 16 * 16
    assert len(history) - second.cached_tokens <= 15 + 2
    assert len(history) > 2 * 16 and second.prompt_tokens - second.cached_tokens < len(second_prompt) - 16
    stats = engine.stats()
    assert stats.prefix_hits >= second.cached_tokens > 0 and stats.running == 0


def test_history_text_is_anygpt_template(engine):
    chat = Chat(engine, params=GREEDY)
    reply = chat.send("Hi!")
    assert chat.messages == [{"role": "system", "content": ChatTemplate.anygpt().system},
                             {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": reply.raw}]
    # The first prompt is the tokenised template, BOS first.
    assert chat.token_ids[:reply.prompt_tokens] == engine.tokenizer.encode(
        ChatTemplate.anygpt().render([{"role": "user", "content": "Hi!"}]))
    assert chat.token_ids[-1] == engine.tokenizer.token_to_id("<eos>")  # every reply closes with <eos>


@pytest.mark.parametrize("kind", ["legacy", "non-legacy", "tokenizer.json"])
def test_continuation_equals_full_tokenisation(tmp_path, sp_dir, kind):
    # Tokenising the new turn after the history's <eos> gives what tokenising the whole rendered
    # conversation gives there, for each kind of tokenizer.
    if kind == "non-legacy":
        path = write_sentencepiece_dir(tmp_path, (sp_dir / "tokenizer.model").read_bytes(), legacy=False)
    elif kind == "tokenizer.json":
        pytest.importorskip("transformers")
        path = write_tokenizers_dir(sp_dir, tmp_path / "json", legacy=True)
    else:
        path = sp_dir
    engine = Engine("tiny", device="cpu", tokenizer=Tokenizer.from_pretrained(path), num_blocks=8)
    template = ChatTemplate.anygpt()
    history = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
               {"role": "user", "content": "Speak: <sosp><🗣️12><🗣️3><eosp>"},
               {"role": "assistant", "content": "<sosp><🗣️7><eosp>"}]
    chat = Chat.from_messages(engine, history)
    assert chat.token_ids == engine.tokenizer.encode(template.render(history))
    for force in (None, "speech"):
        message = "  And now?\nTwo lines, 3 digits: 123 <soim><👀5><eoim>"
        full = engine.tokenizer.encode(template.render(history + [{"role": "user", "content": message}], force))
        assert chat.prompt_ids(message, force) == full, force


def test_fork_shares_the_history_and_its_cache(engine):
    chat = Chat(engine, params=GREEDY)
    chat.send("Tell me about music and images please.")
    base = chat.token_ids
    fork = chat.fork()
    a = chat.send("First branch.")
    b = fork.send("Second branch, a different question.")
    for reply in (a, b):
        assert reply.cached_tokens >= (len(base) - 1) // 16 * 16 - 16 and reply.cached_tokens > 0
    assert chat.messages[-2]["content"] == "First branch." and fork.messages[-2]["content"].startswith("Second")
    assert chat.token_ids[:len(base)] == fork.token_ids[:len(base)] == base
    assert len(chat.messages) == len(fork.messages) == 5


def test_forced_speech_reply_gives_codes(engine):
    chat = Chat(engine, params=SamplingParams.greedy(max_new_tokens=6))
    reply = chat.send("Please say hello.", force_modality="speech")
    vocab = engine.vocab
    assert reply.modality == "speech" and len(reply.spans) == 1
    span = reply.spans[0]
    generated = [t for t in reply.token_ids if t in vocab.range("speech")]
    assert span.values and span.codes() == codecs.speech_codes(generated).tolist()
    assert span.closed == (vocab.end_token("speech") in reply.token_ids)
    # The history holds the forced <sosp> and the reply exactly as generated.
    assert chat.token_ids[reply.prompt_tokens - 1] == vocab.start_token("speech")
    assert chat.token_ids[reply.prompt_tokens:reply.prompt_tokens + len(reply.token_ids)] == reply.token_ids


def test_user_message_with_speech_tokens(engine):
    chat = Chat(engine, params=GREEDY)
    codes = [12, 0, 1023, 511]
    spelled = modality_string("speech", codes, engine.vocab, engine.tokenizer)
    assert spelled == "<sosp><🗣️12><🗣️0><🗣️1023><🗣️511><eosp>"
    ids = chat.prompt_ids(spelled + " Please transcribe.")
    speech = codecs.speech_tokens(codes, markers=True).tolist()
    start = ids.index(speech[0])
    assert ids[start:start + len(speech)] == speech


def test_params_pass_through_and_streaming(engine):
    chat = Chat(engine, params=GREEDY)
    first = chat.fork().send("Hello?").token_ids[0]
    pieces = []
    reply = chat.send("Hello?", SamplingParams.greedy(max_new_tokens=5, stop_token_ids=(first,)),
                      on_text=pieces.append)
    assert reply.token_ids == [first] and reply.finish_reason == "stop"
    streamed = []
    chat.clear()
    reply = chat.send("Stream this.", on_text=streamed.append)
    assert len(reply.token_ids) == GREEDY.max_new_tokens and reply.finish_reason == "length"
    text_ids = chat._text_ids(reply.token_ids)
    assert "".join(streamed) == engine.tokenizer.decode(text_ids, skip_special_tokens=True)


def test_bad_use(engine, sp_dir):
    with pytest.raises(ValueError, match="needs an engine with a tokenizer"):
        Chat(Engine("tiny", device="cpu", num_blocks=8))
    chat = Chat(engine, params=GREEDY)
    with pytest.raises(ValueError, match="content is empty"):
        chat.send("   ")
    with pytest.raises(ValueError, match="force_modality='video'"):
        chat.send("hi", force_modality="video")
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        chat.send("hi", params={"temperature": 0})
    rid = engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="other requests"):
        chat.send("hi")
    engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="end with an assistant message"):
        Chat.from_messages(engine, [{"role": "user", "content": "hi"}])
