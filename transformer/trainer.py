"""The training run: prepare data and tokenizer, build or restore the state, loop, evaluate, checkpoint.

Everything with side effects lives here (files, signals, progress); the math is in `training.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time

import jax
import numpy as np
from flax import nnx

from transformer import platform, sharding
from transformer.checkpoint import CONFIG_FILE, Checkpointer, abstract_like, read_run_config, write_json_atomic
from transformer.config import Config, ConfigError
from transformer.data import label_names, load_examples, load_pairs, load_texts, split_text
from transformer.evaluate import bleu, translate_texts
from transformer.loading import load_run
from transformer.mlm import specials_for
from transformer.models import build_model
from transformer.pipelines import ClassifyPipeline, LMPipeline, MLMPipeline, Seq2SeqPipeline, translation_ids
from transformer.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, save_tokenizer
from transformer.training import (flops_per_token, inference_params, init_state, lr_schedule, make_optimizer,
                                  make_steps, means, peak_tflops, task_of)

METRICS_FILE = "metrics.jsonl"
TOKENS_DIR = "tokens"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message says which step and which checkpoint is intact."""


def run_dir_of(cfg: Config) -> str:
    return cfg.train.run_dir or os.path.join("runs", cfg.preset)


# ----------------------------------------------------------------------------------------------------------- data

def prepare_data(cfg: Config, run_dir: str, tok: Tokenizer | None = None) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer (trained here unless given) and token streams; cached in the run dir so a resumed run trains on
    exactly the same tokens."""
    tok_dir = os.path.join(run_dir, TOKENS_DIR)
    train_path, val_path = os.path.join(tok_dir, "train.npy"), os.path.join(tok_dir, "val.npy")
    if all(os.path.exists(p) for p in (train_path, val_path, os.path.join(run_dir, "tokenizer.json"))):
        return load_tokenizer(run_dir), np.load(train_path), np.load(val_path)
    docs, val_docs = load_texts(cfg.data)
    train_text, val_text = split_text(docs, cfg.data.val_fraction, val_docs)
    tok = tok or build_tokenizer(cfg.data, train_text, val_text)
    train_tokens, val_tokens = tok.encode(train_text), tok.encode(val_text)
    if jax.process_index() == 0:  # every host computes the same tokens; one writes the cache
        os.makedirs(tok_dir, exist_ok=True)
        for path, arr in ((train_path, train_tokens), (val_path, val_tokens)):
            tmp = f"{path}.tmp{os.getpid()}.npy"
            np.save(tmp, arr)
            os.replace(tmp, path)
        save_tokenizer(tok, run_dir)
    return tok, train_tokens, val_tokens


def prepare_classify(cfg: Config, run_dir: str, tok: Tokenizer | None):
    """Labelled examples (train, val), their label names, and the tokenizer (given, cached in the run, or trained
    on the training texts)."""
    train, val = load_examples(cfg.data)
    if val is None:  # files are often sorted by label: hold out a random fraction
        train, val = hold_out(train, cfg.data.val_fraction, "data.val_path")
    labels = label_names(train)
    if len(labels) < 2:
        raise ConfigError(f"classification needs at least 2 labels in column {cfg.data.label_column!r}, found "
                          f"{labels}")
    tok = _pair_tokenizer(cfg, run_dir, tok, [t for t, _ in train], [t for t, _ in val])
    return tok, train, val, labels


def hold_out(items: list, fraction: float, alternative: str) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` of the items held out for validation."""
    order = np.random.default_rng(0).permutation(len(items))
    cut = int(len(items) * (1.0 - fraction))
    if not 0 < cut < len(items):
        raise ConfigError(f"cannot hold out data.val_fraction={fraction} of {len(items)} examples; give more data "
                          f"or {alternative}")
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]


def _pair_tokenizer(cfg: Config, run_dir: str, tok: Tokenizer | None, train_texts, val_texts) -> Tokenizer:
    """The given tokenizer, the run's cached one, or one trained on the texts; saved with the run."""
    if tok is None and os.path.exists(os.path.join(run_dir, "tokenizer.json")):
        tok = load_tokenizer(run_dir)
    if tok is None:
        tok = build_tokenizer(cfg.data, "\n".join(train_texts), "\n".join(val_texts))
    if jax.process_index() == 0:
        save_tokenizer(tok, run_dir)
    return tok


def prepare_translation(cfg: Config, run_dir: str, tok: Tokenizer | None):
    """Sentence pairs (train, val) and one tokenizer shared by both languages (given, cached, or trained here)."""
    train, val = load_pairs(cfg.data)
    if val is None:
        train, val = hold_out(train, cfg.data.val_fraction, "data.val_source_file / data.val_target_file")
    both = lambda pairs: [s for pair in pairs for s in pair]  # noqa: E731
    return _pair_tokenizer(cfg, run_dir, tok, both(train), both(val)), train, val


def check_run_dir(cfg: Config, run_dir: str) -> None:
    """An existing run dir must hold the same model and data, or resuming would silently mix two experiments."""
    saved = read_run_config(run_dir)
    if saved is None:
        return
    # With train.init_from the model config comes from that run, so only the data must match.
    for section in ("data",) if cfg.train.init_from else ("model", "data"):
        ours = dataclasses.asdict(getattr(cfg, section))
        theirs = dict(saved.get(section, {}))
        if section == "model":
            # from the tokenizer and the labels; and how this machine multiplies, which changes no parameter
            for derived in ("vocab_size", "n_classes", "matmul_dtype"):
                ours.pop(derived), theirs.pop(derived, None)
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(f"run dir {run_dir} holds a different {section} ({section}.{k}={theirs.get(k)!r}, "
                              f"now {ours.get(k)!r}); use another --train.run_dir or delete that directory")


# ------------------------------------------------------------------------------------------------------- logging

class Progress:
    """tqdm bar on a terminal (or when asked), a plain line per log interval otherwise; always a JSONL file."""

    def __init__(self, cfg: Config, run_dir: str, start: int, is_main: bool):
        self.is_main = is_main
        self.jsonl = open(os.path.join(run_dir, METRICS_FILE), "a") if is_main else None
        self.bar = None
        if is_main and cfg.train.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)

    def log(self, record: dict, message: str, permanent: bool = False) -> None:
        """Append the record to the JSONL file; show the message in the bar, or as its own line if permanent."""
        if not self.is_main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.bar is not None and not permanent:
            self.bar.set_postfix_str(message, refresh=False)
        else:
            self.write(f"step {record['step']}: {message}")

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()


class StopFlag:
    """SIGTERM (preemption) and Ctrl-C set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------- train

def build_state(cfg: Config, mesh):
    """Graph, sharded train state created directly on the devices (never whole on one host), and its shardings."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    def create():
        model = build_model(cfg.model, nnx.Rngs(cfg.train.seed))
        return init_state(model, tx, cfg.train.seed, ema=cfg.optim.ema_decay > 0)[1]

    abstract = jax.eval_shape(create)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0))))
    shardings = sharding.tree_shardings(abstract, mesh)
    return graphdef, tx, abstract, shardings, jax.jit(create, out_shardings=shardings)


def evaluate(eval_step, params, batches: list[dict], batch_sharding) -> dict:
    """Per-token (or per-example) mean loss and accuracy over all the validation batches together: sums over the
    set divided once, so a short batch counts by its tokens. Each process puts only the rows its devices hold."""
    rows = len(batches[0]["inputs"])
    lo, hi = sharding.local_rows(batch_sharding, (rows,), axis=0)
    sums = [eval_step(params, {k: sharding.put_batch(a[lo:hi], batch_sharding, a.shape) for k, a in b.items()})
            for b in batches]
    total = jax.tree.map(lambda *x: np.sum(x, dtype=np.float64), *jax.device_get(sums))
    return {k: float(v) for k, v in means(total).items()}


def checkpoint_meta(cfg: Config, pipeline, tok: Tokenizer, labels=None) -> dict:
    """A checkpoint's JSON item: the resolved config, the data-iterator state, the tokenizer, the class labels."""
    return {"config": cfg.to_dict(), "data_state": pipeline.state(), "tokenizer": tok.to_json(), "labels": labels}


def make_pipeline(cfg: Config, tok: Tokenizer, train_data, val_data, labels=None, n_batch_shards: int = 1):
    """The batches of this run's task (and the model's vocabulary size: the encoder tasks may append special
    tokens). The data are token streams, or (text, label) pairs for classification, or translation pairs;
    token-sized translation batches have a multiple of `n_batch_shards` rows."""
    T, B, A = cfg.model.max_len, cfg.train.batch_size, cfg.train.grad_accum
    common = {"T": T, "batch_rows": B * A, "eval_rows": B, "n_eval": cfg.train.eval_batches, "seed": cfg.train.seed}
    if task_of(cfg) == "seq2seq":
        bos, eos, pad, vocab = translation_ids(tok)
        return Seq2SeqPipeline(train_data, val_data, encode=tok.encode, bos=bos, eos=eos, pad=pad,
                               batch_tokens=cfg.train.batch_tokens, accum=A, row_multiple=n_batch_shards,
                               **common), vocab
    if task_of(cfg) == "classify":
        specials, vocab = specials_for(tok)
        plain = getattr(tok, "mask_id", None) is None  # WordPiece adds [CLS] / [SEP] itself unless told not to
        encode = tok.encode if plain else (lambda t: tok.encode(t, add_special_tokens=False))
        return ClassifyPipeline(train_data, val_data, encode=encode, specials=specials, labels=labels,
                                **common), vocab
    if task_of(cfg) == "mlm":
        if T < 3:
            raise ConfigError("model.max_len must be >= 3 for masked-LM blocks ([CLS] text [SEP])")
        specials, vocab = specials_for(tok)
        return MLMPipeline(train_data, val_data, specials=specials, n_regular=tok.vocab_size, **common), vocab
    return LMPipeline(train_data, val_data, **common), tok.vocab_size


def train(cfg: Config, *, resume: bool = False) -> dict:
    """Train (or continue) the run in `cfg.train.run_dir`. Returns the final metrics."""
    cfg = platform.resolve(cfg)  # the "auto" fields; splits a CPU host before the first device query below
    run_dir = run_dir_of(cfg)
    is_main = jax.process_index() == 0
    check_run_dir(cfg, run_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    n_batch_shards = sharding.batch_shards(mesh)
    if cfg.train.batch_size % n_batch_shards:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the data x fsdp mesh size "
                          f"{n_batch_shards}")
    ckpt = Checkpointer(run_dir, cfg.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}; drop --resume to start a new run there")
    os.makedirs(run_dir, exist_ok=True)

    source = None
    if cfg.train.init_from:  # start from another run's model (e.g. an MLM run): its config, tokenizer, weights
        source = load_run(cfg.train.init_from, mesh=mesh)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(source.cfg.model, dropout=cfg.model.dropout,
                                                                 n_classes=0))
    labels = None
    if task_of(cfg) == "classify":
        tok, train_data, val_data, labels = prepare_classify(cfg, run_dir, source and source.tokenizer)
    elif task_of(cfg) == "seq2seq":
        tok, train_data, val_data = prepare_translation(cfg, run_dir, source and source.tokenizer)
    else:
        tok, train_data, val_data = prepare_data(cfg, run_dir, source and source.tokenizer)
    pipeline, vocab = make_pipeline(cfg, tok, train_data, val_data, labels, n_batch_shards)
    if source is not None and vocab != source.cfg.model.vocab_size:
        raise ConfigError(f"{cfg.train.init_from} has a vocabulary of {source.cfg.model.vocab_size}, this task needs "
                          f"{vocab}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab,
                                                             n_classes=len(labels or ()))).validate()
    T, A = cfg.model.max_len, cfg.train.grad_accum
    if is_main:
        write_json_atomic(os.path.join(run_dir, CONFIG_FILE), cfg.to_dict())

    graphdef, tx, abstract, shardings, create = build_state(cfg, mesh)
    train_step, eval_step = make_steps(graphdef, tx, cfg, mesh, shardings)
    if latest is not None:
        try:
            state, meta = ckpt.restore(latest, abstract_like(abstract, shardings))
        except ValueError as e:
            raise ConfigError(f"checkpoint {latest} in {run_dir} does not match this configuration "
                              f"({str(e).strip().splitlines()[0]}); use another --train.run_dir") from None
        pipeline.restore(meta["data_state"])
    else:
        state = create()
        if source is not None:  # the source's weights where this model has the same modules; new heads stay fresh
            params = state["params"]
            for name in source.params:
                if name in params:
                    params[name] = source.params[name]
            state = {**state, "params": params}
            if "ema" in state:
                state["ema"] = jax.tree.map(jax.numpy.copy, params)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    start = int(jax.device_get(state["step"]))

    def meta():
        return checkpoint_meta(cfg, pipeline, tok, labels)

    progress = Progress(cfg, run_dir, start, is_main)
    unit = "tokens" if task_of(cfg) in ("lm", "mlm") else "examples"
    progress.write(f"{cfg.preset}: {n_params:,} parameters, vocab {cfg.model.vocab_size}, {len(train_data):,} train / "
                   f"{len(val_data):,} val {unit}, {mesh.size} {jax.devices()[0].platform} device(s) "
                   f"mesh {dict(mesh.shape)}, run dir {run_dir}"
                   + (f", resuming at step {start}" if latest is not None else ""))
    batch_A = sharding.batch_sharding(mesh, lead_axes=1)
    micro_rows = {}  # of the batch last asked for: (rows per micro-batch b, this process's [lo, hi) of them)
    local_rows = functools.lru_cache(lambda b: sharding.local_rows(batch_A, (A, b), axis=1))

    def my_rows(n: int) -> np.ndarray:
        """This process's row indices of an n-row global batch, split into A micro-batches of n / A rows."""
        b = n // A
        lo, hi = local_rows(b)
        micro_rows["last"] = (b, lo, hi)
        return (np.arange(A)[:, None] * b + np.arange(lo, hi)).reshape(-1)
    schedule = lr_schedule(cfg.optim, cfg.train.steps)  # optax applies schedule(k - 1) at step k
    flops_tok = flops_per_token(cfg, n_params)
    # The CPU peak is a whole host's, however many devices (mesh.cpu_devices) the host is split into.
    chips = jax.process_count() if jax.devices()[0].platform == "cpu" else mesh.size
    peak = peak_tflops(cfg) * 1e12 * chips
    last_good = latest
    result = {"step": start}
    pending, t_last, tokens = [], time.perf_counter(), 0  # tokens: real (non-pad) tokens trained on since t_last

    def check_finite(step):
        nonlocal pending, tokens
        fetched = jax.device_get(pending)
        pending = []
        losses = [float(m["loss"]) for m in fetched]
        tokens += sum(int(m["tokens"]) for m in fetched)
        if not all(map(math.isfinite, losses)):
            where = f"the last good checkpoint (step {last_good}) is intact" if last_good is not None else \
                "no checkpoint was written"
            raise TrainingDiverged(f"loss became {losses[-1]} by step {step}; stopping: {where}. "
                                   "Lower optim.lr, raise optim.warmup_steps or check the data")
        return losses

    def save(step, val_loss=None):
        nonlocal last_good
        ckpt.save(step, state, meta(), val_loss)
        last_good = step

    with StopFlag() as stop:
        try:
            for step in range(start + 1, cfg.train.steps + 1):
                local = pipeline.next(step, my_rows)
                b, lo, hi = micro_rows["last"]
                batch = {k: sharding.put_batch(a.reshape(A, hi - lo, *a.shape[1:]), batch_A, (A, b, *a.shape[1:]))
                         for k, a in local.items()}
                state, metrics = train_step(state, batch)
                pending.append(metrics)
                final = step == cfg.train.steps
                if step % cfg.train.log_interval == 0 or final or stop.signal:
                    last_metrics = jax.device_get(metrics)
                    losses = check_finite(step)
                    now = time.perf_counter()
                    tok_s = tokens / (now - t_last)
                    t_last, tokens = now, 0
                    record = {"step": step, "loss": losses[-1], "grad_norm": float(last_metrics["grad_norm"]),
                              "lr": float(schedule(step - 1)), "tokens_per_s": tok_s,
                              "mfu": flops_tok * tok_s / peak if peak else None, "time": time.time()}
                    result.update(record)
                    mfu = f" mfu {record['mfu']:.1%}" if peak else ""
                    progress.log(record, f"loss {losses[-1]:.4f} {tok_s:,.0f} tok/s{mfu}")
                val_loss = None
                if step % cfg.train.eval_interval == 0 or final:
                    t0 = time.perf_counter()
                    val = evaluate(eval_step, inference_params(state), pipeline.val, sharding.batch_sharding(mesh))
                    val_loss = val["loss"]
                    t_last += time.perf_counter() - t0  # evaluation time is not training throughput
                    record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                              "time": time.time()}
                    message = f"val loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}"
                    if task_of(cfg) != "lm":
                        record["val_accuracy"] = val["accuracy"]
                        message += f", accuracy {val['accuracy']:.2%}"
                    if task_of(cfg) == "seq2seq" and cfg.train.bleu_sentences >= 0 and jax.process_count() == 1:
                        t1 = time.perf_counter()
                        pairs = val_data[:cfg.train.bleu_sentences or None]
                        hyps = translate_texts(graphdef, inference_params(state), tok, T, [s for s, _ in pairs],
                                               beam=cfg.train.bleu_beam)
                        record["val_bleu"] = bleu(hyps, [t for _, t in pairs]).score
                        record["bleu_seconds"] = time.perf_counter() - t1
                        message += (f", BLEU {record['val_bleu']:.2f} (beam {cfg.train.bleu_beam}, {len(pairs)} "
                                    f"sentences, {record['bleu_seconds']:.1f} s)")
                    result.update(record)
                    progress.log(record, message, permanent=True)
                if step % cfg.train.ckpt_interval == 0 or final or stop.signal:
                    check_finite(step)
                    save(step, val_loss)
                progress.advance(1)
                result["step"] = step
                if stop.signal:
                    progress.write(f"{stop.signal}: saved a checkpoint at step {step} in {run_dir}; "
                                   "re-run the same command to resume")
                    result["stopped_by"] = stop.signal
                    break
        finally:
            ckpt.wait()
            ckpt.close()
            progress.close()
    return result

