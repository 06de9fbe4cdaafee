"""A small BERT-style encoder pretrained with masked-LM on a CPU: 4 layers, 4 heads, d_model 128, blocks of 128
tokens framed as [CLS] text [SEP], a 2,000-piece sentencepiece vocabulary trained on the data, post-LayerNorm with
biases and a LayerNorm after the embeddings (BERT's layout), exact GELU, segment embeddings. Rotary rather than
BERT's learned positions: at this size, learned absolute positions sit for thousands of steps at the unigram loss
before attention finds the neighbouring tokens (measured), rotary ones get there in a few hundred.

    python train.py --config bert_mlm_tiny                 # the embedded corpus
    python sample.py --checkpoint runs/bert_mlm_tiny --fill-mask "The function returns a [MASK] object."
"""


def overrides() -> dict:
    return {
        "model": {"arch": "encoder", "n_layers": 4, "n_heads": 4, "d_model": 128, "max_len": 128,
                  "norm_position": "post", "use_bias": True, "embed_norm": True, "activation": "gelu_exact",
                  "positions": "rotary", "type_vocab_size": 2, "norm_eps": 1e-12, "dropout": 0.1},
        "data": {"tokenizer": "sentencepiece", "vocab_size": 2000, "val_fraction": 0.05},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "b2": 0.98, "weight_decay": 0.01},
        "train": {"steps": 2000, "batch_size": 32, "eval_interval": 250, "eval_batches": 20},
    }
