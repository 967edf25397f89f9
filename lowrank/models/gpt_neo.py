"""GPT-Neo as plain torch modules, with Hugging Face parameter names (docs/formats.md A).

GPT-2's block with separate q/k/v projections and unscaled attention, its layers alternating between
global attention (every earlier key) and local attention (the last `window_size` slots). Parameters are
named as in transformers' state dict (`transformer.h.0.attn.attention.q_proj.weight`, ...).
"""
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import is_count
from ..errors import ConfigError
from .activations import ACTIVATIONS
from .classification import SequenceClassifier
from .config import ModelConfig
from .decoder import CausalLM, DecoderModel
from .masks import attention_mask_for

ATTENTION_TYPES = ("global", "local")

# Checkpoint buffers from older transformers (causal or local mask, mask fill value): derived, not learned.
_IGNORED_KEY_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")


def expand_attention_types(attention_types) -> list:
    """transformers' nested form [[["global", "local"], 12]] -> one type per layer: ["global", "local"] * 12."""
    return [kind for kinds, repeats in attention_types for _ in range(repeats) for kind in kinds]


def check_attention_types(attention_types) -> None:
    """ConfigError unless attention_types is a list of [[types...], repeats] with types "global" or "local"."""
    for item in attention_types:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                and is_count(item[1], 0)):
            raise ConfigError(f"GPTNeoConfig: attention_types={attention_types!r}: expected a list of "
                              f"[[types...], repeats], e.g. [[['global', 'local'], 12]]")
        for kind in item[0]:
            if kind not in ATTENTION_TYPES:
                raise ConfigError(f"GPTNeoConfig: attention_types holds {kind!r}; an attention type is one of "
                                  f"{ATTENTION_TYPES}")


@dataclass
class GPTNeoConfig(ModelConfig):
    """transformers' GPTNeoConfig fields and defaults; `extra` keeps unknown config.json keys."""

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    attention_types: Optional[list] = None  # None: [[["global", "local"], 12]], as transformers
    num_heads: int = 16
    intermediate_size: Optional[int] = None  # None: 4 * hidden_size
    window_size: int = 256
    activation_function: str = "gelu_new"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 50256
    eos_token_id: Union[int, list, None] = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict)

    model_type = "gpt_neo"
    architecture = "GPTNeoForCausalLM"
    sizes = ("vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "num_heads",
             "intermediate_size", "window_size")
    rates = ("resid_dropout", "embed_dropout", "attention_dropout", "classifier_dropout")
    positive = ("layer_norm_epsilon",)
    non_negative = ("initializer_range",)
    derived = frozenset({"attention_layers"})

    def __post_init__(self):
        if self.attention_types is None:
            self.attention_types = [[["global", "local"], 12]]
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"GPTNeoConfig: hidden_size={self.hidden_size} is not divisible by "
                              f"num_heads={self.num_heads}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"GPTNeoConfig: activation_function={self.activation_function!r} "
                              f"is not one of {sorted(ACTIVATIONS)}")
        check_attention_types(self.attention_types)
        if len(self.attention_layers) != self.num_layers:
            raise ConfigError(f"GPTNeoConfig: attention_types={self.attention_types!r} gives "
                              f"{len(self.attention_layers)} layers (attention_layers), num_layers={self.num_layers}")

    @property
    def attention_layers(self) -> list:
        """The attention type of each layer ("global" or "local"), as transformers expands attention_types."""
        return expand_attention_types(self.attention_types)

    def derived_fields(self) -> dict:
        return {"attention_layers": self.attention_layers}

    @classmethod
    def from_dict(cls, d, source="config"):
        """ModelConfig.from_dict, and a written attention_layers must be what attention_types expands to
        (transformers would use the written list; we refuse rather than guess)."""
        config = super().from_dict(d, source)
        if "attention_layers" in d and d["attention_layers"] != config.attention_layers:
            raise ConfigError(f"{source}: attention_layers={d['attention_layers']!r} is not what attention_types="
                              f"{config.attention_types!r} expands to ({config.attention_layers!r})")
        return config

    # transformers' attribute_map: the generic names, used by PEFT-style code that handles several models.
    num_attention_heads = property(lambda self: self.num_heads)
    num_hidden_layers = property(lambda self: self.num_layers)


class GPTNeoSelfAttention(nn.Module):
    """Multi-head attention without the 1/sqrt(head_dim) scale, computed in at least float32 (as
    transformers', which casts q and k to float32: unscaled 16-bit scores would lose precision)."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.layer_idx, self.num_heads = layer_idx, config.num_heads
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.q_proj = nn.Linear(C, C, bias=False)
        self.out_proj = nn.Linear(C, C)
        self.attention_dropout = config.attention_dropout
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x, attn_mask, is_causal, cache):
        """x: (B, T, C); attn_mask, is_causal: see `attention_mask_for`; cache: None or has update(layer, k, v)."""
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        compute = torch.promote_types(x.dtype, torch.float32)
        y = F.scaled_dot_product_attention(
            q.to(compute), k.to(compute), v.to(compute), attn_mask=attn_mask, is_causal=is_causal, scale=1.0,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y))


class GPTNeoAttention(nn.Module):
    """The layer's attention type and its self-attention (transformers' `attn.attention` nesting)."""

    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.attention_layers[layer_idx]
        self.attention = GPTNeoSelfAttention(config, layer_idx)

    def forward(self, x, masks: dict, cache):
        """masks: {attention type: (attn_mask, is_causal)}, built once per forward by GPTNeoModel."""
        return self.attention(x, *masks[self.attention_type], cache)


class GPTNeoMLP(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        inner = config.intermediate_size or 4 * config.hidden_size
        self.c_fc = nn.Linear(config.hidden_size, inner)
        self.c_proj = nn.Linear(inner, config.hidden_size)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPTNeoBlock(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTNeoAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTNeoMLP(config)

    def forward(self, x, masks, cache):
        x = x + self.attn(self.ln_1(x), masks, cache)
        return x + self.mlp(self.ln_2(x))


class GPTNeoModel(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embed_dropout)
        self.h = nn.ModuleList(GPTNeoBlock(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        # {attention type of some layer: its window}, None: every earlier key
        self.windows = {kind: config.window_size if kind == "local" else None for kind in set(config.attention_layers)}

    def forward(self, input_ids, inputs_embeds, position_ids, key_mask, cache, token_type_ids=None):
        """input_ids (B, T) or inputs_embeds (B, T, C); position_ids (B or 1, T); key_mask: None or
        (B, n_past + T), (B, L) with a StaticCache -> hidden states (B, T, C)."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        masks = {kind: attention_mask_for(cache, key_mask, x.size(1), x.device, window=window)
                 for kind, window in self.windows.items()}
        x = x + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)  # GPT-Neo, as GPT-2, reuses the token embedding for token types
        x = self.drop(x)
        for block in self.h:
            x = block(x, masks, cache)
        return self.ln_f(x)


class GPTNeoPreTrainedModel(DecoderModel):
    """GPT-Neo's stack and checkpoint names (its initialisation: DecoderModel's, transformers' generic one);
    the heads below add theirs."""

    config_class = GPTNeoConfig
    checkpoint_layers = {"num_layers": r"(?:transformer\.)?h\.(\d+)\."}  # models.loading.check_layer_count
    base_model_prefix = "transformer"
    body_class = GPTNeoModel
    embeddings_name = "wte"
    positions_field = "max_position_embeddings"
    ignored_key_suffixes = _IGNORED_KEY_SUFFIXES
    takes_token_type_ids = True

    def prefix_attention(self) -> tuple:
        """(layers, heads, head_dim) of the attention a learned prefix (prefix tuning) enters."""
        return self.config.num_layers, self.config.num_heads, self.config.hidden_size // self.config.num_heads


class GPTNeoForCausalLM(CausalLM, GPTNeoPreTrainedModel):
    """GPT-Neo with its language-model head (transformers' GPTNeoForCausalLM)."""


class GPTNeoForSequenceClassification(SequenceClassifier, GPTNeoPreTrainedModel):
    """GPT-Neo with a `score` head on the last real token (transformers' GPTNeoForSequenceClassification)."""
