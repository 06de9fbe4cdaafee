"""How the stack of blocks runs (model.scan_layers, model.remat) never changes what it computes: the same loss and
gradients, with and without dropout, for all three families, the scanned model's gradients compared layer by layer
in the unrolled layout. A wrong layer order in the scan, a key given to the wrong layer or a policy that drops a
needed value shows up here."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import ModelConfig
from transformer.model import build_model
from transformer.model.stack import unstack_layers

BASE = dict(vocab_size=37, d_model=24, n_heads=2, n_layers=3, max_len=16, matmul_dtype="float32")
FAMILIES = {
    "decoder": ModelConfig(arch="decoder", positions="rotary", n_kv_heads=1, activation="swiglu", norm="rmsnorm",
                           **BASE),
    "encoder": ModelConfig(arch="encoder", type_vocab_size=2, embed_norm=True, norm_position="post", **BASE),
    "encoder_decoder": ModelConfig(arch="encoder_decoder", positions="sinusoidal", n_decoder_layers=2, **BASE),
}


def loss_and_grads(cfg: ModelConfig, dropout: bool):
    model = build_model(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 11)))
    key = jax.random.key(5) if dropout else None

    def loss(params):
        m = nnx.merge(graphdef, params)
        if cfg.arch == "decoder":
            out = m(tokens, dropout_key=key)
        elif cfg.arch == "encoder":
            out = m(tokens, valid_BT=tokens > 3, dropout_key=key)
        else:
            out = m(tokens, tokens[:, :7], src_valid_BS=tokens > 3, dropout_key=key)
        w = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), jnp.float32)
        return jnp.sum(out * w)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.leaves(unstack_layers(nnx.to_pure_dict(grads)))  # in the unrolled layout


VARIANTS = {  # every policy on the decoder; the scan, with a policy, on the other two (compiles are the test's time)
    "decoder": [dict(scan_layers=True), dict(remat="full"), dict(remat="dots"), dict(remat="dots_no_batch")],
    "encoder": [dict(scan_layers=True, remat="full")],
    "encoder_decoder": [dict(scan_layers=True, remat="dots_no_batch")],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_and_rematerialised_stacks_compute_the_same_loss_and_gradients(family):
    dropout = family != "encoder"  # with dropout too: each layer keeps its own key
    cfg = dataclasses.replace(FAMILIES[family], dropout=0.1 if dropout else 0.0)
    want_loss, want = loss_and_grads(cfg, dropout)
    for how in VARIANTS[family]:
        got_loss, got = loss_and_grads(dataclasses.replace(cfg, **how), dropout)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=str(how))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=str(how))


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_chunked_attention_in_the_model_gives_the_same_loss_and_gradients(family):
    cfg = FAMILIES[family]
    want_loss, want = loss_and_grads(cfg, False)
    got_loss, got = loss_and_grads(dataclasses.replace(cfg, attention="chunked", attention_chunk=4), False)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_runs_move_between_the_scanned_and_unrolled_layouts(tmp_path):
    """A run saved with its layers stacked loads unrolled (for inference) with the same logits, starts a new run in
    either layout (train.init_from), and refuses to resume in the other layout (one line)."""
    from transformer.cli import parse_args
    from transformer.config import ConfigError
    from transformer.infer.loading import load_run
    from transformer.train import train

    data = tmp_path / "text.txt"
    data.write_text("the cat sat on the mat. " * 200)

    def run(name, *extra):
        train(parse_args(["--data.path", str(data), "--train.run_dir", str(tmp_path / name), "--train.steps=2",
                          "--model.d_model=24", "--model.n_heads=2", "--model.n_layers=3", "--model.max_len=16",
                          "--train.batch_size=4", "--train.eval_interval=100", "--train.progress=false",
                          "--train.sample_tokens=0", "--mesh.data=1", *extra])[0])

    def logits(name):
        loaded = load_run(str(tmp_path / name))
        x = jnp.asarray(loaded.tokenizer.encode("the cat sat on")[None])
        return loaded.cfg.model.scan_layers, np.asarray(nnx.merge(loaded.graphdef, loaded.params)(x))

    run("unrolled")
    frozen = ["--optim.lr=1e-12", "--optim.min_lr=0", "--optim.weight_decay=0"]  # the weights stay as they came
    run("scanned", "--train.init_from", str(tmp_path / "unrolled"), "--model.scan_layers=true", *frozen)
    run("back", "--train.init_from", str(tmp_path / "scanned"), *frozen)
    want = logits("unrolled")[1]
    for name in ("scanned", "back"):
        scanned, got = logits(name)
        assert not scanned  # loaded for inference in the unrolled layout
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
    with pytest.raises(ConfigError, match="model.scan_layers=False, now True.*--train.init_from="):
        run("unrolled", "--train.steps=4", "--model.scan_layers=true")
