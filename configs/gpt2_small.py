"""GPT-2 small shape (124M parameters) for accelerator VMs: 12 layers, 12 heads, d_model 768, context 1024, a
~50k sentencepiece BPE vocabulary, bf16 activations, dropout 0, AdamW 6e-4 -> 6e-5 cosine, batch 0.5M tokens.

    python train.py --config gpt2_small --data.path <hub dataset or files> --data.tokenizer_model <sp .model>
"""


def overrides() -> dict:
    return {
        "model": {"n_layers": 12, "n_heads": 12, "d_model": 768, "max_len": 1024, "dtype": "bfloat16"},
        "data": {"tokenizer": "sentencepiece", "vocab_size": 50304, "val_fraction": 0.005},
        "optim": {"lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 2000, "b2": 0.95, "weight_decay": 0.1},
        "train": {"steps": 100_000, "batch_size": 64, "grad_accum": 8, "eval_interval": 1000, "eval_batches": 50,
                  "ckpt_interval": 1000, "log_interval": 20},
    }
