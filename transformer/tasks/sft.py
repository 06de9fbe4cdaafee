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
from transformer.data.blocks import bucketed_plan, checked_position, next_in_plan, packed_plan
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


def _round_up(n: int, k: int) -> int:
    return -(-max(n, 1) // k) * k


class SFTPipeline:
    """Conversations as inputs (ids[:-1]) and targets (ids[1:]), learned where the target is an assistant token.

    Rows: with `pack`, several conversations packed into rows of `pack_length` tokens (0: the smallest length bucket
    holding the longest conversation, at least 256), each a segment of its own (segment ids, positions restarting at
    0) so none attends to another; packed in a seeded order each epoch. One compiled step and almost no padding:
    SmolLM2 LoRA trained 210 tokens/s packed vs 164 bucketed over its first minutes on a 2-core CPU. Else one
    conversation per row, padded on the right to a length bucket (each epoch shuffles within buckets and visits the
    batches in a seeded order).
    A batch holds `inputs`, `positions`, `segments` (0: padding), B x T, and the learned targets gathered per row:
    `loss_at` (their indices along T), `targets`, `weights` (0 pads the gather), B x N, where N is a fixed width
    per row length (unpacked: the most targets one conversation of that length has; packed: a cap the packing
    keeps, `_packed_width`), so the step compiles once per row length and the unembedding runs at those N
    positions only. Validation: the validation conversations sorted by length,
    one per row, in batches of `eval_rows`."""

    def __init__(self, train, val, *, T: int, batch_rows: int, eval_rows: int, n_eval: int, seed: int, tok,
                 pad: int, pack: bool = False, pack_length: int = 0):
        self.T, self.batch_rows, self.seed, self.pad = T, batch_rows, seed, pad
        self.buckets = bucket_lengths(T)
        self.train = self._encode(train, tok, min(pack_length, T) if pack and pack_length else T)
        if not self.train:
            raise ConfigError(f"no training conversation has an assistant token within model.max_len={T}")
        self.pack = 0  # row length when packing
        if pack:
            longest = max(self._length(e) for e in self.train)
            self.pack = min(pack_length, T) if pack_length else self._bucket(min(max(longest, 256), T))
        val = sorted(self._encode(val, tok, T), key=len)[:n_eval * eval_rows]
        if not val:
            raise ConfigError(f"no validation conversation has an assistant token within model.max_len={T}")
        self.width = {}  # row length -> gathered targets per row (the most any one conversation has there)
        for e in self.train + val:
            L = self._bucket(self._length(e))
            self.width[L] = max(self.width.get(L, 0), int(e[1][1:].sum()))
        self.width = {L: min(L, _round_up(n, 8)) for L, n in self.width.items()}
        self.val = [self._batch([[e] for e in val[k:k + eval_rows]], eval_rows) for k in range(0, len(val), eval_rows)]
        self.targets = np.array([int(e[1][1:].sum()) for e in self.train])
        self.packed_width = self._packed_width() if pack else 0
        self.epoch, self.index = 0, 0
        self._plan_epoch = None

    def _packed_width(self) -> int:
        """Targets per packed row, fixed for the run (one compiled step): the rows' share of targets with a 10%
        margin (packing caps each row there, which costs almost no row space), or the most one conversation has;
        a multiple of 16. For Multi30k chats in rows of 256: 64 (a plain maximum over the packed rows was 96),
        a third less of the 49152-wide output layer."""
        lengths = np.array([self._length(e) for e in self.train])
        share = self.targets.sum() / lengths.sum()
        return min(self.pack, _round_up(max(int(np.ceil(1.1 * share * self.pack)), int(self.targets.max())), 16))

    def _encode(self, conversations, tok, limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for messages in conversations:
            ids, learn = conversation_tokens(tok, messages)
            ids, learn = ids[:limit + 1], learn[:limit + 1]
            if learn[1:].any():  # something to learn after truncation (the first token is never a target)
                out.append((ids, learn))
        return out

    def _length(self, example) -> int:
        return len(example[0]) - 1

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _batch(self, rows: list[list[tuple]], n_rows: int, packed: bool = False) -> dict:
        """`rows`: each row's conversations (one, or several packed into rows of `pack_length`); fewer than `n_rows`
        leaves empty rows."""
        if packed:
            L, N = self.pack, self.packed_width
        else:
            L = self._bucket(max(self._length(e) for row in rows for e in row))
            N = self.width.get(L, L)
        inputs = np.full((n_rows, L), self.pad, np.int32)
        positions = np.zeros((n_rows, L), np.int32)
        segments = np.zeros((n_rows, L), np.int32)
        loss_at = np.zeros((n_rows, N), np.int32)
        targets = np.full((n_rows, N), self.pad, np.int32)
        weights = np.zeros((n_rows, N), np.float32)
        for r, row in enumerate(rows):
            t = k = 0
            for s, (ids, learn) in enumerate(row, 1):
                n = len(ids) - 1
                inputs[r, t:t + n], positions[r, t:t + n], segments[r, t:t + n] = ids[:-1], np.arange(n), s
                at = np.flatnonzero(learn[1:])
                loss_at[r, k:k + len(at)], targets[r, k:k + len(at)], weights[r, k:k + len(at)] = t + at, ids[1:][at], 1
                t, k = t + n, k + len(at)
        return {"inputs": inputs, "positions": positions, "segments": segments, "loss_at": loss_at,
                "targets": targets, "weights": weights}

    def _plan(self, epoch: int) -> list:
        if self._plan_epoch != epoch:
            lengths = [self._length(e) for e in self.train]
            if self.pack:
                self._batches = packed_plan(self.seed, epoch, lengths, self.pack, self.batch_rows,
                                            targets=self.targets, target_capacity=self.packed_width)
            else:
                self._batches = [[[i] for i in b] for b in bucketed_plan(self.seed, epoch, lengths, self.buckets,
                                                                         lambda _: self.batch_rows)]
            self._plan_epoch = epoch
        return self._batches

    def next(self, step: int, rows) -> dict:
        members, self.epoch, self.index = next_in_plan(self._plan, self.epoch, self.index)
        batch = self._batch([[self.train[i] for i in row] for row in members], self.batch_rows, bool(self.pack))
        return {k: a[rows(self.batch_rows)] for k, a in batch.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = checked_position(state, lambda e: len(self._plan(e)), "fine-tuning batches")


class SupervisedFineTuning(Task):
    name = "sft"
    keys = ("inputs", "positions", "segments", "loss_at", "targets", "weights")
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
        return SFTPipeline(data.train, data.val, **pipeline_sizes(cfg), tok=tok, pad=pad,
                           pack=cfg.data.pack, pack_length=cfg.data.pack_length), vocab

    def logits(self, model, batch: dict, key):
        """Logits at the learned positions only (B N V), each conversation attending within itself."""
        return model(batch["inputs"], positions_BT=batch["positions"], segments_BT=batch["segments"],
                     logits_at_BN=batch["loss_at"], dropout_key=key)

    def weights(self, batch: dict):
        return batch["weights"]

    def real_tokens(self, batch: dict):
        return (batch["segments"] > 0).sum()

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
