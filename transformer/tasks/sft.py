"""Supervised fine-tuning of a chat model (decoder): conversations rendered with the model's own chat template, the
loss on the assistant's tokens only.

A conversation is rendered prefix by prefix: up to each assistant turn with the turn opened (the template's
generation prompt, which the model reads but does not learn to write), then through that turn (the reply and the
template's end-of-turn text, which it learns: that is how it learns to stop). Each new piece of text is tokenized on
its own, so the tokens trained on are exactly those `sample.py --chat` feeds and generates. Conversations are padded
on the right in batches of similar length: with the causal mask, real tokens never see the padding, which weighs 0.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from transformer.config import Config, ConfigError
from transformer.data.blocks import bucketed_plan, checked_position, next_in_plan
from transformer.data.prepare import hold_out
from transformer.data.sources import load_conversations
from transformer.data.tokenizer import save_tokenizer
from transformer.infer.chat import render_chat
from transformer.infer.evaluate import bleu
from transformer.tasks.base import Task, TaskData, pipeline_sizes
from transformer.tasks.seq2seq import bucket_lengths


def conversation_tokens(tok, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, learn): the conversation's token ids, and which of them the model learns to write (the assistant's
    replies with their end-of-turn text). Turns after the last assistant turn are left out: nothing to learn there."""
    ids, learn, done = [], [], ""

    def add(text: str, learned: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise ConfigError("the model's chat template renders a conversation differently from its beginning, so "
                              "the assistant's tokens cannot be told apart; fine-tune with prompt / completion data")
        new = tok.encode(text[len(done):], add_special_tokens=False).tolist()
        ids.extend(new)
        learn.extend([learned] * len(new))
        done = text

    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            add(render_chat(tok, messages[:i], add_generation_prompt=True), False)
            add(render_chat(tok, messages[:i + 1], add_generation_prompt=False), True)
    return np.asarray(ids, np.int32), np.asarray(learn, bool)


class SFTPipeline:
    """Conversations as inputs (ids[:-1]) and targets (ids[1:]) weighted 1 where the target is an assistant token,
    padded on the right to a length bucket; each epoch shuffles within buckets and visits the batches in a seeded
    order. Validation: the validation conversations sorted by length, in batches of `eval_rows`."""

    def __init__(self, train, val, *, T: int, batch_rows: int, eval_rows: int, n_eval: int, seed: int, tok,
                 pad: int):
        self.T, self.batch_rows, self.seed, self.pad = T, batch_rows, seed, pad
        self.buckets = bucket_lengths(T)
        self.train = self._encode(train, tok)
        if not self.train:
            raise ConfigError(f"no training conversation has an assistant token within model.max_len={T}")
        val = sorted(self._encode(val, tok), key=len)[:n_eval * eval_rows]
        if not val:
            raise ConfigError(f"no validation conversation has an assistant token within model.max_len={T}")
        self.val = [self._batch(val[k:k + eval_rows], eval_rows) for k in range(0, len(val), eval_rows)]
        self.epoch, self.index = 0, 0
        self._plan_epoch = None

    def _encode(self, conversations, tok) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for messages in conversations:
            ids, learn = conversation_tokens(tok, messages)
            ids, learn = ids[:self.T + 1], learn[:self.T + 1]
            if learn[1:].any():  # something to learn after truncation (the first token is never a target)
                out.append((ids, learn))
        return out

    def _length(self, example) -> int:
        return len(example[0]) - 1

    def _batch(self, examples, rows: int) -> dict:
        L = next(b for b in self.buckets if b >= max(self._length(e) for e in examples))
        inputs = np.full((rows, L), self.pad, np.int32)
        targets = np.full((rows, L), self.pad, np.int32)
        weights = np.zeros((rows, L), np.float32)
        valid = np.zeros((rows, L), bool)
        for i, (ids, learn) in enumerate(examples):
            n = len(ids) - 1
            inputs[i, :n], targets[i, :n], weights[i, :n], valid[i, :n] = ids[:-1], ids[1:], learn[1:], True
        return {"inputs": inputs, "targets": targets, "weights": weights, "valid": valid}

    def _plan(self, epoch: int) -> list[np.ndarray]:
        if self._plan_epoch != epoch:
            self._batches = bucketed_plan(self.seed, epoch, [self._length(e) for e in self.train], self.buckets,
                                          lambda _: self.batch_rows)
            self._plan_epoch = epoch
        return self._batches

    def next(self, step: int, rows) -> dict:
        members, self.epoch, self.index = next_in_plan(self._plan, self.epoch, self.index)
        batch = self._batch([self.train[i] for i in members], self.batch_rows)  # short batches: empty rows
        return {k: a[rows(self.batch_rows)] for k, a in batch.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = checked_position(state, lambda e: len(self._plan(e)), "fine-tuning batches")


class SupervisedFineTuning(Task):
    name = "sft"
    keys = ("inputs", "targets", "weights", "valid")
    unit = "conversations"

    def prepare(self, cfg: Config, run_dir: str, tok=None) -> TaskData:
        if tok is None or not getattr(tok, "chat_template", None):
            raise ConfigError("train.task=sft fine-tunes a chat model: set train.init_from to a run, a Hugging Face "
                              "directory or a .gguf file whose tokenizer has a chat template")
        train, val = load_conversations(cfg.data)
        if val is None:
            train, val = hold_out(train, cfg.data.val_fraction, "give data.val_path")
        if jax.process_index() == 0:
            save_tokenizer(tok, run_dir)
        return TaskData(tok, train, val)

    def pipeline(self, cfg: Config, data: TaskData, row_multiple: int = 1):
        tok = data.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        vocab = max(tok.vocab_size, cfg.model.vocab_size)  # a model's table may have rows past the tokenizer's
        return SFTPipeline(data.train, data.val, **pipeline_sizes(cfg), tok=tok, pad=pad), vocab

    def logits(self, model, batch: dict, key):
        return model(batch["inputs"], dropout_key=key)

    def weights(self, batch: dict):
        return batch["weights"]

    def real_tokens(self, batch: dict):
        return batch["valid"].sum()

    def metrics(self, cfg: Config, graphdef, params, data: TaskData) -> tuple[dict, str]:
        """With `train.bleu_sentences` = N > 0 (for translation-style chat data): sacreBLEU of the model's greedy
        replies to the first N validation conversations (each up to its last assistant turn) against those turns.
        Single-process runs only."""
        n = cfg.train.bleu_sentences
        if n <= 0 or jax.process_count() > 1:
            return {}, ""
        t0 = time.perf_counter()
        conversations = data.val[:n]
        hyps = chat_replies(graphdef, params, data.tokenizer, [c[:last_reply(c)] for c in conversations],
                            max_len=cfg.model.max_len)
        record = {"val_bleu": bleu(hyps, [c[last_reply(c)]["content"] for c in conversations]).score,
                  "bleu_seconds": time.perf_counter() - t0}
        return record, f"BLEU {record['val_bleu']:.2f} (greedy, {len(hyps)} replies, {record['bleu_seconds']:.1f} s)"


def last_reply(messages: list[dict]) -> int:
    return max(i for i, t in enumerate(messages) if t["role"] == "assistant")


def chat_replies(graphdef, params, tok, conversations: list[list[dict]], *, max_len: int, max_new_tokens: int = 128,
                 batch: int = 32) -> list[str]:
    """The model's greedy next assistant turn for each conversation, in batches of `batch` (one compiled program)."""
    from transformer.infer.sampling import Sampler, generate

    prompts = [tok.encode(render_chat(tok, c), add_special_tokens=False).tolist() for c in conversations]
    stops = [i for i in tok.stop_ids if i != tok.eos_id]
    replies = []
    for k in range(0, len(prompts), batch):
        rows = prompts[k:k + batch]
        rows += [rows[0]] * (min(batch, len(prompts)) - len(rows))  # a short last batch: the same program
        out = generate(graphdef, params, rows, max_new_tokens=max_new_tokens, max_len=max_len, sampler=Sampler(0.0),
                       eos_id=tok.eos_id, pad_id=tok.pad_id or 0, stop_sequences=[[i] for i in stops])
        replies += [tok.decode([i for i in t if i not in tok.stop_ids]).strip() for t in out.tokens]
    return replies[:len(prompts)]
