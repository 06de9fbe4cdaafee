"""Encoder-decoder model: masks, cross-attention wiring, padding invariance, cached decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.seq2seq import EncoderDecoder

CFG = ModelConfig(arch="encoder_decoder", vocab_size=30, d_model=32, n_heads=4, n_layers=2, n_decoder_layers=2,
                  max_len=24, positions="sinusoidal", norm_position="post", scale_embeddings=True)


@pytest.fixture(scope="module")
def model():
    return EncoderDecoder(CFG, rngs=nnx.Rngs(0))


SRC = jnp.array([[5, 6, 7, 8, 9, 10]])
TGT = jnp.array([[1, 11, 12, 13, 14]])
VALID = jnp.ones_like(SRC, bool)


def test_encoder_sees_the_whole_source(model):
    memory = model.encode(SRC, VALID)
    changed = model.encode(SRC.at[0, 5].set(20), VALID)
    assert float(jnp.abs(changed[0, 0] - memory[0, 0]).max()) > 1e-4


def test_decoder_is_causal_and_reads_the_source(model):
    logits = model(SRC, TGT, src_valid_BS=VALID)
    later = model(SRC, TGT.at[0, 3].set(25), src_valid_BS=VALID)
    np.testing.assert_allclose(later[0, :3], logits[0, :3], atol=1e-6)  # positions <= 2 never see token 3
    assert float(jnp.abs(later[0, 3] - logits[0, 3]).max()) > 1e-4
    other_source = model(SRC.at[0, 2].set(21), TGT, src_valid_BS=VALID)
    assert float(jnp.abs(other_source[0, 0] - logits[0, 0]).max()) > 1e-4  # cross-attention is wired


def test_padding_changes_nothing(model):
    logits = model(SRC, TGT, src_valid_BS=VALID)
    padded_src = jnp.concatenate([SRC, jnp.zeros((1, 3), SRC.dtype)], axis=1)
    padded_valid = jnp.concatenate([VALID, jnp.zeros((1, 3), bool)], axis=1)
    np.testing.assert_allclose(model(padded_src, TGT, src_valid_BS=padded_valid), logits, atol=1e-5)
    padded_tgt = jnp.concatenate([TGT, jnp.zeros((1, 4), TGT.dtype)], axis=1)
    np.testing.assert_allclose(model(SRC, padded_tgt, src_valid_BS=VALID)[:, :5], logits, atol=1e-5)


def test_cached_decoding_equals_the_full_forward(model):
    full = model(SRC, TGT, src_valid_BS=VALID)
    memory = model.encode(SRC, VALID)
    kvs = model.cross_kvs(memory)
    cache = model.init_cache(1, 8)
    S = 8
    steps = []
    for t in range(TGT.shape[1]):
        pos = jnp.full((1, 1), t, jnp.int32)
        mask = (jnp.arange(S) <= t)[None, None, None, :]
        logits, cache = model.decode(TGT[:, t:t + 1], VALID, cross_kvs=kvs, positions_BT=pos, mask_B1TS=mask,
                                     cache=cache, cache_index=t)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(jnp.stack(steps, axis=1), full, atol=1e-5)
    assert jax.tree.leaves(cache)[0].shape[-1] == S


def test_tiny_model_learns_to_reverse_digit_strings(tmp_path, capsys):
    """train.py on two aligned files (a digit is one sentencepiece token), then greedy and beam decoding: 100% exact
    match on held-out strings, sacreBLEU 100 from `python -m transformer.infer.evaluate` and during training."""
    import json
    import os
    import random
    import re
    import subprocess
    import sys

    from transformer.data.specials import translation_ids
    from transformer.infer.loading import load_run
    from transformer.infer.translate import translate
    from transformer.train import METRICS_FILE
    rng = random.Random(0)

    def digits():  # space-separated, so that sacreBLEU sees words
        return " ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 7)))
    src = [digits() for _ in range(3000)]
    (tmp_path / "src.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(s[::-1] for s in src) + "\n")
    run_dir = tmp_path / "run"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Trained through the CLI, compiled at XLA's default optimisation level: this test runs 1,000 steps, where the
    # suite's fast-compile flag would cost more in run time than it saves in compile time.
    trained = subprocess.run([
        sys.executable, os.path.join(repo, "train.py"),
        "--model.arch=encoder_decoder", "--data.source_file", str(tmp_path / "src.txt"), "--data.target_file",
        str(tmp_path / "tgt.txt"), "--model.d_model=64", "--model.n_heads=4", "--model.n_layers=2",
        "--model.max_len=16", "--model.positions=sinusoidal", "--model.scale_embeddings=true",
        "--train.batch_size=32", "--train.steps=1000", "--train.eval_interval=1000", "--train.progress=false",
        "--train.run_dir", str(run_dir), "--optim.lr=2e-3", "--optim.warmup_steps=20", "--train.sample_tokens=0",
        "--train.bleu_sentences=100", "--data.tokenizer=sentencepiece", "--data.vocab_size=300", "--mesh.data=1"],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, cwd=repo)
    assert trained.returncode == 0, trained.stderr[-2000:]
    with open(run_dir / METRICS_FILE) as f:
        out = [r for r in map(json.loads, f) if "val_bleu" in r][-1]
    assert out["val_accuracy"] > 0.95 and out["val_bleu"] > 95.0
    run = load_run(str(run_dir))
    bos, eos, pad, _ = translation_ids(run.tokenizer)
    tests = [digits() for _ in range(100)]
    outs = translate(run.graphdef, run.params, [run.tokenizer.encode(s).tolist() for s in tests], max_new_tokens=12,
                     bos=bos, eos=eos, pad=pad)
    assert [run.tokenizer.decode(o) for o in outs] == [s[::-1] for s in tests]
    (tmp_path / "ref.txt").write_text("\n".join(s[::-1] for s in tests) + "\n")
    (tmp_path / "src100.txt").write_text("\n".join(tests) + "\n")
    from transformer.infer.evaluate import main as evaluate_main
    evaluate_main(["--checkpoint", str(run_dir), "--source-file", str(tmp_path / "src100.txt"), "--reference-file",
                   str(tmp_path / "ref.txt")])
    assert re.search(r"BLEU 100\.00 on 100 sentences \(beam 4", capsys.readouterr().out)
    beams = translate(run.graphdef, run.params, [run.tokenizer.encode(s).tolist() for s in tests[:20]],
                      max_new_tokens=12, bos=bos, eos=eos, pad=pad, beam_size=4)  # beams reorder the KV cache
    assert [run.tokenizer.decode(o) for o in beams] == [s[::-1] for s in tests[:20]]
    (tmp_path / "in.txt").write_text("\n".join(tests[:5]) + "\n")
    from inproc import run as in_process
    cli = in_process("sample.py", "--checkpoint", str(run_dir), "--source-file", str(tmp_path / "in.txt"))
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.splitlines() == [s[::-1] for s in tests[:5]]
    ignored = in_process("sample.py", "--checkpoint", str(run_dir), "--source", tests[0], "--num-samples", "2")
    assert ignored.returncode == 2 and "--num-samples does not apply" in ignored.stderr, ignored.stderr


def test_beam_search_scores_are_the_models_and_beam_one_is_never_worse_than_greedy(model):
    from transformer.infer.translate import _compiled_beam, translate
    sources = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    kw = dict(max_new_tokens=8, bos=1, eos=2, pad=0)
    gd, params = nnx.split(model, nnx.Param)
    src = np.zeros((3, 16), np.int32)
    for i, s in enumerate(sources):
        src[i, :len(s)] = s
    valid = jnp.asarray(src != 0)

    def logp_of(p, tokens):  # log-probability of each row's tokens up to its EOS, from a full teacher-forced pass
        dec_in = jnp.concatenate([jnp.ones((len(tokens), 1), jnp.int32), tokens[:, :-1]], axis=1)
        logp = jax.nn.log_softmax(nnx.merge(gd, p)(jnp.asarray(src), dec_in, src_valid_BS=valid), axis=-1)
        tok_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
        ended = jnp.cumsum(tokens == 2, axis=1) - (tokens == 2)  # positions after the EOS
        return jnp.where(ended > 0, 0.0, tok_logp).sum(1)

    # Beam 1 keeps the best hypothesis that ended along the greedy path, so under its own (length-penalised)
    # score it is never worse than greedy decoding; neither emits PAD or BOS.
    greedy = translate(gd, params, sources, **kw)
    beam1, score1 = _compiled_beam(gd, 1, 8, 1, 2, 0, 0.6)(params, jnp.asarray(src), valid)
    for g, b, s, logp in zip(greedy, beam1.tolist(), score1, logp_of(
            params, jnp.asarray([g + [2] + [0] * (7 - len(g)) if len(g) < 8 else g for g in greedy]))):
        assert not {0, 1} & set(g) and not {0, 1} & set(b[:b.index(2)] if 2 in b else b)
        if len(g) < 8:  # greedy ended with EOS within the budget
            assert float(s) >= float(logp) / ((5 + len(g) + 1) / 6) ** 0.6 - 1e-4
    # Beam 4 with the cache reordered along with the beams: each returned score is the true log-probability of
    # the returned tokens under a full (uncached) teacher-forced forward pass. Weights scaled up so that the
    # random model's predictions depend strongly on the context (a wrongly ordered cache then shows).
    sharp = jax.tree.map(lambda p: p * 3.0, params)
    tokens, scores = _compiled_beam(gd, 4, 8, 1, 2, 0, 0.0)(sharp, jnp.asarray(src), valid)
    np.testing.assert_allclose(logp_of(sharp, tokens), scores, rtol=1e-4, atol=1e-4)
    best = tokens[0].tolist()
    assert translate(gd, sharp, sources, beam_size=4, length_penalty=0.0, **kw)[0] == best[:best.index(2)] \
        if 2 in best else best


def test_learned_positions_never_run_past_their_table(tmp_path):
    """A source padded past max_len used to look up positions the table does not have (NaN rows that spread through
    the attention): padding stops at max_len, the target at the end of the table, and greedy decoding equals an
    argmax loop over the full forward."""
    from transformer.infer.translate import translate
    cfg = ModelConfig(arch="encoder_decoder", vocab_size=30, d_model=32, n_heads=4, n_layers=1, max_len=20,
                      positions="learned")
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(1))
    gd, params = nnx.split(model, nnx.Param)
    src = list(range(3, 21))  # 18 tokens: padded to 32 before, to 20 now
    out = translate(gd, params, [src], max_new_tokens=40, bos=1, eos=-1, pad=0, target_margin=None)[0]
    assert len(out) == 20  # the position table's length, not 40
    # the decoder is causal: logits at step t of a target padded to 20 are those of the target so far
    forward = jax.jit(lambda dec: model(jnp.asarray([src]), dec, src_valid_BS=jnp.ones((1, 18), bool))[0])
    dec = [1]
    for t in range(20):
        logits = forward(jnp.asarray([dec + [0] * (20 - len(dec))]))[t]
        dec.append(int(jnp.argmax(logits.at[jnp.array([0, 1])].set(-jnp.inf))))  # never PAD or BOS
    assert out == dec[1:]
    with pytest.raises(ValueError, match="longer than the model's context of 20"):
        translate(gd, params, [list(range(3, 24))], max_new_tokens=5, bos=1, eos=2, pad=0)


def test_targets_stop_a_margin_past_the_source_length(model):
    """A model that never emits the end token (eos=-1) runs to the cap: max_new_tokens, or target_margin tokens past
    the source length rounded up to 16, whichever is smaller."""
    from transformer.infer.translate import translate
    gd, params = nnx.split(model, nnx.Param)
    kw = dict(bos=1, eos=-1, pad=0)
    for margin, beam, want in ((3, 1, 19), (3, 4, 19), (None, 1, 40)):
        rows = translate(gd, params, [[5, 6, 7], [8, 9]], max_new_tokens=40, target_margin=margin, beam_size=beam,
                         **kw)
        assert [len(r) for r in rows] == [want, want], (margin, beam)
    # 17 tokens round up to 32, but padding stops at the context (24): 24 + 3
    assert [len(r) for r in translate(gd, params, [[5] * 17], max_new_tokens=60, target_margin=3, **kw)] == [27]


def test_misaligned_files_are_a_one_line_error(tmp_path):
    (tmp_path / "a.txt").write_text("eins\nzwei\ndrei\n")
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    from inproc import run
    out = run("train.py", "--config", "multi30k_de_en", "--data.source_file", str(tmp_path / "a.txt"),
              "--data.target_file", str(tmp_path / "b.txt"), "--train.run_dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "has 3 lines but" in out.stderr and "not aligned" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
