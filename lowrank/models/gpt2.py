"""GPT-2 as plain torch modules, with Hugging Face parameter names (docs/formats.md A).

Parameters are named as in transformers' state dict (`transformer.h.0.attn.c_attn.weight`, ...),
so a checkpoint loads by name and a PEFT adapter key maps 1:1 onto a module.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .activations import ACTIVATIONS
from .classification import SequenceClassifier
from .config import ModelConfig
from .decoder import CausalLM, DecoderModel
from .masks import attention_mask_for


# Checkpoint buffers from older transformers (causal mask, mask fill value): derived, not learned.
_IGNORED_KEY_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")


@dataclass
class GPT2Config(ModelConfig):
    """transformers' GPT2Config fields and defaults; `extra` keeps unknown config.json keys."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    add_cross_attention: bool = False
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    extra: dict = field(default_factory=dict)

    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"
    sizes = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    rates = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    positive = ("layer_norm_epsilon",)
    non_negative = ("initializer_range",)

    def __post_init__(self):
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"GPT2Config: activation_function={self.activation_function!r} "
                              f"is not one of {sorted(ACTIVATIONS)}")
        if self.add_cross_attention:
            raise ConfigError("GPT2Config: add_cross_attention=True (GPT-2 with cross-attention) is not supported")

    # transformers' generic attribute names, used by PEFT-style code that handles several models.
    hidden_size = property(lambda self: self.n_embd)
    num_attention_heads = property(lambda self: self.n_head)
    num_hidden_layers = property(lambda self: self.n_layer)


class Conv1D(nn.Module):
    """y = x @ weight + bias, with weight stored (in_features, out_features) as in transformers' GPT-2.

    x: (..., in_features) -> (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.n_embd = layer_idx, config.n_head, config.n_embd
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.upcast = config.reorder_and_upcast_attn
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, attn_mask, is_causal, cache):
        """x: (B, T, C); attn_mask: see `attention_mask_for`; cache: None or has update(layer, k, v)."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_pdrop if self.training else 0.0,
        )
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Conv1D(config.n_embd, inner)
        self.c_proj = Conv1D(inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, attn_mask, is_causal, cache):
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, inputs_embeds, position_ids, key_mask, cache, token_type_ids=None):
        """input_ids (B, T) or inputs_embeds (B, T, C); position_ids (B or 1, T); key_mask: None or
        (B, n_past + T), (B, L) with a StaticCache -> hidden states (B, T, C)."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        attn_mask, is_causal = attention_mask_for(cache, key_mask, x.size(1), x.device)
        x = x + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)  # GPT-2 reuses the token embedding for token types
        x = self.drop(x)
        for block in self.h:
            x = block(x, attn_mask, is_causal, cache)
        return self.ln_f(x)


class GPT2PreTrainedModel(DecoderModel):
    """GPT-2's stack, initialisation and checkpoint names; the heads below add theirs."""

    config_class = GPT2Config
    checkpoint_layers = {"n_layer": r"(?:transformer\.)?h\.(\d+)\."}  # models.loading.check_layer_count
    base_model_prefix = "transformer"  # GPT2Model's keys are these without it (transformers' name)
    body_class = GPT2Model
    embeddings_name = "wte"
    positions_field = "n_positions"
    ignored_key_suffixes = _IGNORED_KEY_SUFFIXES
    takes_token_type_ids = True

    def _init_weights(self, module):
        """transformers' init: N(0, initializer_range), residual projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Embedding, nn.Linear, Conv1D)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, Conv1D):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, (GPT2Attention, GPT2MLP)):
            nn.init.normal_(module.c_proj.weight, std=std / math.sqrt(2 * self.config.n_layer))

    def prefix_attention(self) -> tuple:
        """(layers, heads, head_dim) of the attention a learned prefix (prefix tuning) enters."""
        return self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head


class GPT2LMHeadModel(CausalLM, GPT2PreTrainedModel):
    """GPT-2 with its language-model head (transformers' GPT2LMHeadModel)."""


class GPT2ForSequenceClassification(SequenceClassifier, GPT2PreTrainedModel):
    """GPT-2 with a `score` head on the last real token (transformers' GPT2ForSequenceClassification)."""
