"""A small encoder-decoder for Multi30k German -> English sized for a 2-core CPU: 3 + 3 layers, d_model 256,
4 heads, FFN 1024, pre-norm, sinusoidal positions with embeddings scaled by sqrt(d_model), one shared 8k BPE
vocabulary tied to the output layer, Glorot-uniform weight matrices (as the original Transformer and torch's
nn.Transformer: at step 200 val loss 4.48 against 4.96 with GPT-2's normal(0.02)), dropout 0.1, label smoothing 0.1, AdamW with warmup then inverse-square-root
decay, batches of about 4,096 padded tokens in a handful of length buckets, a moving average of the weights for
evaluation and decoding, and bf16 matmul inputs. --mesh.cpu_devices=2 splits a CPU host into two XLA devices that
each train on half of every batch (2-9% faster steps on a 2-core machine) at the risk described in platform.py.

    python train.py --config multi30k_de_en \\
      --data.source_file ../shared/data/multi30k/train.de --data.target_file ../shared/data/multi30k/train.en \\
      --data.val_source_file ../shared/data/multi30k/val.de --data.val_target_file ../shared/data/multi30k/val.en
"""


def overrides() -> dict:
    return {
        "model": {"arch": "encoder_decoder", "n_layers": 3, "n_decoder_layers": 3, "d_model": 256, "n_heads": 4,
                  "d_ff": 1024, "max_len": 64, "norm_position": "pre", "positions": "sinusoidal",
                  "scale_embeddings": True, "tie_embeddings": True, "activation": "relu", "dropout": 0.1,
                  "matmul_dtype": "bfloat16", "init": "xavier"},
        "data": {"tokenizer": "sentencepiece", "vocab_size": 8000, "sp_model_type": "bpe",
                 "source_lang": "de", "target_lang": "en"},
        "optim": {"lr": 1e-3, "schedule": "inverse_sqrt", "warmup_steps": 300, "b2": 0.98, "weight_decay": 0.01,
                  "label_smoothing": 0.1, "ema_decay": 0.998},
        "train": {"steps": 20_000, "batch_size": 64, "batch_tokens": 4096, "eval_interval": 1000, "eval_batches": 16,
                  "sample_tokens": 0},
    }
