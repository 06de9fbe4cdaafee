"""GPT-2 medium shape (355M parameters with GPT-2's 50,257-token vocabulary) for accelerator VMs: 24 layers,
16 heads, d_model 1024, context 1024, biases and LayerNorm as GPT-2, a byte-level BPE vocabulary, bf16
activations, layers scanned, dropout 0, AdamW 3e-4 -> 3e-5 cosine, batch 0.5M tokens.

    python train.py --config gpt2_medium --data.path <hub dataset or files> --data.prepared=true
"""


def overrides() -> dict:
    return {
        "model": {"n_layers": 24, "n_heads": 16, "d_model": 1024, "max_len": 1024, "use_bias": True,
                  "dtype": "bfloat16", "scan_layers": True},
        "data": {"tokenizer": "bpe", "vocab_size": 50257, "val_fraction": 0.005},
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2000, "b2": 0.95, "weight_decay": 0.1},
        "train": {"steps": 100_000, "batch_size": 32, "grad_accum": 16, "eval_interval": 1000, "eval_batches": 50,
                  "ckpt_interval": 1000, "log_interval": 20, "sample_tokens": 0},
    }
