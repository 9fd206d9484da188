"""AnyGPT's prompt formats, string for string, and reply parsing.

- `ChatTemplate.anygpt("MMGPT")` renders a conversation as AnyGPT's conversation.py
  `get_prompt()` does ("MMGPT" is the name its chat model was trained with; "AnyGPT" is the
  other registered template):

      {system}\\n[Human]: {user}<eoh>\\n[MMGPT]: {reply}<eos>\\n[Human]: {user}<eoh>\\n[MMGPT]:

  plus " <sosp>" (or <soim>, <somu>) when an output modality is forced.
- `base_prompt` gives the base model's single-turn prompts (prompter.py): text to a modality,
  `[Human]: {instruction} This is input: {text}<eoh> [MMGPT]:`, and a modality to text,
  `[Human]: {instruction} {<soX>...<eoX>}<eoh> [MMGPT]:`.
- `task_message` builds the user message of AnyGPT's chat command line from its
  `task|instruction|...` fields (prompter.py's instruction prompts).
- `parse_reply` takes a decoded reply (or a whole decoded conversation) apart: the text, and each
  `<soX> ... <eoX>` span as codec codes.
- `modality_string` spells codes the way the tokenizer does (`<sosp><🗣️12>...<eosp>`), so a
  user message can carry speech, image or music tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from anygpt_engine.vocab import (MODALITIES, MUSIC_CODEBOOK_SIZE, MUSIC_CODEBOOKS, Vocabulary, end_token_text,
                                 start_token_text, value_token)

FORCEABLE = ("image", "speech", "music")  # the output modalities get_prompt() can force
ROLES = ("system", "user", "assistant")
# AnyGPT's "audio" tokens: EnCodec 24 kHz, 4 codebooks of 1024, flattened like music.
AUDIO_CODEBOOKS, AUDIO_CODEBOOK_SIZE = 4, 1024


@dataclass(frozen=True)
class ChatTemplate:
    """One of AnyGPT's conversation templates (conversation.py)."""

    name: str
    system: str  # the default system message
    user_role: str
    assistant_role: str
    user_end: str  # closes a user turn
    assistant_end: str  # closes a reply

    @classmethod
    def anygpt(cls, name: str = "MMGPT") -> "ChatTemplate":
        if name not in ("MMGPT", "AnyGPT"):
            raise ValueError(f"name={name!r}, expected 'MMGPT' (AnyGPT's chat model) or 'AnyGPT'")
        return cls(name=name,
                   system=f"You are an AI assistant named {name} who can understand and generate multimodal content, "
                          "including text, speech, images and audio.",
                   user_role="[Human]", assistant_role=f"[{name}]", user_end="<eoh>",
                   assistant_end="<eos>" if name == "MMGPT" else "<eom>")

    def render(self, messages: list[dict], force_modality: str | None = None) -> str:
        """The prompt for OpenAI-style messages: an optional system message first, then user and
        assistant turns alternating, starting with the user. Ends with the reply prompt
        "[MMGPT]:" (and " <soX>" for force_modality) when the last message is the user's."""
        system, turns = self.split(messages)
        turns = [(m["role"], m["content"]) for m in turns]
        if force_modality is not None:
            if force_modality not in FORCEABLE:
                raise ValueError(f"force_modality={force_modality!r}, expected None or one of {FORCEABLE}")
            if not turns or turns[-1][0] != "user":
                raise ValueError("force_modality needs a conversation that ends with a user message")
        out = system + "\n"
        for i, (role, content) in enumerate(turns):
            name = self.user_role if role == "user" else self.assistant_role
            if not content:
                out += name + ":"  # get_prompt() writes an empty message as the bare role
            elif role == "user":
                out += f"{name}: {content}{self.user_end}\n"
            else:
                out += f"{name}: {content}{self.assistant_end}" + ("\n" if i != len(turns) - 1 else "")
        if turns and turns[-1][0] == "user":
            out += self.assistant_role + ":"
            if force_modality is not None:
                out += " " + start_token_text(force_modality)
        return out

    def split(self, messages: list[dict]) -> tuple[str, list[dict]]:
        """(system message, the user/assistant turns), checked: roles alternate, user first."""
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
        system, turns = self.system, []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise TypeError(f"messages[{i}]={message!r}, expected a dict with 'role' and 'content'")
            role, content = message["role"], message.get("content")
            if role not in ROLES:
                raise ValueError(f"messages[{i}]['role']={role!r}, expected one of {ROLES}")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise TypeError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
            if role == "system":
                if i != 0:
                    raise ValueError(f"messages[{i}] is a system message; only messages[0] may be one")
                system = content
                continue
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"messages[{i}]['role']={role!r}, expected {expected!r} (turns alternate, user first)")
            turns.append({"role": role, "content": content})
        return system, turns

    def reply_text(self, text: str) -> str:
        """The reply in a decoded output: after the last "[MMGPT]" (and its colon) and before the
        last "<eos>" (or "<eom>"), stripped; either tag may be missing."""
        start = text.rfind(self.assistant_role)
        if start >= 0:
            text = text[start + len(self.assistant_role):].lstrip()
            if text.startswith(":"):
                text = text[1:]
        for end in dict.fromkeys((self.assistant_end, "<eos>", "<eom>")):
            stop = text.rfind(end)
            if stop >= 0:
                text = text[:stop]
                break
        return text.strip()


def base_prompt(instruction: str, content: str, modality: str = "text") -> str:
    """AnyGPT-base's single-turn prompt (prompter.py's generate_prompt_input): for text input
    (to any modality) "[Human]: {instruction} This is input: {text}<eoh> [MMGPT]:"; for a
    modality's tokens (to text) "[Human]: {instruction} {tokens}<eoh> [MMGPT]:"."""
    if modality == "text":
        return f"[Human]: {instruction} This is input: {content}<eoh> [MMGPT]:"
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r}, expected 'text' or one of {MODALITIES}")
    return f"[Human]: {instruction} {content}<eoh> [MMGPT]:"


# -- AnyGPT's chat command line: task|instruction|... -> the user message ---------------------------
_SPEECH_TASKS = {
    "Speech-Instruction": "{speech} Please recognize the voice command and give reply and voice",
    "Speech-Instruction2": "{speech} Please acknowledge the user's vocal input, create a textual response",
    "Speech-Instruction-Speech": "{speech} Please interpret the user's voice commands, provide text responses, and "
                                 "generate corresponding voice replies",
    "Speech-Instruction-Text": "{speech} Please interpret the user's voice commands, provide text responses.",
}
_TEXT_TASKS = {
    "Text-Instruction": "{text} Please interpret the user's text input, create a textual response.",
    "Text-Instruction2": "{text} Please interpret the user's text input, create a textual response, and subsequently "
                         "produce a corresponding voice reply.",
    # AnyGPT's examples use this task name; its prompter looks it up under "Text-to-Music".
    "Text-to-Music Generation": "{text} Please compose a piece of music from the given text.",
}
_IMAGE_TASKS = {  # task: (images needed, format)
    "Multimodal Prompt Image Generation": (1, "{image1} {text} Please generation an image."),
    "Image Conversation": (1, "{image1} {text}"),
    "Image Captioning": (1, "{image1} Please provide an accurate and concisedescription of the given image."),
    "Image QA": (1, "{image1} {text} Please provide an accurate answer consisting of only one word or phrase."),
    "Multi-Image Understanding": (2, "This is the first image. {image1} This is the second image. {image2} {text}"),
}
TASKS = ("Text-to-Image Generation", *_IMAGE_TASKS, "customized", *_SPEECH_TASKS, *_TEXT_TASKS, "interleaved")


def task_message(task: str, instruction: str, images=(), speech=(), music=()) -> str:
    """The user message AnyGPT's chat CLI builds for a task (prompter.py's
    generate_insturction_prompt, then strip()). images/speech/music are modality strings
    (`modality_string`). An unknown or empty task sends the instruction as it is."""
    images, speech, music = list(images), list(speech), list(music)
    if task == "Text-to-Image Generation":
        if not instruction:
            raise ValueError("task 'Text-to-Image Generation' needs an instruction (the caption)")
        caption = instruction if instruction[-1] in ".!?" else instruction + "."
        message = f"{caption} Please generation an image."
    elif task in _IMAGE_TASKS:
        need, form = _IMAGE_TASKS[task]
        if len(images) < need:
            raise ValueError(f"task {task!r} needs {need} image(s) in the images field, got {len(images)}")
        message = form.format(text=instruction, image1=images[0], image2=images[1] if need > 1 else "")
    elif task in _SPEECH_TASKS:
        if not speech:
            raise ValueError(f"task {task!r} needs a speech input in the speech field")
        message = _SPEECH_TASKS[task].format(speech=speech[0])
    elif task in _TEXT_TASKS:
        message = _TEXT_TASKS[task].format(text=instruction)
    elif task == "interleaved":
        message = "".join(item + " " for item in images + music + speech) + instruction
        if speech:
            message = _SPEECH_TASKS["Speech-Instruction"].format(speech=message)
    else:
        message = instruction
    return message.strip()


# -- modality tokens as text -------------------------------------------------------------------------
def modality_string(modality: str, codes, vocab: Vocabulary | None = None, tokenizer=None) -> str:
    """Codec codes as the tokens a message spells, start and end tokens included:
    speech level-1 codes [T] -> "<sosp><🗣️12>...<eosp>"; image codes [32]; music codes [4, T]
    (frame-major, value = code + 2048 * level). With a tokenizer, each token is spelled as the
    tokenizer spells its id (the checkpoint is the authority); otherwise AnyGPT's spellings."""
    vocab = vocab if vocab is not None else Vocabulary.anygpt()
    encoders = {"speech": vocab.encode_speech, "image": vocab.encode_image, "music": vocab.encode_music}
    if modality not in encoders:
        raise ValueError(f"modality={modality!r}, expected one of {tuple(encoders)}")
    ids = encoders[modality](codes)
    ids = [vocab.start_token(modality), *(ids.reshape(-1).tolist() if hasattr(ids, "tolist") else ids),
           vocab.end_token(modality)]
    if tokenizer is not None:
        return "".join(tokenizer.id_to_token(i) for i in ids)
    first = vocab.span(modality).first_value
    return (start_token_text(modality) + "".join(value_token(modality, i - first) for i in ids[1:-1])
            + end_token_text(modality))


# -- replies ------------------------------------------------------------------------------------------
_SPAN = re.compile("|".join(re.escape(start_token_text(m)) for m in MODALITIES))


@dataclass
class ReplySpan:
    """One <soX> ... <eoX> span of a reply."""

    modality: str  # "image", "speech", "music" or "audio"
    values: list[int]  # the value tokens' numbers, in order (<🗣️12> -> 12)
    closed: bool  # whether the end token was there (False: the reply stopped inside the span)

    def token_ids(self, vocab: Vocabulary) -> list[int]:
        """The span's value tokens as ids of `vocab` (for codecs.speech_codes and friends)."""
        span = vocab.span(self.modality)
        bad = [v for v in self.values if not 0 <= v < span.num_values]
        if bad:
            raise ValueError(f"{self.modality} span has values {bad[:5]}, outside [0, {span.num_values})")
        return [span.first_value + v for v in self.values]

    def codes(self, vocab: Vocabulary | None = None):
        """Codec codes: speech level-1 codes [T] and image codes as lists of ints; music codes
        [4][T] (EnCodec 32 kHz) and audio codes [4][T] (EnCodec 24 kHz). Music and audio follow
        AnyGPT's decoding (content2rvq_codes): position in the frame gives the level, the code is
        value mod the codebook size, a trailing partial frame is dropped; for well-formed spans
        this equals Vocabulary.decode_music."""
        vocab = vocab if vocab is not None else Vocabulary.anygpt()
        ids = self.token_ids(vocab)
        if self.modality == "speech":
            return vocab.decode_speech(ids)
        if self.modality == "image":
            return vocab.decode_image(ids)
        levels, size = ((MUSIC_CODEBOOKS, MUSIC_CODEBOOK_SIZE) if self.modality == "music"
                        else (AUDIO_CODEBOOKS, AUDIO_CODEBOOK_SIZE))
        frames = len(self.values) // levels
        return [[self.values[t * levels + level] % size for t in range(frames)] for level in range(levels)]


@dataclass
class Reply:
    """A parsed reply: its text outside modality spans, and the spans."""

    text: str
    spans: list[ReplySpan] = field(default_factory=list)
    raw: str = ""  # the whole reply as decoded (spans spelled out), stripped
    token_ids: list[int] = field(default_factory=list)  # what the model generated (set by Chat)
    finish_reason: str | None = None  # "stop", "length" or "abort" (set by Chat)
    prompt_tokens: int = 0  # the turn's prompt length, and how much of it the prefix cache held
    cached_tokens: int = 0

    @property
    def modality(self) -> str:
        """The output modality as AnyGPT's chat decides it: the first of image, speech, music,
        audio whose start token the reply contains, else "text"."""
        for name in MODALITIES:
            if any(s.modality == name for s in self.spans):
                return name
        return "text"


def parse_reply(text: str, template: ChatTemplate | None = None) -> Reply:
    """Takes a decoded reply apart (a whole decoded conversation works too: the reply is taken
    between the last "[MMGPT]" and the last "<eos>", as AnyGPT's chat does). Value tokens are
    read by their spellings, so the spaces a sentencepiece decode puts between added tokens
    (`<sosp> <🗣️1> <🗣️2> <eosp>`) do not matter."""
    template = template if template is not None else ChatTemplate.anygpt()
    raw = template.reply_text(text)
    spans, pieces, pos = [], [], 0
    while True:
        match = _SPAN.search(raw, pos)
        if match is None:
            pieces.append(raw[pos:])
            break
        pieces.append(raw[pos:match.start()])
        modality = next(m for m in MODALITIES if start_token_text(m) == match.group())
        end = raw.find(end_token_text(modality), match.end())
        body = raw[match.end():end if end >= 0 else len(raw)]
        prefix = re.escape(value_token(modality, 0)[:-2])  # "<🗣️"
        values = [int(v) for v in re.findall(prefix + r"(\d+)>", body)]
        spans.append(ReplySpan(modality, values, closed=end >= 0))
        if end < 0:
            break
        pos = end + len(end_token_text(modality))
    text_only = " ".join(p.strip() for p in pieces if p.strip())
    return Reply(text=text_only, spans=spans, raw=raw)
