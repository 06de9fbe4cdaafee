"""Translation (encoder-decoder): sentence pairs in length-bucketed batches, teacher forcing, sacreBLEU."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import Config, ConfigError
from transformer.data.blocks import bucketed_plan, checked_position, next_in_plan
from transformer.data.prepare import hold_out, text_tokenizer
from transformer.data.sources import load_pairs
from transformer.data.specials import translation_ids
from transformer.infer.evaluate import bleu, translate_texts
from transformer.tasks.base import Task, TaskData, pipeline_sizes


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
            self._batches = bucketed_plan(self.seed, epoch, np.array([self._need(p) for p in self.train]),
                                          self.buckets, self.pairs_for)
            self._plan_epoch = epoch
        return self._batches

    def next(self, step: int, rows) -> dict:
        members, self.epoch, self.index = next_in_plan(self._plan, self.epoch, self.index)
        pairs = [self.train[i] for i in members]
        L = next(b for b in self.buckets if b >= max(self._need(p) for p in pairs))
        batch = self._batch(pairs, self.rows_for(L))
        return {k: a[rows(len(batch["inputs"]))] for k, a in batch.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = checked_position(state, lambda e: len(self._plan(e)), "translation batches")


class Translation(Task):
    name = "seq2seq"
    keys = ("inputs", "valid", "decoder_inputs", "targets", "weights")
    unit = "examples"
    smoothed = True

    def prepare(self, cfg: Config, run_dir: str, tok=None) -> TaskData:
        """Sentence pairs (train, val) and one tokenizer shared by both languages."""
        train, val = load_pairs(cfg.data)
        if val is None:
            train, val = hold_out(train, cfg.data.val_fraction, "data.val_source_file / data.val_target_file")
        both = lambda pairs: [s for pair in pairs for s in pair]  # noqa: E731
        return TaskData(text_tokenizer(cfg, run_dir, tok, both(train), both(val)), train, val)

    def pipeline(self, cfg: Config, data: TaskData, row_multiple: int = 1):
        """Token-sized batches have a multiple of `row_multiple` rows (empty rows complete them)."""
        tok = data.tokenizer
        bos, eos, pad, vocab = translation_ids(tok)
        return Seq2SeqPipeline(data.train, data.val, encode=tok.encode, bos=bos, eos=eos, pad=pad,
                               batch_tokens=cfg.train.batch_tokens, accum=cfg.train.grad_accum,
                               row_multiple=row_multiple, **pipeline_sizes(cfg)), vocab

    def logits(self, model, batch: dict, key):
        # teacher forcing: decoder inputs are the targets shifted right behind BOS
        return model(batch["inputs"], batch["decoder_inputs"], src_valid_BS=batch["valid"], dropout_key=key)

    def weights(self, batch: dict):
        return batch["weights"].astype(jnp.float32)  # the target tokens and EOS, not the padding

    def real_tokens(self, batch: dict):
        return batch["valid"].sum() + batch["weights"].sum()  # source + target tokens

    def metrics(self, cfg: Config, graphdef, params, data: TaskData) -> tuple[dict, str]:
        """sacreBLEU of `train.bleu_sentences` validation pairs (0: all; < 0: off), decoded with beam
        `train.bleu_beam`. Single-process runs only: decoding runs on one device."""
        if cfg.train.bleu_sentences < 0 or jax.process_count() > 1:
            return {}, ""
        t0 = time.perf_counter()
        pairs = data.val[:cfg.train.bleu_sentences or None]
        hyps = translate_texts(graphdef, params, data.tokenizer, cfg.model.max_len, [s for s, _ in pairs],
                               beam=cfg.train.bleu_beam)
        record = {"val_bleu": bleu(hyps, [t for _, t in pairs]).score, "bleu_seconds": time.perf_counter() - t0}
        return record, (f"BLEU {record['val_bleu']:.2f} (beam {cfg.train.bleu_beam}, {len(pairs)} sentences, "
                        f"{record['bleu_seconds']:.1f} s)")
