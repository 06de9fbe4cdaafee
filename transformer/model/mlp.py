"""The position-wise feed-forward layer of every block: ReLU / GELU, or SwiGLU with a fused gate + up projection,
with LoRA adapters beside its matrices when the config asks for them."""
from __future__ import annotations

import jax
from flax import nnx

from transformer.config import ModelConfig
from transformer.model.layers import ACTIVATIONS, bias_param, dense, kernel_init, param
from transformer.model.lora import adapters, add_delta, add_deltas, fold, with_dropout
from transformer.sharding import constrain


class MLP(nnx.Module):
    """Position-wise feed-forward: ReLU / GELU, or SwiGLU with a fused gate+up projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ff_dim
        self.activation = cfg.activation
        self.mm = cfg.matmul_dtype
        if self.activation == "swiglu":
            self.w_in_DCF = param(rngs, kernel_init(cfg, in_axis=0, out_axis=2, batch_axis=1), (D, 2, F),
                                  ("embed", None, "mlp"))
        else:
            self.w_in_DF = param(rngs, kernel_init(cfg), (D, F), ("embed", "mlp"))
        self.w_out_FD = param(rngs, kernel_init(cfg, residual=True), (F, D), ("mlp", "embed"))
        self.b_in_F = bias_param(rngs, (F,), ("mlp",)) if cfg.use_bias and self.activation != "swiglu" else None
        self.b_out_D = bias_param(rngs, (D,), ("embed",)) if cfg.use_bias else None
        self.lora = adapters(cfg, {"gate": (D, (F,), "embed", ("mlp",)), "up": (D, (F,), "embed", ("mlp",)),
                                   "down": (F, (D,), "mlp", ("embed",))}, rngs)

    def merge_lora(self) -> None:
        """Fold the adapters into the weights they adapt, and drop them."""
        for name, adapter in self.lora.items():
            if name == "down":
                fold(self.w_out_FD, adapter)
            elif self.activation == "swiglu":
                fold(self.w_in_DCF, adapter, ("gate", "up").index(name))
            else:
                fold(self.w_in_DF, adapter)
        self.lora = None

    def __call__(self, x_BTD, dropout_key=None):
        lora = with_dropout(self.lora, dropout_key)  # the key only drops the adapters' inputs out (lora_dropout)
        if self.activation == "swiglu":
            gate_up = add_deltas(dense(x_BTD, self.w_in_DCF[...], self.mm), x_BTD, lora, ("gate", "up"), axis=2)
            h_BTF = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        else:
            h_BTF = add_delta(dense(x_BTD, self.w_in_DF[...], self.mm), x_BTD, lora, "up")
            if self.b_in_F is not None:
                h_BTF = h_BTF + self.b_in_F[...].astype(h_BTF.dtype)
            h_BTF = ACTIVATIONS[self.activation](h_BTF)
        h_BTF = constrain(h_BTF, ("batch", "length", "act_mlp"))
        y_BTD = add_delta(dense(h_BTF, self.w_out_FD[...], self.mm), h_BTF, lora, "down")
        if self.b_out_D is not None:
            y_BTD = y_BTD + self.b_out_D[...].astype(y_BTD.dtype)
        return y_BTD
