"""Chat: a conversation rendered by the model's own chat template (Jinja, as Hugging Face renders it), and text
streamed without ever printing half a character."""
from __future__ import annotations

import functools
import json
from datetime import datetime

from transformer.config import ConfigError, first_line


@functools.lru_cache(maxsize=8)
def _template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                  ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ConfigError(f"the model's chat template does not parse ({first_line(e)})") from None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the model was trained to read it, ending with the assistant's turn opened."""
    import jinja2

    if not has_chat_template(tokenizer):
        raise ConfigError("this model has no chat template (tokenizer_config.json's chat_template, or the GGUF "
                          "file's tokenizer.chat_template); prompt it with --prompt instead of --chat")
    try:
        return _template(tokenizer.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=tokenizer.bos or "",
            eos_token=tokenizer.eos or "", pad_token=tokenizer.pad or "")
    except jinja2.TemplateError as e:
        raise ConfigError(f"the model's chat template failed on this conversation ({first_line(e)})") from None


class TextStream:
    """Incremental detokenisation: `push(ids)` returns the text that the tokens so far add, holding back a trailing
    incomplete character. Byte-level BPE pieces can end inside a multi-byte UTF-8 character; the tokenizer decodes
    such bytes as U+FFFD, which is only printed once more tokens show it is really there."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded text already returned

    def push(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text)
        while end > self.shown and text[end - 1] == "\ufffd":
            end -= 1
        new, self.shown = text[self.shown:end], max(self.shown, end)
        return new

    def flush(self) -> str:
        """Whatever is left at the end, replacement characters included (the model really produced bad bytes)."""
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[self.shown:], len(text)
        return new
