"""The original Transformer base model (Vaswani et al. 2017) for translation on accelerators: 6 + 6 layers,
d_model 512, 8 heads, FFN 2048, post-norm, sinusoidal positions, embeddings scaled by sqrt(d_model) and shared
between source, target and the output layer, Glorot-uniform weight matrices, dropout 0.1, label smoothing 0.1, Adam (0.9, 0.98, 1e-9) with 4,000
warmup steps then inverse-square-root decay, a shared 37k BPE vocabulary.

    python train.py --config transformer_base --data.path wmt14 --data.name de-en --data.val_split validation
"""


def overrides() -> dict:
    return {
        "model": {"arch": "encoder_decoder", "n_layers": 6, "n_decoder_layers": 6, "d_model": 512, "n_heads": 8, "init": "xavier",
                  "d_ff": 2048, "max_len": 256, "norm_position": "post", "positions": "sinusoidal",
                  "scale_embeddings": True, "tie_embeddings": True, "activation": "relu", "use_bias": True,
                  "dropout": 0.1, "dtype": "bfloat16"},
        "data": {"tokenizer": "sentencepiece", "vocab_size": 37000, "sp_model_type": "bpe"},
        "optim": {"lr": 7e-4, "schedule": "inverse_sqrt", "warmup_steps": 4000, "b1": 0.9, "b2": 0.98, "eps": 1e-9,
                  "weight_decay": 0.0, "grad_clip": 0.0, "label_smoothing": 0.1},
        "train": {"steps": 100_000, "batch_size": 256, "eval_interval": 2000, "eval_batches": 20,
                  "ckpt_interval": 2000, "sample_tokens": 0},
    }
