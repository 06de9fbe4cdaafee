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


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model has no chat template (tokenizer_config.json's chat_template, or the GGUF "
                          "file's tokenizer.chat_template); prompt it with --prompt instead of --chat")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the model was trained to read it, ending with the assistant's turn opened."""
    import jinja2

    require_chat_template(tokenizer)
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


def reply(run, messages: list[dict], sampler, *, max_new_tokens: int, key, on_text=None) -> str:
    """The assistant's next turn: the conversation rendered by the chat template, then tokens until one of the
    tokens that end a turn (the tokenizer's eos and the generation config's), `max_new_tokens`, or the context.
    `on_text` receives the reply as it streams, never half a character."""
    from transformer.infer.sampling import generate, precompile

    tok = run.tokenizer
    ids = tok.encode(render_chat(tok, messages), add_special_tokens=False).tolist()
    stops = [i for i in tok.stop_ids if i != tok.eos_id]
    stream = TextStream(tok)

    def on_tokens(rows):
        if on_text is not None:
            on_text(stream.push([i for i in rows[0] if i not in tok.stop_ids]))

    kw = dict(max_new_tokens=max_new_tokens, max_len=run.cfg.model.max_len, sampler=sampler, key=key,
              eos_id=tok.eos_id, pad_id=tok.pad_id or 0, stop_sequences=[[i] for i in stops])
    if on_text is not None:  # compiled from the shapes: the weights may still be loading (load_run(background=True))
        precompile(run.graphdef, run.abstract_params, [ids], **kw)
    out = generate(run.graphdef, run.params, [ids], chunk=4 if on_text else None,
                   on_tokens=on_tokens if on_text else None, **kw)
    tokens = [i for i in out.tokens[0] if i not in tok.stop_ids]
    if on_text is not None:
        on_text(stream.flush())
    return tok.decode(tokens).strip()
