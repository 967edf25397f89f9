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
from .cache import ConcatCache, KVCache, past_length
from .config import ModelConfig
from .inputs import check_attention_mask, check_inputs, check_mask, check_positions, check_token_ids
from .outputs import ModelOutput
from .pretrained import PreTrainedModel


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


def attention_mask_for(key_mask, n_new: int, n_keys: int, device):
    """The mask for n_new queries that follow n_keys - n_new cached keys: (attn_mask, is_causal) for SDPA.

    key_mask: None or (B, n_keys), nonzero for real tokens. Returns attn_mask None (with is_causal
    telling SDPA to build the plain causal mask itself) or bool, True = attend: (n_new, n_keys) without
    key_mask, else (B, 1, n_new, n_keys).
    A query always sees its own key, so a padding query never has an all-masked row (whose NaNs would
    reach real tokens through the next layer's values).
    """
    n_past = n_keys - n_new
    if key_mask is None and (n_past == 0 or n_new == 1):
        return None, n_past == 0 and n_new > 1
    query_pos = torch.arange(n_past, n_keys, device=device)[:, None]
    key_pos = torch.arange(n_keys, device=device)
    allowed = key_pos <= query_pos
    if key_mask is not None:
        allowed = (allowed & key_mask.bool()[:, None, None, :]) | (key_pos == query_pos)
    return allowed, False


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

    def forward(self, input_ids, position_ids, attn_mask, is_causal, cache, inputs_embeds=None, token_type_ids=None):
        """input_ids (B, T) or inputs_embeds (B, T, C); position_ids (B or 1, T) -> hidden states (B, T, C)."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = x + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)  # GPT-2 reuses the token embedding for token types
        x = self.drop(x)
        for block in self.h:
            x = block(x, attn_mask, is_causal, cache)
        return self.ln_f(x)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one; -100 ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class GPT2LMHeadModel(PreTrainedModel):
    config_class = GPT2Config
    checkpoint_layers = {"n_layer": r"(?:transformer\.)?h\.(\d+)\."}  # models.loading.check_layer_count
    base_model_prefix = "transformer"  # GPT2Model's keys are these without it (transformers' name)
    prefix_mask = "attention_mask"  # the mask a learned prefix's keys extend

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

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

    def _check_length(self, n_past: int, n_new: int):
        if n_past + n_new > self.config.n_positions:
            raise ValueError(
                f"sequence of {n_past + n_new} tokens ({n_past} past + {n_new} new) is longer than "
                f"n_positions={self.config.n_positions}"
            )

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=False, token_type_ids=None) -> ModelOutput:
        """input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, T_past + T), 1 = real token;
        position_ids (B, T), default T_past + arange(T); past_key_values: one (k, v) per layer, each
        (B, H, T_past, head_dim), before scaling (models.cache.ConcatCache);
        labels (B, T). Returns logits (B, T, V), loss, and the extended cache when use_cache."""
        c = self.config
        B, T = check_inputs(input_ids, inputs_embeds, c.vocab_size, c.n_embd)
        check_positions(position_ids, c.n_positions, B, T)
        for name, ids in (("token_type_ids", token_type_ids), ("labels", labels)):
            check_mask(ids, name, (B, T), "batch, sequence")
        if token_type_ids is not None:
            check_token_ids(token_type_ids, "token_type_ids", c.vocab_size)
        if labels is not None:
            check_token_ids(labels, "labels", c.vocab_size, allowed=(-100,))
        if isinstance(past_key_values, (list, tuple)) and not past_key_values:
            past_key_values = None
        past_length(past_key_values, c.n_layer, B, c.n_head, c.n_embd // c.n_head)
        cache = ConcatCache(past_key_values, c.n_layer) if use_cache or past_key_values is not None else None
        n_past = cache.length if cache is not None else 0
        self._check_length(n_past, T)
        device = self.lm_head.weight.device
        if position_ids is None:
            position_ids = torch.arange(n_past, n_past + T, device=device)[None]
        check_attention_mask(attention_mask, "attention_mask", (B, n_past + T),
                             f"batch, {n_past} past + {T} new tokens")
        if attention_mask is not None:
            if attention_mask.all():
                attention_mask = None  # lets SDPA take its fused causal path
        attn_mask, is_causal = attention_mask_for(attention_mask, T, n_past + T, device)
        x = self.transformer(input_ids, position_ids, attn_mask, is_causal, cache, inputs_embeds, token_type_ids)
        logits = self.lm_head(x)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, past_key_values=cache.layers if use_cache else None)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    # Hooks for lowrank (see models/__init__).

    @property
    def max_positions(self) -> int:
        """The most tokens a sequence may have."""
        return self.config.n_positions

    def prefix_attention(self) -> tuple:
        """(layers, heads, head_dim) of the attention a learned prefix (prefix tuning) enters."""
        return self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head

    @staticmethod
    def past_from_prefix(key_values: list) -> list:
        """Per layer (k, v), each (B, H, P, head_dim) -> forward's past_key_values."""
        return list(key_values)

    # Generation protocol used by models.generate (see there).

    def generation_prefix(self, input_ids):
        return input_ids

    def prefill(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None):
        """input_ids (B, T) or inputs_embeds (B, T, C), left-padded where attention_mask is 0
        -> (KVCache, next-token logits (B, V)).

        past_key_values: a learned prefix that every token attends to, one (k, v) per layer, each
        (B, H, P, head_dim) (forward's layout); attention_mask then covers P + T keys.
        Position ids count real keys only (cumsum(mask) - 1, clamped at 0), as transformers' generate does,
        so the tokens sit at positions P.. as in `forward`.
        """
        B, T = check_inputs(input_ids, inputs_embeds, self.config.vocab_size, self.config.n_embd)
        c = self.config
        P = past_length(past_key_values, c.n_layer, B, c.n_head, c.n_embd // c.n_head)
        self._check_length(P, T)
        check_attention_mask(attention_mask, "attention_mask", (B, P + T), f"batch, {P} prefix + {T} new tokens")
        weight = self.lm_head.weight
        key_mask = attention_mask if attention_mask is not None and not attention_mask.all() else None
        if key_mask is None:
            position_ids = torch.arange(P, P + T, device=weight.device).expand(B, T)
        else:
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        cache = KVCache(c.n_layer, B, c.n_head, c.n_embd // c.n_head, min(c.n_positions, max(64, 2 * (P + T))),
                        weight.dtype, weight.device, key_mask, max_length=c.n_positions)
        cache.load(past_key_values)
        attn_mask, is_causal = attention_mask_for(key_mask, T, P + T, weight.device)
        x = self.transformer(input_ids, position_ids, attn_mask, is_causal, cache, inputs_embeds)
        cache.advance(T, position_ids[:, -1] + 1)
        return cache, self.lm_head(x[:, -1])

    def decode_step(self, cache: KVCache, tokens):
        """tokens (B,) -> next-token logits (B, V); appends to the cache in place."""
        self._check_length(cache.length, 1)
        cache.reserve(1)
        key_mask = None if cache.key_mask is None else cache.key_mask[:, : cache.length + 1]
        attn_mask, _ = attention_mask_for(key_mask, 1, cache.length + 1, tokens.device)
        x = self.transformer(tokens[:, None], cache.positions[:, None], attn_mask, False, cache)
        cache.advance(1, cache.positions + 1)
        return self.lm_head(x[:, -1])

    # Checkpoint hooks used by models.loading.

    @staticmethod
    def normalize_checkpoint(tensors: dict, config: GPT2Config) -> dict:
        """File keys (with or without the `transformer.` prefix, old mask buffers, maybe no lm_head)
        -> this model's state-dict keys (docs/formats.md A.2, robust loader rule)."""
        out = {}
        for key, tensor in tensors.items():
            if key.endswith(_IGNORED_KEY_SUFFIXES):
                continue
            name = key if key == "lm_head.weight" else "transformer." + key.removeprefix("transformer.")
            if name in out:
                raise ValueError(f"key {key!r} is in the file with and without the 'transformer.' prefix")
            out[name] = tensor
        if config.tie_word_embeddings and "transformer.wte.weight" in out:
            out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def checkpoint_state_dict(self) -> dict:
        """What save_pretrained writes: transformers' names, the tied lm_head omitted."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]
        return state
