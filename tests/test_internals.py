"""Looking inside models (transformer/infer/internals.py and python -m transformer.inspect): attention probabilities,
residual streams and the logit lens of all three families, embedding neighbours, token pieces, and the command's bad
inputs."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer.config import Config, MeshConfig, ModelConfig, OptimConfig
from transformer.infer import internals as ins
from transformer.infer.sampling import Sampler, generate
from transformer.model import attention as attention_module
from transformer.model import build_model

DEC = ModelConfig(vocab_size=31, d_model=24, n_heads=6, n_kv_heads=2, n_layers=3, max_len=13, positions="rotary",
                  norm="rmsnorm", activation="swiglu", tie_embeddings=False)
ENC = ModelConfig(arch="encoder", vocab_size=29, d_model=16, n_heads=2, n_layers=2, max_len=11, norm_position="post")
S2S = ModelConfig(arch="encoder_decoder", vocab_size=29, d_model=16, n_heads=2, n_layers=2, max_len=11,
                  positions="sinusoidal")


def split(cfg, seed=0):
    return nnx.split(build_model(cfg, nnx.Rngs(seed)), nnx.Param)


def ids(n, V, seed=0):
    return np.random.default_rng(seed).integers(1, V, n).tolist()


@pytest.mark.parametrize("cfg", [DEC, ENC, S2S], ids=["decoder", "encoder", "encoder_decoder"])
def test_attention_rows_are_distributions_and_the_lens_ends_at_the_logits(cfg):
    graphdef, params = split(cfg)
    src = ids(7, cfg.vocab_size, 1) if cfg.arch == "encoder_decoder" else None
    seen = ins.internals(graphdef, params, ids(9, cfg.vocab_size), src_S=src)
    L = cfg.n_layers
    assert seen.attention_LNTS.shape == (L, cfg.n_heads, 9, 9) and seen.residual_LTD.shape == (L + 1, 9, cfg.d_model)
    for probs in (seen.attention_LNTS, seen.cross_LNTS, seen.encoder_LNSS):
        if probs is not None:
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    if cfg.arch == "encoder_decoder":
        assert seen.cross_LNTS.shape == (L, cfg.n_heads, 9, 7) and seen.encoder_LNSS.shape == (L, cfg.n_heads, 7, 7)
    if cfg.arch != "encoder":  # causal: nothing above the diagonal, exactly
        above = np.triu(np.ones((9, 9), bool), 1)
        assert np.all(seen.attention_LNTS[:, :, above] == 0.0)
        assert np.all(seen.attention_LNTS[:, :, ~above] > 0.0)
    probs, top_ids = ins.logit_lens(graphdef, params, seen.residual_LTD, k=4)
    assert probs.shape == (L + 1, 9, 4)
    want = jax.nn.softmax(seen.logits_TV, axis=-1)
    want_p, want_i = jax.lax.top_k(want, 4)
    np.testing.assert_allclose(probs[-1], want_p, rtol=1e-5, atol=1e-6)  # the last layer of the lens is the output
    np.testing.assert_array_equal(top_ids[-1], want_i)
    assert not np.allclose(probs[0], probs[-1], rtol=0, atol=1e-6)  # the embeddings alone read differently


def test_internals_are_the_plain_forward():
    """Asking for the insides changes nothing: same logits as the plain call, and the layer outputs the residual
    stream records are the blocks' own outputs."""
    graphdef, params = split(DEC)
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray([ids(9, DEC.vocab_size)])
    seen = ins.internals(graphdef, params, tokens[0])
    np.testing.assert_allclose(seen.logits_TV, model(tokens)[0], rtol=1e-5, atol=1e-5)
    x = model.embed(tokens, jnp.float32)
    for i, block in enumerate(model.blocks):
        np.testing.assert_allclose(seen.residual_LTD[i], x[0], rtol=1e-5, atol=1e-5)
        x = block(x, mask_B1TS=attention_module.causal_mask(jnp.arange(9)[None], jnp.arange(9)[None]),
                  positions_BT=jnp.arange(9)[None])
    np.testing.assert_allclose(seen.residual_LTD[-1], x[0], rtol=1e-5, atol=1e-5)


def test_padding_keys_get_no_attention():
    for cfg in (ENC, S2S):
        model = build_model(cfg, nnx.Rngs(0))
        tokens = jnp.asarray([ids(8, cfg.vocab_size), ids(8, cfg.vocab_size, 2)])
        valid = jnp.asarray([[True] * 8, [True] * 5 + [False] * 3])
        if cfg.arch == "encoder":
            _, seen = model(tokens, valid_BT=valid, internals=True)
            parts = [seen["attention"]]
        else:
            _, seen = model(tokens, tokens[:, :6], src_valid_BS=valid, internals=True)
            parts = [seen["encoder_attention"], seen["cross_attention"]]
        for layers in parts:
            for probs_BNTS in layers:
                assert np.all(np.asarray(probs_BNTS)[1, :, :, 5:] == 0.0)
                assert np.all(np.asarray(probs_BNTS)[0] > 0.0)


def test_next_token_probabilities_are_what_the_sampler_draws_from():
    """generate() reports each sampled token's log-probability at temperature 1: it must be the log of what
    next_token_probs gives for that token after the same prefix."""
    graphdef, params = split(DEC, seed=3)
    prompt = ids(6, DEC.vocab_size, 4)
    probs = ins.next_token_probs(ins.internals(graphdef, params, prompt).logits_TV[-1])
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
    drawn = set()
    for seed in range(6):
        out = generate(graphdef, params, [prompt], max_new_tokens=1, max_len=DEC.max_len, sampler=Sampler(1.0),
                       key=jax.random.key(seed), logprobs=True)
        token, logprob = out.tokens[0][0], out.logprobs[0][0]
        np.testing.assert_allclose(logprob, math.log(probs[token]), atol=1e-4)
        drawn.add(token)
    greedy = generate(graphdef, params, [prompt], max_new_tokens=1, max_len=DEC.max_len, sampler=Sampler(0.0))
    assert greedy.tokens[0][0] == ins.top(probs, 1)[0][0]
    assert len(drawn) > 1  # sampled, not argmax


def test_an_embedding_is_its_own_nearest_neighbour_and_analogies_exclude_their_words():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float32) * rng.uniform(0.1, 5.0, (50, 1)).astype(np.float32)
    for i in (0, 7, 49):
        (nearest, cos), *_ = ins.cosine_neighbours(table, table[i], 3)
        assert nearest == i and cos == pytest.approx(1.0, abs=1e-5)
    # a planted analogy: d = c + (a - b) on unit vectors
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    table[3] = unit[10] - unit[11] + unit[12]
    best = ins.cosine_neighbours(table, ins.analogy_vector(table, 10, 11, 12), 2, exclude=(10, 11, 12))
    assert best[0][0] == 3 and {10, 11, 12}.isdisjoint(i for i, _ in best)


def test_the_training_step_compiles_to_the_same_program():
    """The insides are extra outputs of an opt-in path: the training step's program is the one a textbook attention
    (scores, mask, softmax, weighted values, written here without any of that plumbing) gives."""
    from transformer import sharding
    from transformer.train import build_state
    from transformer.train.step import make_steps

    cfg = Config(model=DEC, optim=OptimConfig(warmup_steps=1), preset="tiny").validate()
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])

    def program():
        graphdef, tx, _, shardings, create = build_state(cfg, mesh)
        train_step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
        state = create()
        batch = {"inputs": jnp.ones((1, 2, 13), jnp.int32), "targets": jnp.ones((1, 2, 13), jnp.int32)}
        return train_step.lower(state, batch).as_text()

    def textbook(self, q_BTNH, k_BKHS, v_BKSH, mask_B1TS, dropout_key, weights, lora=None):
        B, T, N, H = q_BTNH.shape
        K = k_BKHS.shape[1]
        G = N // K
        q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
        s_BKMS = jnp.einsum("BKMH,BKHS->BKMS", q_BKMH, k_BKHS, preferred_element_type=jnp.float32)
        s_BKGTS = s_BKMS.reshape(B, K, G, T, -1) * (1.0 / math.sqrt(H))
        s_BKGTS = s_BKGTS if mask_B1TS is None else jnp.where(mask_B1TS[:, :, None], s_BKGTS, attention_module.NEG_INF)
        probs_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
        S = k_BKHS.shape[-1]
        p_BKMS = probs_BKGTS.astype(v_BKSH.dtype).reshape(B, K, G * T, S)
        out_BKMH = 0.0 + jnp.einsum("BKMS,BKSH->BKMH", p_BKMS, v_BKSH)
        return self._project_out(out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H), lora)

    ours = program()
    original = attention_module.Attention._attend_full
    attention_module.Attention._attend_full = textbook
    try:
        plain = program()
    finally:
        attention_module.Attention._attend_full = original
    assert ours == plain


# --- token pieces ---------------------------------------------------------------------------------------------------

def test_pieces_show_spaces_and_the_bytes_of_split_characters():
    from transformer.data.tokenizer import CharTokenizer, HFTokenizer, SentencePieceTokenizer

    ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "tiny_decoders_reference.npz"))
    tok = HFTokenizer(str(ref["tokenizer"]))  # byte-level BPE
    pieces = [tok.piece(i) for i in tok.encode("the cat 😀").tolist()]
    assert "\u2423cat" in pieces  # the space belongs to the token after it
    split = [p for p in pieces if "<0x" in p]
    assert len(split) > 1  # an emoji spans several tokens, each holding some of its bytes
    assert "".join(split).replace("\u2423", "") == "".join(f"<0x{b:02X}>" for b in "😀".encode())
    char = CharTokenizer("ab \n")
    assert [char.piece(i) for i in char.encode("a b\n").tolist()] == ["a", "\u2423", "b", "\u21b5"]
    sp = SentencePieceTokenizer.train("the cat sat on the mat\n" * 50, vocab_size=300)
    assert "<0xF0>" in [sp.piece(i) for i in sp.encode("😀").tolist()]  # byte fallback


# --- the command ----------------------------------------------------------------------------------------------------


def inspect_cli(*args):
    from inproc import run
    return run("-m", "transformer.inspect", *args)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from test_decoders import write_tiny

    ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "tiny_decoders_reference.npz"))
    return write_tiny(tmp_path_factory.mktemp("inspect") / "llama", ref, "llama")


def test_the_command_on_a_small_decoder(tiny_llama, tmp_path):
    png = tmp_path / "attention.png"
    out = inspect_cli("attention", "the cat sat on the mat", "--checkpoint", tiny_llama, "--layer", "1",
                      "--png", str(png))
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "head  0: first" in out.stdout and "previous" in out.stdout
    lens = inspect_cli("lens", "the cat sat", "--checkpoint", tiny_llama, "--png", str(tmp_path / "lens.png"))
    assert lens.returncode == 0, lens.stderr
    assert "output" in lens.stdout and (tmp_path / "lens.png").exists()
    nxt = inspect_cli("next", "the cat", "--checkpoint", tiny_llama, "--top", "3")
    assert nxt.returncode == 0, nxt.stderr
    probs = [float(line.split()[2]) for line in nxt.stdout.splitlines() if line[:4].strip() in {"1", "2", "3"}]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    toks = inspect_cli("tokens", "the cat 😀", "--checkpoint", tiny_llama)
    assert toks.returncode == 0 and "\u2423cat" in toks.stdout and "<0xF0>" in toks.stdout


@pytest.mark.parametrize("args, fragment", [
    (["attention", "the cat", "--layer", "7"], "--layer=7 is out of range"),
    (["attention", "the cat", "--head", "99"], "--head=99 is out of range"),
    (["neighbours", "zyxwvutsrq"], "is not one token"),
    (["analogy", "the", "cat", "zyxwvutsrq"], "splits into"),
    (["next", "   "], "the text is empty"),
    (["tokens", ""], "the text is empty"),
    (["next", "the", "--top", "0"], "--top=0"),
    (["lens", "the", "--checkpoint", "/nowhere"], "not found"),
])
def test_bad_inputs_are_one_line_errors(tiny_llama, args, fragment, capsys):
    from transformer.inspect import main

    if "--checkpoint" not in args:
        args = [*args, "--checkpoint", tiny_llama]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
