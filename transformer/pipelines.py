"""Batches for each training task, as dicts of numpy arrays (the keys `training.BATCH_KEYS` names).

A pipeline yields the rows of the global batch that this process asks for (`next(step, rows)`, where `rows(n)` gives
this process's row indices of an n-row global batch), a fixed list of
validation batches, and a small state that a checkpoint stores so a resumed run sees exactly the same batches.
Everything random is seeded by (seed, step, row), so the batches do not depend on how many hosts share them.
"""
from __future__ import annotations

import numpy as np

from transformer.config import ConfigError
from transformer.data import BlockIterator, checked_position, eval_batches, take_across_epochs
from transformer.mlm import Specials, frame, mask_tokens


class LMPipeline:
    """Next-token prediction on packed blocks: inputs are T tokens, targets the same shifted by one."""

    def __init__(self, train_tokens, val_tokens, *, T: int, batch_rows: int, eval_rows: int, n_eval: int,
                 seed: int):
        self.blocks = BlockIterator(train_tokens, T, batch_rows, seed)
        self.val = [{"inputs": x, "targets": y} for x, y in eval_batches(val_tokens, T, eval_rows, n_eval)]

    def next(self, step: int, rows) -> dict:
        x, y = self.blocks.next(rows(self.blocks.batch_size))
        return {"inputs": x, "targets": y}

    def state(self) -> dict:
        return self.blocks.state()

    def restore(self, state: dict) -> None:
        self.blocks.restore(state)


class MLMPipeline:
    """Masked-LM on packed blocks framed as [CLS] text [SEP]; 15% of tokens selected per BERT's recipe."""

    def __init__(self, train_tokens, val_tokens, *, T: int, batch_rows: int, eval_rows: int, n_eval: int,
                 seed: int, specials: Specials, n_regular: int):
        self.sp, self.n_regular, self.seed = specials, n_regular, seed
        self.blocks = BlockIterator(train_tokens, T - 2, batch_rows, seed)
        self.val = [self._corrupt(frame(x, specials), (1, i), np.arange(len(x)))
                    for i, (x, _) in enumerate(eval_batches(val_tokens, T - 2, eval_rows, n_eval))]

    def _corrupt(self, tokens_BT: np.ndarray, where: tuple[int, int], rows: np.ndarray) -> dict:
        """Mask each row with its own generator, seeded by (seed, split, step or val batch, global row)."""
        parts = [mask_tokens(row[None], np.random.default_rng([self.seed, *where, int(r)]), self.sp, self.n_regular)
                 for row, r in zip(tokens_BT, rows)]
        inputs, targets, weights = (np.concatenate(p) for p in zip(*parts))
        return {"inputs": inputs, "targets": targets, "weights": weights, "valid": np.ones_like(inputs, bool)}

    def next(self, step: int, rows) -> dict:
        rows = rows(self.blocks.batch_size)
        x, _ = self.blocks.next(rows)
        return self._corrupt(frame(x, self.sp), (0, step), rows)

    def state(self) -> dict:
        return self.blocks.state()

    def restore(self, state: dict) -> None:
        self.blocks.restore(state)


class ClassifyPipeline:
    """Labelled texts as [CLS] text [SEP] (truncated to T, padded), visited in a seeded order per epoch."""

    def __init__(self, train, val, *, T: int, batch_rows: int, eval_rows: int, n_eval: int, seed: int,
                 encode, specials: Specials, labels: list[str]):
        ids = {name: i for i, name in enumerate(labels)}
        unknown = sorted({lab for _, lab in val} - set(ids))
        if unknown:
            raise ConfigError(f"validation label {unknown[0]!r} never occurs in the training data")
        self.sp, self.T, self.batch_rows, self.seed = specials, T, batch_rows, seed
        self.train = self._encode(train, encode, ids)
        val = self._encode(val, encode, ids)
        n = len(val["targets"])
        n_full = min(n_eval, n // eval_rows)
        order = np.arange(max(n_full, 1) * eval_rows) % n  # fewer than one batch: repeat examples cyclically
        self.val = [{k: a[order[i * eval_rows:(i + 1) * eval_rows]] for k, a in val.items()}
                    for i in range(max(n_full, 1))]
        self.epoch, self.index = 0, 0
        self._order_epoch = None

    def _encode(self, examples, encode, ids) -> dict:
        T, sp = self.T, self.sp
        inputs = np.full((len(examples), T), sp.pad, np.int32)
        for i, (text, _) in enumerate(examples):
            row = np.concatenate([[sp.cls], encode(text)[:T - 2], [sp.sep]])
            inputs[i, :len(row)] = row
        targets = np.array([ids[lab] for _, lab in examples], np.int32)
        return {"inputs": inputs, "targets": targets, "valid": inputs != sp.pad}

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:  # drawn once per epoch, not once per step
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.train["targets"]))
            self._order_epoch = epoch
        return self._perm

    def next(self, step: int, rows) -> dict:
        idx, self.epoch, self.index = take_across_epochs(self._order, self.epoch, self.index, self.batch_rows)
        return {k: a[idx[rows(self.batch_rows)]] for k, a in self.train.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = checked_position(state, lambda e: len(self._order(e)), "classification examples")


def bucket_lengths(max_len: int) -> list[int]:
    """Padded lengths a batch may take (a handful, so the step compiles a handful of times)."""
    sizes = [n for n in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if n < max_len]
    return sizes + [max_len]


class Seq2SeqPipeline:
    """Translation pairs as (source, BOS + target) -> (target + EOS), in batches of similar length: each epoch
    groups the pairs by padded length bucket, shuffles within buckets, and visits the batches in a seeded order.

    The plan of an epoch depends on the data, the seed and the batch size only, never on the mesh: a batch whose row
    count the data-parallel shards (`row_multiple`) do not divide is completed with empty rows (no source, zero
    weight), so a run resumed on another number of devices sees exactly the same pairs at every step. Validation is
    the whole validation set, length-sorted into batches of `eval_rows` (the last one completed with empty rows)."""

    def __init__(self, train, val, *, T: int, batch_rows: int, eval_rows: int, n_eval: int, seed: int, encode,
                 bos: int, eos: int, pad: int, batch_tokens: int = 0, accum: int = 1, row_multiple: int = 1):
        self.T, self.batch_rows, self.seed = T, batch_rows, seed
        self.batch_tokens, self.accum, self.row_multiple = batch_tokens, accum, row_multiple
        self.bos, self.eos, self.pad = bos, eos, pad
        self.buckets = bucket_lengths(T)
        self.train = self._encode(train, encode)
        if not self.train:
            raise ConfigError(f"no training pair fits model.max_len={T} tokens; raise it")
        val = sorted(self._encode(val, encode), key=self._need)
        if not val:
            raise ConfigError(f"no validation pair fits model.max_len={T} tokens; raise it")
        self.val = [self._batch(val[k:k + eval_rows], eval_rows) for k in range(0, len(val), eval_rows)]
        self.epoch, self.index = 0, 0
        self._plan_epoch = None

    def _encode(self, pairs, encode) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for src, tgt in pairs:
            s, t = np.asarray(encode(src), np.int32), np.asarray(encode(tgt), np.int32)
            if 0 < len(s) <= self.T and 0 < len(t) < self.T:  # length filter: the target needs room for BOS / EOS
                out.append((s, t))
        return out

    def _need(self, pair) -> int:
        return max(len(pair[0]), len(pair[1]) + 1)

    def _batch(self, pairs, rows: int) -> dict:
        """`pairs` padded to the smallest bucket that holds them all, in `rows` rows: the rows past the pairs are
        empty (all padding, weight 0), so they change no loss, gradient or count."""
        L = next(b for b in self.buckets if b >= max(self._need(p) for p in pairs))
        src = np.full((rows, L), self.pad, np.int32)
        dec_in = np.full((rows, L), self.pad, np.int32)
        tgt = np.full((rows, L), self.pad, np.int32)
        weights = np.zeros((rows, L), np.float32)
        for i, (s, t) in enumerate(pairs):
            src[i, :len(s)] = s
            dec_in[i, :len(t) + 1] = np.concatenate([[self.bos], t])
            tgt[i, :len(t) + 1] = np.concatenate([t, [self.eos]])
            weights[i, :len(t) + 1] = 1.0
        return {"inputs": src, "valid": src != self.pad, "decoder_inputs": dec_in, "targets": tgt,
                "weights": weights}

    def pairs_for(self, L: int) -> int:
        """Pairs in a batch padded to length L: a fixed count, or (with `batch_tokens`) as many as fit the token
        budget per micro-batch, times the `accum` micro-batches. Independent of the mesh."""
        if not self.batch_tokens:
            return self.batch_rows
        return self.accum * max(1, self.batch_tokens // L)

    def rows_for(self, L: int) -> int:
        """Rows of a batch padded to length L: `pairs_for(L)` rounded up so that each of the `accum` micro-batches
        splits evenly over the data-parallel shards."""
        m = self.accum * self.row_multiple
        return -(-self.pairs_for(L) // m) * m

    def _plan(self, epoch: int) -> list[np.ndarray]:
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            need = np.array([self._need(p) for p in self.train])
            bucket_of = np.searchsorted(self.buckets, need)
            batches = []
            for b in np.unique(bucket_of):
                members = rng.permutation(np.flatnonzero(bucket_of == b))
                n = self.pairs_for(self.buckets[b])
                batches += [members[k:k + n] for k in range(0, len(members), n)]
            self._batches = [batches[i] for i in rng.permutation(len(batches))]
            self._plan_epoch = epoch
        return self._batches

    def next(self, step: int, rows) -> dict:
        plan = self._plan(self.epoch)
        members = plan[self.index]
        self.index += 1
        if self.index == len(plan):
            self.epoch, self.index = self.epoch + 1, 0
        pairs = [self.train[i] for i in members]
        L = next(b for b in self.buckets if b >= max(self._need(p) for p in pairs))
        batch = self._batch(pairs, self.rows_for(L))
        return {k: a[rows(len(batch["inputs"]))] for k, a in batch.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = checked_position(state, lambda e: len(self._plan(e)), "translation batches")


def translation_ids(tok) -> tuple[int, int, int, int]:
    """(bos, eos, pad, model vocabulary): the tokenizer's own when it has them (sentencepiece), otherwise three ids
    appended after its vocabulary (a char tokenizer)."""
    if None not in (tok.bos_id, tok.eos_id, tok.pad_id):
        return tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size
    V = tok.vocab_size
    return V, V + 1, V + 2, V + 3
