"""A small BERT-style encoder pretrained with masked-LM on a CPU: 4 layers, 4 heads, d_model 128, blocks of 128
tokens framed as [CLS] text [SEP], a 2,000-piece sentencepiece vocabulary trained on the data, post-LayerNorm with
biases and a LayerNorm after the embeddings (BERT's layout), exact GELU, segment embeddings. Rotary rather than
BERT's learned positions: at this size, learned absolute positions sit for thousands of steps at the unigram loss
before attention finds the neighbouring tokens (measured), rotary ones get there in a few hundred.

600 steps of 32 x 128 tokens (~2.5M tokens, ~17 passes over the 145k training tokens) at lr 2e-3: on a 2-core
AVX512-BF16 VM (one XLA device, bf16 matmul inputs) ~11.3k tokens/s, 3m45s end to end from a fresh clone. Val loss
2.44, 57% of the masked pieces right, against 4.79 for the unigram distribution. The old 2,000 steps at lr 1e-3 took
over 10 minutes; an 800-step run at lr 1e-3 was at 2.79 by step 400 (2.56 here) and ended at 2.50. A model this small
learns the corpus's local patterns ("Changed in version 3.8", a noun after "The") more than facts: "The [MASK]
statement exits a loop." gets "class" and "function", not "break".

    python train.py --config bert_mlm_tiny                 # the embedded corpus, ~4 minutes on 2 cores
    python sample.py --checkpoint runs/bert_mlm_tiny --fill-mask "Changed in [MASK] 3.8."    # 'version' 0.60
"""


def overrides() -> dict:
    return {
        "model": {"arch": "encoder", "n_layers": 4, "n_heads": 4, "d_model": 128, "max_len": 128,
                  "norm_position": "post", "use_bias": True, "embed_norm": True, "activation": "gelu_exact",
                  "positions": "rotary", "type_vocab_size": 2, "norm_eps": 1e-12, "dropout": 0.1},
        "data": {"tokenizer": "sentencepiece", "vocab_size": 2000, "val_fraction": 0.05},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 50, "b2": 0.98, "weight_decay": 0.01},
        "train": {"steps": 600, "batch_size": 32, "eval_interval": 200, "eval_batches": 20},
    }
