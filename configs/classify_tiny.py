"""Fine-tune a small encoder for text classification: [CLS] text [SEP] -> pooler -> labels, accuracy at each eval.
The data is a .csv / .jsonl / .parquet file (or hub dataset) with a text and a label column; without validation
data a seeded 10% of the examples is held out. Usually started from an MLM run, whose model config, tokenizer and
weights it takes (the classifier head starts fresh):

    python train.py --config bert_mlm_tiny --data.path reviews.txt --train.run_dir runs/mlm
    python train.py --config classify_tiny --data.path reviews.csv --train.init_from runs/mlm
    python sample.py --checkpoint runs/classify_tiny --classify "a wonderful, moving film"

Without --train.init_from it trains the same shape from scratch (tokenizer trained on the texts).
"""


def overrides() -> dict:
    return {
        "model": {"arch": "encoder", "n_layers": 4, "n_heads": 4, "d_model": 128, "max_len": 128,
                  "norm_position": "post", "use_bias": True, "embed_norm": True, "activation": "gelu_exact",
                  "positions": "rotary", "type_vocab_size": 2, "norm_eps": 1e-12, "dropout": 0.1},
        "data": {"tokenizer": "sentencepiece", "vocab_size": 2000, "val_fraction": 0.1},
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 50, "b2": 0.98, "weight_decay": 0.01},
        "train": {"task": "classify", "steps": 500, "batch_size": 32, "eval_interval": 100, "eval_batches": 20,
                  "sample_tokens": 0},
    }
