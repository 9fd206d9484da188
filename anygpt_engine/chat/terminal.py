"""The terminal chat behind `anygpt-engine chat` and the one-turn `anygpt-engine generate`.

An input line is a plain message, or AnyGPT's chat command-line format
(cli_infer_chat_model.py):

    task|instruction|to_modality|voice_prompt|images|speech|music

with comma-separated file lists; every field after the instruction is optional. to_modality
(text, image, speech or music) picks AnyGPT's sampling settings for the reply (and, with
--force-modality, also starts the reply with that modality's start token); voice_prompt
overrides --voice-prompt for this turn. An instruction of "clear" (e.g. "|clear") clears the
history; "quit" ends the chat.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

from anygpt_engine.chat.media import MediaOptions, codes_only_reason, encode_media_file, file_stem, write_reply_span
from anygpt_engine.chat.session import Chat, chat_params
from anygpt_engine.chat.template import Reply, task_message

TO_MODALITIES = ("text", "image", "speech", "music")


@dataclass
class ChatLine:
    """One parsed input line."""

    task: str
    instruction: str
    to_modality: str = "text"
    voice_prompt: str | None = None
    images: list[str] = field(default_factory=list)
    speech: list[str] = field(default_factory=list)
    music: list[str] = field(default_factory=list)

    @property
    def is_clear(self) -> bool:
        return self.instruction == "clear"


def parse_line(line: str) -> ChatLine:
    """A plain message, or the fields of `task|instruction|to_modality|voice_prompt|images|speech|music`."""
    line = line.strip()
    if "|" not in line:
        return ChatLine(task="", instruction=line)
    fields = [f.strip() for f in line.split("|")]
    if len(fields) > 7:
        raise ValueError(f"line has {len(fields)} '|'-separated fields, expected at most 7: "
                         "task|instruction|to_modality|voice_prompt|images|speech|music")
    fields += [""] * (7 - len(fields))
    task, instruction, to_modality, voice_prompt, images, speech, music = fields
    to_modality = to_modality or "text"
    if to_modality not in TO_MODALITIES:
        raise ValueError(f"to_modality={to_modality!r}, expected one of {TO_MODALITIES}")

    def files(text):
        return [f.strip() for f in text.split(",") if f.strip()]

    return ChatLine(task, instruction, to_modality, voice_prompt or None, files(images), files(speech), files(music))


def user_message(line: ChatLine, options: MediaOptions, chat: Chat) -> str:
    """The user message of a line: its files as modality strings, then AnyGPT's task prompt."""
    vocab, tokenizer = chat.engine.vocab, chat.tokenizer
    media = {name: [encode_media_file(name, path, options, vocab, tokenizer) for path in getattr(line, attr)]
             for name, attr in (("image", "images"), ("speech", "speech"), ("music", "music"))}
    message = task_message(line.task, line.instruction, media["image"], media["speech"], media["music"])
    if not message:
        raise ValueError("the line has no message (an instruction or input files)")
    return message


class Turns:
    """Runs turns of a Chat for a terminal: streams the text, writes modality spans to files."""

    def __init__(self, chat: Chat, options: MediaOptions, *, force_modality: bool = False, max_new_tokens=None,
                 temperature=None, seed=None, out=None):
        self.chat, self.options, self.force_modality = chat, options, force_modality
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.out = out if out is not None else sys.stdout
        self.turn = 0

    def params(self, to_modality: str):
        """AnyGPT's sampling for the requested modality, with the command line's overrides."""
        params = chat_params(to_modality)
        changes = {}
        if self.max_new_tokens is not None:
            changes["max_new_tokens"] = self.max_new_tokens
            changes["min_new_tokens"] = min(params.min_new_tokens, self.max_new_tokens)
        if self.temperature is not None:
            changes["temperature"] = self.temperature
        if self.seed is not None:
            changes["seed"] = self.seed + self.turn
        return dataclasses.replace(params, **changes)

    def run(self, line: ChatLine, stream: bool = True) -> tuple[Reply, list]:
        """One turn; returns the reply and [(modality, path)] of the files written."""
        message = user_message(line, self.options, self.chat)
        force = line.to_modality if self.force_modality and line.to_modality != "text" else None
        self.turn += 1
        if stream:
            self.out.write(f"{self.chat.template.assistant_role}: ")
            self.out.flush()
        reply = self.chat.send(message, self.params(line.to_modality), force_modality=force,
                               on_text=self._print if stream else None)
        if stream:
            self.out.write("\n")
        written = []
        options = self.options
        if line.voice_prompt:
            options = dataclasses.replace(options, voice_prompt=line.voice_prompt)
        stem = file_stem(self.turn, line.instruction)
        for i, span in enumerate(reply.spans):
            path = write_reply_span(span, stem if i == 0 else f"{stem}-{i}", options, self.chat.engine.vocab)
            written.append((span.modality, path))
            if stream:
                self.out.write(f"{span.modality} saved: {path}\n")
                if path.suffix == ".npy":
                    self.out.write(f"  (codes only: {codes_only_reason(span, options)})\n")
        if stream:
            self.out.flush()
        return reply, written

    def _print(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def interact(turns: Turns, lines=None, out=None) -> int:
    """The interactive loop: reads lines until "quit" or end of input."""
    out = out if out is not None else sys.stdout
    out.write(f"Chat with {turns.chat.template.name} ({turns.chat.engine!r}). Type a message or "
              "task|instruction|to_modality|voice_prompt|images|speech|music; '|clear' clears the history, "
              "'quit' ends.\n")
    out.flush()
    while True:
        try:
            line = _read(lines, out)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if line is None:
            return 0
        if line.strip() == "quit":
            return 0
        if not line.strip():
            continue
        try:
            parsed = parse_line(line)
            if parsed.is_clear:
                turns.chat.clear()
                out.write("history cleared\n")
                continue
            turns.run(parsed)
        except KeyboardInterrupt:
            out.write("\n[interrupted]\n")
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
            out.write(f"error: {err}\n")
        out.flush()


def _read(lines, out):
    if lines is not None:
        return next(lines, None)
    out.write("> ")
    out.flush()
    return input()


def one_turn(turns: Turns, text: str, as_json: bool = False) -> int:
    """`anygpt-engine generate`: one chat turn for scripts."""
    line = parse_line(text)
    if line.is_clear:
        raise ValueError("'clear' has no meaning for a single turn")
    reply, written = turns.run(line, stream=not as_json)
    if as_json:
        turns.out.write(json.dumps({
            "text": reply.text, "raw": reply.raw, "modality": reply.modality, "finish_reason": reply.finish_reason,
            "prompt_tokens": reply.prompt_tokens, "cached_tokens": reply.cached_tokens,
            "completion_tokens": len(reply.token_ids),
            "files": [{"modality": m, "path": str(p)} for m, p in written],
        }, ensure_ascii=False) + "\n")
    return 0
