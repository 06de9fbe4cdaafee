"""Typed, frozen configuration.

Dimension legend used in tensor names across the package (a suffix names the axes of a tensor, and einsum strings use
the same letters):

    B batch         T query length     S key / cache length    D model width
    N heads         K kv heads         H head dim              F feed-forward hidden
    V vocab         L layers           C fused-projection index (q, k, v)

A `Config` is built from defaults, a preset in `configs/` and command-line overrides (see `transformer/cli.py`);
`validate()` turns every inconsistent value into a `ConfigError` with a one-line message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """Bad user input: the CLIs print the message on one line and exit with code 2."""


def first_line(e: Exception) -> str:
    """The first line of an exception's message (or its type's name), for a one-line ConfigError."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass(frozen=True)
class ModelConfig:
    # GPT-style causal LM, BERT-style bidirectional encoder, or the original encoder-decoder (translation)
    arch: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    vocab_size: int = 0  # 0: taken from the tokenizer
    d_model: int = 128
    n_heads: int = 4
    # Grouped-query attention: keys and values have this many heads, each shared by n_heads / n_kv_heads query
    # heads (1: multi-query). 0: n_heads (plain multi-head attention).
    n_kv_heads: int = 0
    head_dim: int = 0  # 0: d_model / n_heads
    n_layers: int = 4  # the encoder's, for an encoder-decoder
    n_decoder_layers: int = 0  # encoder-decoder: 0 means n_layers
    scale_embeddings: bool = False  # multiply embeddings by sqrt(d_model) (the original Transformer)
    d_ff: int = 0  # 0: 4 * d_model
    max_len: int = 64  # context length (the block size)
    positions: Literal["learned", "sinusoidal", "rotary", "none"] = "learned"
    rope_theta: float = 10_000.0
    # Llama 3's rotary frequency scaling: wavelengths beyond original_max_len / low_freq_factor are stretched by
    # factor, those under original_max_len / high_freq_factor kept, the band between interpolated. "none": plain.
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    sliding_window: int = 0  # > 0: a token attends to at most this many most recent tokens, itself included (Mistral)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-5
    activation: Literal["gelu", "gelu_exact", "relu", "swiglu"] = "gelu"  # gelu: tanh approximation (GPT-2)
    use_bias: bool = False  # biases in every projection and LayerNorm
    qkv_bias: bool = False  # biases in the q, k and v projections only (Qwen2)
    dropout: float = 0.0
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"  # activations; logits stay float32
    # The weights the model computes with (and a checkpoint hands to inference). "bfloat16": the trained weights are
    # bf16; their float32 master copy, which the optimizer updates (an update under half of bf16's spacing, 0.2-0.4%
    # of the weight, would otherwise be lost), and AdamW's second moment stay float32 in the train state; the first
    # moment is bf16. The train state stays ~12 bytes per weight, and with bf16 activations XLA already casts float32
    # weights before gathering them, so training memory does not drop (llama3_2_1b, fsdp=8: state 1.73 GiB per
    # device either way, step temporaries 8.28 -> 8.43 GiB, benchmarks/scale.py); inference loads half the bytes.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Encoder (BERT) options: segment (token-type) embeddings, a norm right after the embeddings, a classifier.
    type_vocab_size: int = 0  # 0: no segment embeddings
    embed_norm: bool = False
    n_classes: int = 0  # > 0: a [CLS] classification head with this many labels
    # Inputs of the weight matmuls (forward and backward); they accumulate in float32 either way. "auto": bfloat16 on
    # a CPU that multiplies bf16 natively (AVX512-BF16 / AMX), float32 elsewhere, decided when train.py starts
    # (transformer/platform.py; a model built directly from an unresolved config runs float32).
    matmul_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Weight matrices: "gpt2" normal(0.02), residual-stream outputs scaled by 1/sqrt(2 * layers); "xavier" Glorot
    # uniform (the original Transformer), output layers and heads included. Embeddings and position tables keep
    # their own init.
    init: Literal["gpt2", "xavier"] = "gpt2"
    # LoRA: low-rank adapters (x A B * alpha / rank, B starting at zero) beside the named weight matrices of every
    # attention and MLP block; 0: none. Targets: q, k, v, o (attention, self and cross), gate, up, down (the MLP; gate
    # only with swiglu).
    # How the stack of blocks runs. scan_layers: the layers' weights stored stacked on a leading axis (checkpoints
    # too) and applied by a scan, so XLA compiles one block body and the optimizer one array per kind of weight:
    # compile time stops growing with depth (a run loads unrolled for inference; train.init_from starts a run in
    # either layout from the other). remat: what the backward pass recomputes instead of keeping: "none" keeps every
    # activation; "full" keeps only each block's input; "dots" keeps the matmul outputs; "dots_no_batch" keeps the
    # weight matmuls' outputs and recomputes attention's scores and probabilities (the T x T part of the memory).
    scan_layers: bool = False
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Full (uncached) attention: "xla" the einsum formula (keeps the T x S scores); "chunked" memory-efficient
    # attention in tiles of attention_chunk queries x keys (nothing T x S kept but the boolean mask; any backend);
    # "cudnn" cuDNN's fused flash attention (NVIDIA GPUs, bf16 activations, no dropout on attention probabilities).
    # Decoding with a KV cache uses the einsum formula.
    attention: Literal["xla", "chunked", "cudnn"] = "xla"
    attention_chunk: int = 512
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "all"  # or a comma-separated list; "all": every matrix the model has
    lora_dropout: float = 0.0  # dropout on each adapter's input while training (as PEFT's lora_dropout)

    @property
    def d_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        if self.lora_targets.strip() == "all":
            return tuple(self.lora_shapes())
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each matrix LoRA can adapt."""
        D, F, NH, KH = self.d_model, self.ff_dim, self.n_heads * self.d_head, self.kv_heads * self.d_head
        gate = {"gate": (D, F)} if self.activation == "swiglu" else {}
        return {"q": (D, NH), "k": (D, KH), "v": (D, KH), "o": (NH, D), **gate, "up": (D, F), "down": (F, D)}


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# How a run's layers execute, not what they compute: a run started from another (train.init_from) chooses its own.
RUN_CHOICES = ("scan_layers", "remat", "attention", "attention_chunk")


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # "" = embedded default corpus; a local file or glob, or a Hugging Face hub dataset name
    name: str = ""  # hub dataset config name
    split: str = "train"
    val_path: str = ""  # a separate validation file (or hub split via val_split)
    val_split: str = ""
    val_fraction: float = 0.1  # used when no validation data is given: the last fraction of the text
    text_column: str = "text"
    label_column: str = "label"  # classification runs
    # Translation: two aligned local text files (one sentence per line), or a hub dataset with a `translation`
    # column of {source_lang: ..., target_lang: ...} (data.path / data.split / data.val_split).
    source_file: str = ""
    target_file: str = ""
    val_source_file: str = ""
    val_target_file: str = ""
    source_lang: str = "de"
    target_lang: str = "en"
    tokenizer: Literal["char", "sentencepiece", "bpe"] = "char"  # bpe: byte-level (GPT-2's kind)
    tokenizer_model: str = ""  # a trained sentencepiece .model; "" trains one on the training split
    vocab_size: int = 4096  # sentencepiece vocabulary when training one
    sp_model_type: Literal["bpe", "unigram"] = "bpe"
    # Chat fine-tuning (train.task=sft): conversations packed several to a row of `pack_length` tokens, each attending
    # within itself (longer ones are cut to it; 0: the smallest length bucket that holds the longest conversation, at
    # least 256), or with pack=false one per row, padded to a length bucket
    pack: bool = True
    pack_length: int = 0
    # Language modelling at scale (data.prepared=true): documents streamed, tokenized by `workers` processes into
    # shards of ~`shard_tokens` tokens with an end-of-text token after each, in a cache under `cache_dir` ("": the
    # TRANSFORMER_CACHE variable, else ~/.cache/transformer) shared by every run of the same data and tokenizer, and
    # read through Grain. A tokenizer trained here learns from the first `tokenizer_sample_mb` MB of the training
    # text. With `segment_mask`, attention stays inside each document of a block and positions restart at each.
    prepared: bool = False
    cache_dir: str = ""
    workers: int = 1
    shard_tokens: int = 1 << 24
    tokenizer_sample_mb: float = 64.0
    segment_mask: bool = True


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    schedule: Literal["cosine", "constant", "inverse_sqrt"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # 0: train.steps
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0  # translation: 0.1 in the original Transformer
    # > 0: also keep an exponential moving average of the weights (e.g. 0.999); validation, BLEU, the checkpoint's
    # inference weights and sampling use the average. Early on the decay is min(ema_decay, (1 + step) / (10 + step)).
    ema_decay: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12  # rows per micro-batch (and per validation batch)
    batch_tokens: int = 0  # translation: > 0 fills each micro-batch with as many rows as fit this many padded tokens
    grad_accum: int = 1
    seed: int = 1337
    run_dir: str = ""  # "" = runs/<preset name>
    log_interval: int = 50
    eval_interval: int = 500
    eval_batches: int = 20
    ckpt_interval: int = 1000
    keep_checkpoints: int = 3
    peak_tflops: float = 0.0  # 0: looked up from the device kind (for MFU)
    progress: bool = True
    sample_tokens: int = 200  # after training, print a sample of this many tokens (0: none)
    bleu_beam: int = 4  # translation runs: sacreBLEU on the validation pairs at each evaluation with this beam
    bleu_sentences: int = 0  # how many validation pairs to translate for it (0: all; -1: no BLEU); sft: BLEU
    # of the greedy replies to this many validation conversations (0: none)
    task: Literal["", "lm", "mlm", "classify", "seq2seq", "sft"] = ""  # "": by model.arch (lm / mlm / seq2seq)
    init_from: str = ""  # a run dir (e.g. an MLM run) whose model config and weights start this run; new heads fresh


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all remaining devices
    fsdp: int = 1
    tensor: int = 1
    # CPU only: present the host as this many XLA devices (0: JAX's default, one). XLA:CPU spreads a small model's
    # ops over the cores poorly; one device per core running its share of the batch (mesh.data) uses them better.
    # -1 ("auto"): one device. The split is ~1.8x faster on a 2-core AVX512-BF16 host but XLA:CPU's in-process
    # all-reduce between the devices can hang or abort (measured, transformer/platform.py), so it is opt-in.
    cpu_devices: int = -1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    preset: str = "default"

    @property
    def lora_base(self) -> str:
        """The base model that a LoRA run's checkpoints leave out ("" when they hold every weight): adapters trained
        over `train.init_from` are saved alone, and the base is read from there again when the run loads."""
        return self.train.init_from if self.model.lora_rank and self.train.init_from else ""

    def validate(self) -> "Config":
        m, o, t, d = self.model, self.optim, self.train, self.data
        _positive(m, "d_model", "n_heads", "n_layers", "max_len")
        _positive(t, "steps", "batch_size", "grad_accum", "log_interval", "eval_interval", "eval_batches",
                  "ckpt_interval", "keep_checkpoints")
        need = {"lm": "decoder", "mlm": "encoder", "classify": "encoder", "seq2seq": "encoder_decoder",
                "sft": "decoder"}.get(t.task)
        if need and m.arch != need:
            raise ConfigError(f"train.task={t.task} needs model.arch={need}, got {m.arch}")
        if t.batch_tokens < 0 or (t.batch_tokens and (t.task or TASK_OF_ARCH[m.arch]) != "seq2seq"):
            raise ConfigError(f"train.batch_tokens={t.batch_tokens}: token-sized batches are for translation "
                              "(model.arch=encoder_decoder); use train.batch_size, or 0 to switch them off")
        if d.pack_length < 0:
            raise ConfigError(f"data.pack_length={d.pack_length} must be >= 0 (0: automatic)")
        _positive(d, "workers", "shard_tokens", "tokenizer_sample_mb")
        if d.prepared and (t.task or TASK_OF_ARCH[m.arch]) != "lm":
            raise ConfigError(f"data.prepared=true is for language modelling (train.task=lm), not {t.task or m.arch}")
        if self.mesh.cpu_devices < -1:
            raise ConfigError(f"mesh.cpu_devices={self.mesh.cpu_devices} must be >= -1 (-1: automatic, 0: JAX's "
                              "default of one)")
        if not 0.0 <= o.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay={o.ema_decay} must be in [0, 1) (0: no weight average)")
        if not 0.0 <= o.label_smoothing < 1.0:
            raise ConfigError(f"optim.label_smoothing={o.label_smoothing} must be in [0, 1)")
        if m.n_kv_heads < 0 or m.head_dim < 0 or m.sliding_window < 0:
            raise ConfigError("model.n_kv_heads, model.head_dim and model.sliding_window must be >= 0 (0: off / "
                              "automatic)")
        if m.attention_chunk < 1:
            raise ConfigError(f"model.attention_chunk={m.attention_chunk} must be >= 1")
        if m.attention == "cudnn" and m.dropout > 0:
            raise ConfigError(f"model.attention=cudnn has no dropout on attention probabilities (model.dropout="
                              f"{m.dropout}); set model.dropout=0 or use model.attention=xla or chunked")
        if m.n_heads % m.kv_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}: "
                              "each key/value head serves an equal group of query heads")
        if m.rope_scaling == "llama3" and not (m.rope_factor >= 1 and m.rope_high_freq_factor > m.rope_low_freq_factor
                                               and m.rope_original_max_len > 0):
            raise ConfigError("model.rope_scaling=llama3 needs rope_factor >= 1, rope_high_freq_factor > "
                              "rope_low_freq_factor and rope_original_max_len > 0")
        if not m.head_dim and m.d_model % m.n_heads:
            raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
                              "pick sizes so that d_head = d_model / n_heads is a whole number")
        if m.positions == "rotary" and m.d_head % 2:
            raise ConfigError(f"rotary positions need an even head dim, got d_head={m.d_head}")
        if m.d_ff < 0 or m.vocab_size < 0:
            raise ConfigError("model.d_ff and model.vocab_size must be >= 0 (0 means automatic)")
        if not 0.0 <= m.dropout < 1.0 or not 0.0 <= m.lora_dropout < 1.0:
            raise ConfigError(f"model.dropout={m.dropout} and model.lora_dropout={m.lora_dropout} must be in [0, 1)")
        if m.lora_rank and not t.init_from:  # with init_from, checked against that model (train/setup.py)
            check_lora(m)
        if o.lr <= 0 or o.min_lr < 0:
            raise ConfigError(f"optim.lr={o.lr} must be > 0 and optim.min_lr={o.min_lr} >= 0")
        if o.warmup_steps < 0 or o.decay_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
            raise ConfigError("optim.warmup_steps, decay_steps, weight_decay and grad_clip must be >= 0")
        if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
            raise ConfigError("optim.b1 and optim.b2 must be in [0, 1)")
        if not 0.0 < d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
        if d.vocab_size < 8:
            raise ConfigError(f"data.vocab_size={d.vocab_size} is too small for a sentencepiece vocabulary")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in d.items():
            if name not in sections:
                raise ConfigError(f"unknown config section {name!r}")
            sub = _SECTIONS.get(name)
            kwargs[name] = _build(sub, value) if sub else value
        return cls(**kwargs)


TASK_OF_ARCH = {"decoder": "lm", "encoder": "mlm", "encoder_decoder": "seq2seq"}
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
             "mesh": MeshConfig}


def _build(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {cls.__name__}")
    return cls(**values)


def check_lora(m: ModelConfig) -> None:
    """LoRA's settings against the model's matrices (a one-line ConfigError)."""
    names, shapes = m.lora_target_names, m.lora_shapes()
    if m.lora_rank < 0 or m.lora_alpha <= 0:
        raise ConfigError(f"model.lora_rank={m.lora_rank} must be >= 0 (0: no LoRA) and model.lora_alpha > 0")
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ConfigError(f"model.lora_targets={m.lora_targets!r}: {unknown[0] if unknown else 'nothing'!r} is not a "
                          f"matrix LoRA adapts (choose from {', '.join(LORA_TARGETS)})")
    missing = [t for t in names if t not in shapes]
    if missing:
        raise ConfigError(f"model.lora_targets names {missing[0]!r}, which this model does not have (its MLP is "
                          f"{m.activation}, without a gate); adaptable here: {', '.join(shapes)}")
    small = [t for t in names if m.lora_rank > min(shapes[t])]
    if small:
        rows, cols = shapes[small[0]]
        raise ConfigError(f"model.lora_rank={m.lora_rank} is larger than the {small[0]!r} matrix ({rows} x {cols}) "
                          f"allows; use at most {min(rows, cols)}")


def _positive(section, *names):
    for n in names:
        if getattr(section, n) <= 0:
            kind = {ModelConfig: "model", TrainConfig: "train", DataConfig: "data"}[type(section)]
            raise ConfigError(f"{kind}.{n}={getattr(section, n)} must be > 0")
