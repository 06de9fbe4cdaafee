import numpy as np
import pytest

from transformer.tasks.seq2seq import Seq2SeqPipeline

BOS, EOS, PAD = 1, 2, 0
RNG = np.random.default_rng(0)
# Pair i: a source of random length whose every token is i + 3, so a batch row says which pair it holds.
PAIRS = [(" ".join([str(i + 3)] * int(RNG.integers(1, 40))), " ".join([str(i + 3)] * int(RNG.integers(1, 40))))
         for i in range(500)]


def encode(text):
    return [int(w) for w in text.split()]


def pipeline(**kw):
    return Seq2SeqPipeline(PAIRS, PAIRS[:20], T=48, eval_rows=8, n_eval=2, seed=0, encode=encode, bos=BOS, eos=EOS,
                           pad=PAD, **{"batch_rows": 16, **kw})


def epoch_batches(p):
    out = [p.next(0, np.arange)]
    while p.index:
        out.append(p.next(0, np.arange))
    return out


@pytest.mark.parametrize("kw", [{}, {"batch_tokens": 600, "row_multiple": 4}, {"batch_tokens": 600, "accum": 2}])
def test_an_epoch_visits_every_pair_once_in_a_few_padded_shapes(kw):
    p = pipeline(**kw)
    batches = epoch_batches(p)
    seen = []
    A, m = kw.get("accum", 1), kw.get("row_multiple", 1)
    for b in batches:
        rows, L = b["inputs"].shape
        assert L in p.buckets and rows == p.rows_for(L) and rows % (A * m) == 0  # micro-batches split over shards
        if kw.get("batch_tokens"):  # as many pairs as fit the budget per micro-batch
            per_micro = p.pairs_for(L) // A
            assert per_micro * L <= 600 < (per_micro + 1) * L
        real = b["weights"].sum(1) > 0
        assert real.sum() <= p.pairs_for(L) and real[:real.sum()].all()  # the pairs first, then empty rows
        assert not b["valid"][~real].any() and (b["targets"][~real] == PAD).all()  # empty: no source, no weight
        # teacher forcing: BOS + target in, target + EOS out, weights on exactly the target + EOS positions
        n_tgt = b["weights"][real].sum(1).astype(int)
        assert (b["decoder_inputs"][real, 0] == BOS).all()
        assert (b["targets"][real][np.arange(real.sum()), n_tgt - 1] == EOS).all()
        assert (b["valid"] == (b["inputs"] != PAD)).all()
        seen += [int(r[0]) - 3 for r in b["inputs"][real]]
    assert sorted(seen) == list(range(len(PAIRS)))  # every pair exactly once
    assert len({b["inputs"].shape for b in batches}) <= len(p.buckets)  # one compiled step per bucket at most


def test_batches_do_not_depend_on_the_mesh_and_a_foreign_position_is_refused():
    """A run resumed on another number of devices sees the same pairs at every step: only the empty rows that
    round a batch up to the shards differ."""
    from transformer.config import ConfigError
    runs = [pipeline(batch_tokens=600, accum=2, row_multiple=m) for m in (1, 2, 8)]
    for step in range(80):  # over two epochs
        pairs = []
        for p in runs:
            b = p.next(step, np.arange)
            pairs.append([int(r[0]) for r in b["inputs"][b["weights"].sum(1) > 0]])
        assert pairs[0] == pairs[1] == pairs[2]
    assert runs[0].epoch >= 1
    with pytest.raises(ConfigError, match="does not fit"):
        pipeline(batch_tokens=600).restore({"epoch": 0, "index": 10 ** 6})


def test_validation_is_the_whole_set_once():
    p = pipeline()  # 20 validation pairs in batches of 8 (eval_batches=2 no longer cuts it to the 16 shortest)
    real = [int(r[0]) - 3 for b in p.val for r, w in zip(b["inputs"], b["weights"]) if w.sum() > 0]
    assert sorted(real) == list(range(20))


def test_token_budget_batches_hold_more_short_rows():
    p = pipeline(batch_tokens=768)
    assert [p.rows_for(L) for L in (16, 24, 32, 48)] == [48, 32, 24, 16]


def test_rows_callable_selects_this_process_rows_and_state_resumes():
    p, q = pipeline(batch_tokens=600), pipeline(batch_tokens=600)
    for _ in range(3):
        p.next(0, np.arange)
    q.restore(p.state())
    full = p.next(0, np.arange)
    half = q.next(0, lambda n: np.arange(n // 2, n))  # e.g. the second of two processes
    for k in full:
        np.testing.assert_array_equal(full[k][len(full[k]) // 2:], half[k])


@pytest.mark.parametrize("name", ["lm", "mlm", "classify", "seq2seq"])
def test_every_task_yields_the_arrays_it_declares_and_a_loss_over_them(name):
    """The trainer knows a task only through its protocol (`tasks/base.py`): every training and validation batch
    holds exactly the arrays `task.keys` names, all with one batch axis, and the task's loss over a batch of the
    model it asks for (its vocabulary, its classes) is finite with a positive weight count."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from transformer.cli import parse_args
    from transformer.data.tokenizer import CharTokenizer
    from transformer.model import build_model
    from transformer.tasks import TASKS, TaskData

    arch = {"lm": "decoder", "mlm": "encoder", "classify": "encoder", "seq2seq": "encoder_decoder"}[name]
    cfg, _ = parse_args([f"--model.arch={arch}", f"--train.task={name}", "--model.d_model=16", "--model.n_heads=2",
                         "--model.n_layers=1", "--model.max_len=16", "--train.batch_size=4", "--train.eval_batches=2"])
    text = "the quick brown fox jumps over the lazy dog. " * 20
    tok = CharTokenizer(text)
    data = {"lm": TaskData(tok, tok.encode(text), tok.encode(text[:300])),
            "mlm": TaskData(tok, tok.encode(text), tok.encode(text[:300])),
            "classify": TaskData(tok, [("the fox", "a"), ("the lazy dog", "b")] * 10, [("a fox", "a")] * 5, ["a", "b"]),
            "seq2seq": TaskData(tok, [("the fox", "xof eht"), ("a dog", "god a")] * 10, [("a fox", "xof a")] * 5),
            }[name]
    task = TASKS[name]
    pipeline, vocab = task.pipeline(cfg, data)
    batch = pipeline.next(1, np.arange)
    for b in [batch, *pipeline.val]:
        assert sorted(b) == sorted(task.keys)
        assert len({a.shape[0] for a in b.values()}) == 1
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab, n_classes=len(data.labels or ()))
    sums = task.sums(build_model(model_cfg, nnx.Rngs(0)), jax.tree.map(jnp.asarray, batch), None)
    assert float(sums["count"]) > 0 and np.isfinite(float(sums["loss"]))
