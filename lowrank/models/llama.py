"""Llama, Qwen2 and Mistral as one set of plain torch modules, with Hugging Face parameter names.

The three are one architecture (transformers' modeling_qwen2 and modeling_mistral are generated from
modeling_llama): pre-norm blocks of RMSNorm (in fp32, then cast), grouped-query attention with rotary
embeddings (models.rope) and a SwiGLU MLP, a final RMSNorm and an optionally tied head. They differ in
which projections carry a bias and which layers attend through a sliding window, and each config says
that through two hooks, projection_biases() and layer_windows(); the modules read nothing else.

Configs: one dataclass per model_type on a shared base (LlamaFamilyConfig, the common fields), because
each model_type has its own config.json fields and defaults (Llama's attention_bias, mlp_bias,
pretraining_tp; Qwen2's use_sliding_window, max_window_layers, layer_types; Mistral's sliding_window)
and its CausalLM class loads through its own config_class; one class with model_type-specific defaults
would write fields into config.json that transformers' config of that type does not have. Every class
reads transformers 5's `rope_parameters` and the older `rope_scaling` + `rope_theta`, and writes
`rope_parameters`, as transformers 5.24 does.

Positions: RoPE has no table to run past, so there is no length limit (positions_field None), as in
transformers; max_position_embeddings is the pretraining length that dynamic scaling measures against.
Sliding windows are in cache slots, padding included, as transformers' masks (models.masks).
"""
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .activations import ACTIVATIONS
from .config import ModelConfig
from .decoder import CausalLM, DecoderModel
from .masks import attention_mask_for
from .rope import RotaryEmbedding, apply_rotary, check_rope_parameters

DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaFamilyConfig(ModelConfig):
    """The fields transformers' Llama, Qwen2 and Mistral configs share, with LlamaConfig's defaults;
    num_key_value_heads and head_dim default to num_attention_heads and hidden_size / num_attention_heads."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: Optional[dict] = None
    attention_dropout: float = 0.0
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, list]] = 2  # Llama 3 lists several
    extra: dict = field(default_factory=dict)

    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
    rates = ("attention_dropout",)
    positive = ("rms_norm_eps",)
    non_negative = ("initializer_range",)

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{name}: num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{name}: head_dim={self.head_dim} must be even (RoPE rotates channel pairs)")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{name}: hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.pad_token_id is not None and not -self.vocab_size <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"{name}: pad_token_id={self.pad_token_id} is outside the vocabulary "
                              f"[0, vocab_size={self.vocab_size})")
        if isinstance(self.eos_token_id, (list, tuple, set, frozenset)) and not (
                self.eos_token_id and all(isinstance(i, int) and not isinstance(i, bool) for i in self.eos_token_id)):
            raise ConfigError(f"{name}: eos_token_id={self.eos_token_id!r} must be a token id or a non-empty "
                              f"list of token ids")
        self._standardize_rope_parameters()
        check_rope_parameters(self.rope_parameters, self.head_dim, name)

    def _standardize_rope_parameters(self) -> None:
        """rope_parameters as transformers 5 writes them ({"rope_type", "rope_theta", ...}), from themselves or
        from the older config.json keys rope_scaling and rope_theta (which from_dict keeps in `extra`)."""
        extra = dict(self.extra)
        scaling, theta = extra.pop("rope_scaling", None), extra.pop("rope_theta", DEFAULT_ROPE_THETA)
        for key, value in (("rope_scaling", scaling), ("rope_parameters", self.rope_parameters)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{type(self).__name__}: {key}={value!r} must be an object or null")
        params = dict(scaling or self.rope_parameters or {})  # transformers: rope_scaling wins
        params.setdefault("rope_theta", theta)
        params.setdefault("rope_type", params.get("type", "default"))
        if params["rope_type"] == "llama3":
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        self.extra, self.rope_parameters = extra, params

    def projection_biases(self) -> tuple:
        """Whether (q/k/v_proj, o_proj, the MLP's projections) carry a bias."""
        return False, False, False

    def layer_windows(self) -> list:
        """Per layer: None (full causal attention) or its sliding window in tokens."""
        return [None] * self.num_hidden_layers


@dataclass
class LlamaConfig(LlamaFamilyConfig):
    """transformers' LlamaConfig fields and defaults; `extra` keeps unknown config.json keys."""

    attention_bias: bool = False
    mlp_bias: bool = False
    pretraining_tp: Optional[int] = 1  # kept for the round trip; transformers 5 no longer reads it

    model_type = "llama"
    architecture = "LlamaForCausalLM"

    def projection_biases(self) -> tuple:
        return self.attention_bias, self.attention_bias, self.mlp_bias


@dataclass
class Qwen2Config(LlamaFamilyConfig):
    """transformers' Qwen2Config fields and defaults. As there, sliding_window is None unless
    use_sliding_window, and layer_types defaults to sliding attention from layer max_window_layers on."""

    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: Optional[int] = 32
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 4096
    max_window_layers: int = 28
    layer_types: Optional[list] = None

    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    sizes = LlamaFamilyConfig.sizes + ("sliding_window",)
    non_negative = LlamaFamilyConfig.non_negative + ("max_window_layers",)

    def __post_init__(self):
        super().__post_init__()
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:
            self.layer_types = [LAYER_TYPES[self.sliding_window is not None and i >= self.max_window_layers]
                                for i in range(self.num_hidden_layers)]
        name = type(self).__name__
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ConfigError(f"{name}: layer_types={self.layer_types!r} must name one of {LAYER_TYPES} for each of "
                              f"the num_hidden_layers={self.num_hidden_layers} layers")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ConfigError(f"{name}: layer_types has 'sliding_attention' layers but sliding_window is None "
                              f"(use_sliding_window={self.use_sliding_window})")

    def projection_biases(self) -> tuple:
        return True, False, False

    def layer_windows(self) -> list:
        return [self.sliding_window if kind == "sliding_attention" else None for kind in self.layer_types]


@dataclass
class MistralConfig(LlamaFamilyConfig):
    """transformers' MistralConfig fields and defaults: every layer attends through sliding_window (None: all
    past tokens)."""

    intermediate_size: int = 14336
    num_key_value_heads: Optional[int] = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: Optional[int] = 4096

    model_type = "mistral"
    architecture = "MistralForCausalLM"
    sizes = LlamaFamilyConfig.sizes + ("sliding_window",)

    def layer_windows(self) -> list:
        return [self.sliding_window] * self.num_hidden_layers


class LlamaRMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight, as transformers.

    x: (..., C) -> (..., C).
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LlamaAttention(nn.Module):
    """Grouped-query attention: num_attention_heads query heads share num_key_value_heads key/value heads."""

    def __init__(self, config: LlamaFamilyConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, config.head_dim
        self.grouped = config.num_key_value_heads != config.num_attention_heads
        qkv_bias, o_bias, _ = config.projection_biases()
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=o_bias)
        self.attention_dropout = config.attention_dropout

    def forward(self, x, rotary, attn_mask, is_causal, cache):
        """x: (B, T, C); rotary: (cos, sin) of models.rope; attn_mask, is_causal: see `attention_mask_for`;
        cache: None or has update(layer, k, v), holding rotated keys (B, H_kv, T, head_dim)."""
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.grouped,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    """SwiGLU: down_proj(act(gate_proj(x)) * up_proj(x)); x: (..., C) -> (..., C)."""

    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        bias = config.projection_biases()[2]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaFamilyConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, rotary, attn_mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), rotary, attn_mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
        self.windows = config.layer_windows()

    def forward(self, input_ids, inputs_embeds, position_ids, key_mask, cache):
        """input_ids (B, T) or inputs_embeds (B, T, C); position_ids (B or 1, T), the rotary positions;
        key_mask: None or (B, n_past + T), (B, L) with a StaticCache -> hidden states (B, T, C)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        masks = {w: attention_mask_for(cache, key_mask, x.size(1), x.device, window=w) for w in set(self.windows)}
        rotary = self.rotary_emb(position_ids, x.dtype)
        for layer, window in zip(self.layers, self.windows):
            x = layer(x, rotary, *masks[window], cache)
        return self.norm(x)


class LlamaPreTrainedModel(DecoderModel):
    """The family's stack, initialisation and checkpoint names; the heads below add theirs."""

    config_class = LlamaConfig
    checkpoint_layers = {"num_hidden_layers": r"(?:model\.)?layers\.(\d+)\."}  # models.loading.check_layer_count
    base_model_prefix = "model"
    body_class = LlamaModel
    embeddings_name = "embed_tokens"
    ignored_key_suffixes = (".rotary_emb.inv_freq",)  # older transformers saved the derived frequencies

    def _init_weights(self, module):
        """transformers' init: DecoderModel's generic one, and the padding token's embedding 0, RMSNorm weights 1."""
        super()._init_weights(module)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)

    def prefix_attention(self) -> tuple:
        """(layers, key/value heads, head_dim): the cache and a learned prefix hold un-expanded GQA keys."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim


class Qwen2PreTrainedModel(LlamaPreTrainedModel):
    config_class = Qwen2Config


class MistralPreTrainedModel(LlamaPreTrainedModel):
    config_class = MistralConfig


class LlamaForCausalLM(CausalLM, LlamaPreTrainedModel):
    """Llama with its language-model head (transformers' LlamaForCausalLM)."""


class Qwen2ForCausalLM(CausalLM, Qwen2PreTrainedModel):
    """Qwen2 with its language-model head (transformers' Qwen2ForCausalLM)."""


class MistralForCausalLM(CausalLM, MistralPreTrainedModel):
    """Mistral with its language-model head (transformers' MistralForCausalLM)."""
