"""BLOOM as plain torch modules, with Hugging Face parameter names (docs/formats.md A).

A pre-LayerNorm decoder (LayerNorm after the embedding too) whose attention has no position embedding:
ALiBi (Press et al., "Train Short, Test Long", 2022) adds slope_h * (position of the key) to head h's
scores, which under the softmax equals the paper's -slope_h * (query - key) distance. A key's position
is its index among the real tokens of its row, so left padding shifts nothing. Parameters are named as
in transformers' state dict (`transformer.h.0.self_attention.query_key_value.weight`, ...).
"""
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .activations import ACTIVATIONS
from .classification import SequenceClassifier
from .config import ModelConfig
from .decoder import CausalLM, DecoderModel
from .masks import attention_mask_for, slots

# transformers' bloom_gelu_forward is the tanh approximation, its sqrt(2/pi) rounded to 0.79788456.
bloom_gelu = ACTIVATIONS["gelu_pytorch_tanh"]

# Older config.json names of fields, as transformers reads them (its attribute_map and `n_embed`); where
# a file has both, the old name wins, as in transformers.
_FIELD_ALIASES = {"n_embed": "hidden_size", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


@dataclass
class BloomConfig(ModelConfig):
    """transformers' BloomConfig fields and defaults; `extra` keeps unknown config.json keys.

    pretraining_tp (the tensor-parallel degree BLOOM was trained with) changes nothing on its own; with
    slow_but_exact it is refused (see __post_init__).
    """

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, list, None] = 2
    pad_token_id: Optional[int] = None
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pretraining_tp: int = 1
    slow_but_exact: bool = False
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict)

    model_type = "bloom"
    architecture = "BloomForCausalLM"
    sizes = ("vocab_size", "hidden_size", "n_layer", "n_head", "pretraining_tp")
    rates = ("hidden_dropout", "attention_dropout")
    positive = ("layer_norm_epsilon",)
    non_negative = ("initializer_range",)

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.n_head:
            raise ConfigError(f"BloomConfig: hidden_size={self.hidden_size} is not divisible by n_head={self.n_head}")
        if self.slow_but_exact and self.pretraining_tp > 1:
            raise ConfigError(f"BloomConfig: slow_but_exact=True with pretraining_tp={self.pretraining_tp} is not "
                              "supported: transformers' slow_but_exact path drops the biases of self_attention.dense "
                              "and mlp.dense_4h_to_h; set slow_but_exact=false (pretraining_tp alone changes nothing)")

    @classmethod
    def from_dict(cls, d, source="config"):
        """ModelConfig.from_dict, reading the older names of fields (_FIELD_ALIASES) as transformers does."""
        if isinstance(d, dict):
            renamed = {name: d[old] for old, name in _FIELD_ALIASES.items() if old in d}
            d = {**{k: v for k, v in d.items() if k not in _FIELD_ALIASES}, **renamed}
        return super().from_dict(d, source)

    # transformers' attribute_map: the generic names, used by PEFT-style code that handles several models.
    num_attention_heads = property(lambda self: self.n_head)
    num_hidden_layers = property(lambda self: self.n_layer)


def alibi_slopes(n_head: int, device=None) -> torch.Tensor:
    """(n_head,) float32 ALiBi slopes, as transformers computes them: for the largest power of two m <= n_head,
    2^(-8i/m) for i = 1..m, then (for n_head > m) the odd-numbered slopes of 2m heads, 2^(-4i/m) for i = 1, 3, ..."""
    m = 2 ** math.floor(math.log2(n_head))
    powers = torch.arange(1, m + 1, device=device)
    odd_powers = torch.arange(1, 1 + 2 * (n_head - m), 2, device=device)
    base = lambda exponent: torch.tensor(2.0 ** exponent, dtype=torch.float32, device=device)
    return torch.cat([base(-8 / m) ** powers, base(-4 / m) ** odd_powers])


def key_positions(key_mask, key_slots) -> torch.Tensor:
    """(B or 1, n_keys): each key's index among the real keys of its row, 0 at padding ((cumsum(mask) - 1) *
    mask, as transformers' build_alibi_tensor); key_mask None: every key real, its slot (key_slots (n_keys,))."""
    if key_mask is None:
        return key_slots[None]
    mask = key_mask.long()
    return (mask.cumsum(-1) - 1) * mask


def alibi_attention_bias(cache, key_mask, n_new: int, n_head: int, dtype, device) -> torch.Tensor:
    """The float attn_mask of SDPA for n_new queries written to `cache` (models.masks.slots): slope_h * key
    position (rounded to dtype, as transformers' alibi tensor), finfo(dtype).min where attention_mask_for
    forbids the key.

    key_mask: None or (B, n_keys) bool. Returns (B or 1, n_head, 1 or n_new, n_keys).
    """
    query, key = slots(cache, n_new, device)
    positions = key_positions(key_mask, key)
    bias = (alibi_slopes(n_head, device)[:, None] * positions[:, None, :]).to(dtype)[:, :, None, :]
    allowed, is_causal = attention_mask_for(cache, key_mask, n_new, device)
    if is_causal:
        allowed = key <= query[:, None]
    return bias if allowed is None else bias.masked_fill(~allowed, torch.finfo(dtype).min)


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int):
        super().__init__()
        C = config.hidden_size
        self.layer_idx, self.n_head = layer_idx, config.n_head
        self.query_key_value = nn.Linear(C, 3 * C)
        self.dense = nn.Linear(C, C)
        self.attention_dropout = config.attention_dropout
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, bias, cache):
        """x: (B, T, C); bias: alibi_attention_bias; cache: None or has update(layer, k, v). -> (B, T, C)."""
        B, T, C = x.shape
        # Bloom's fused projection is laid out per head: (n_head, 3, head_dim), not (3, n_head, head_dim).
        q, k, v = self.query_key_value(x).view(B, T, self.n_head, 3, -1).transpose(1, 2).unbind(3)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        return self.hidden_dropout(self.dense(y.transpose(1, 2).reshape(B, T, C)))


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x):
        return self.hidden_dropout(self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x))))


class BloomBlock(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, x, bias, cache):
        """x: (B, T, C) -> (B, T, C). With apply_residual_connection_post_layernorm the residual stream
        carries each sublayer's normalised input instead of its raw input."""
        h = self.input_layernorm(x)
        x = (h if self.residual_after_norm else x) + self.self_attention(h, bias, cache)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_after_norm else x) + self.mlp(h)


class BloomModel(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        self.n_head = config.n_head
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, inputs_embeds, position_ids, key_mask, cache):
        """input_ids (B, T) or inputs_embeds (B, T, C); key_mask: None or (B, n_past + T), (B, L)
        with a StaticCache -> hidden states (B, T, C). position_ids are unused: ALiBi's positions come from key_mask."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.word_embeddings_layernorm(x)
        bias = alibi_attention_bias(cache, key_mask, x.size(1), self.n_head, x.dtype, x.device)
        for block in self.h:
            x = block(x, bias, cache)
        return self.ln_f(x)


class BloomPreTrainedModel(DecoderModel):
    """BLOOM's stack and checkpoint names (its initialisation: DecoderModel's, transformers' generic one);
    the heads below add theirs."""

    config_class = BloomConfig
    checkpoint_layers = {"n_layer": r"(?:transformer\.)?h\.(\d+)\."}  # models.loading.check_layer_count
    base_model_prefix = "transformer"  # the Hub's bigscience checkpoints hold BloomModel's keys, without it
    body_class = BloomModel
    embeddings_name = "word_embeddings"
    uses_position_ids = False

    def prefix_attention(self) -> tuple:
        """(layers, heads, head_dim) of the attention a learned prefix (prefix tuning) enters."""
        return self.config.n_layer, self.config.n_head, self.config.hidden_size // self.config.n_head


class BloomForCausalLM(CausalLM, BloomPreTrainedModel):
    """BLOOM with its language-model head, tied to the word embeddings (transformers' BloomForCausalLM)."""


class BloomForSequenceClassification(SequenceClassifier, BloomPreTrainedModel):
    """BLOOM with a `score` head on the last real token (transformers' BloomForSequenceClassification)."""
