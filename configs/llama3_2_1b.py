"""Llama-3.2-1B shape (1.24B parameters) for accelerator VMs: 16 layers, d_model 2048, 32 query heads over 8 KV
heads, SwiGLU FFN 8192, RMSNorm, RoPE theta 500,000 with Llama 3's frequency scaling (factor 32), tied embeddings,
a 128,256-token byte-level BPE vocabulary. The layers are scanned (compile time stays flat in depth) and
rematerialised keeping the weight matmuls' outputs (attention recomputed), bf16 activations, 2,048-token context.
Train from scratch, or fine-tune the real model with --train.init_from <its Hugging Face directory or .gguf>.

    python train.py --config llama3_2_1b --data.path <hub dataset or files> --data.prepared=true --mesh.fsdp=8
"""


def overrides() -> dict:
    return {
        "model": {"n_layers": 16, "d_model": 2048, "n_heads": 32, "n_kv_heads": 8, "d_ff": 8192, "max_len": 2048,
                  "positions": "rotary", "rope_theta": 500_000.0, "rope_scaling": "llama3", "rope_factor": 32.0,
                  "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192,
                  "norm": "rmsnorm", "norm_eps": 1e-5, "activation": "swiglu", "tie_embeddings": True,
                  "dtype": "bfloat16", "scan_layers": True, "remat": "dots_no_batch"},
        "data": {"tokenizer": "bpe", "vocab_size": 128_256, "val_fraction": 0.005},
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 2000, "b2": 0.95, "weight_decay": 0.1},
        "train": {"steps": 100_000, "batch_size": 32, "grad_accum": 8, "eval_interval": 1000, "eval_batches": 50,
                  "ckpt_interval": 1000, "log_interval": 20, "sample_tokens": 0},
    }
