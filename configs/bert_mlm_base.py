"""BERT-base shape (110M parameters) masked-LM pretraining for accelerator VMs: 12 layers, 12 heads, d_model 768,
512-token blocks, a 30k sentencepiece vocabulary, post-LayerNorm, exact GELU, bf16 activations, AdamW 1e-4 with 10k
warmup steps (BERT's recipe), 256 x 512 tokens per step.

    python train.py --config bert_mlm_base --data.path <hub dataset or files>
"""


def overrides() -> dict:
    return {
        "model": {"arch": "encoder", "n_layers": 12, "n_heads": 12, "d_model": 768, "max_len": 512,
                  "norm_position": "post", "use_bias": True, "embed_norm": True, "activation": "gelu_exact",
                  "positions": "learned", "type_vocab_size": 2, "norm_eps": 1e-12, "dropout": 0.1,
                  "dtype": "bfloat16"},
        "data": {"tokenizer": "sentencepiece", "vocab_size": 30000, "val_fraction": 0.005},
        "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10_000, "b2": 0.999, "weight_decay": 0.01},
        "train": {"steps": 1_000_000, "batch_size": 256, "eval_interval": 2000, "eval_batches": 50,
                  "ckpt_interval": 2000},
    }
