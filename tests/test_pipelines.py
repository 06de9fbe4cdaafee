import numpy as np
import pytest

from transformer.pipelines import Seq2SeqPipeline

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
    for b in batches:
        rows, L = b["inputs"].shape
        assert L in p.buckets and rows == p.rows_for(L)
        if kw.get("batch_tokens"):
            # as many rows as fit the budget per micro-batch, a multiple of the shards, never fewer than one each
            per_micro = rows // kw.get("accum", 1)
            m = kw.get("row_multiple", 1)
            assert per_micro % m == 0 and (per_micro * L <= 600 or per_micro == m)
            assert (per_micro + m) * L > 600
        # teacher forcing: BOS + target in, target + EOS out, weights on exactly the target + EOS positions
        n_tgt = b["weights"].sum(1).astype(int)
        assert (b["decoder_inputs"][:, 0] == BOS).all()
        assert (b["targets"][np.arange(rows), n_tgt - 1] == EOS).all()
        assert (b["valid"] == (b["inputs"] != PAD)).all()
        seen += [int(r[0]) - 3 for r in b["inputs"]]
    # every pair once (a short last batch of a bucket is filled by repeating its own pairs)
    assert set(seen) == set(range(len(PAIRS)))
    assert len({b["inputs"].shape for b in batches}) <= len(p.buckets)  # one compiled step per bucket at most


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
