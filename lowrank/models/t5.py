"""T5 (v1.0 and v1.1 / flan-t5) as plain torch.nn modules with Hugging Face parameter names.

Encoder-decoder transformer with pre-norm RMSNorm blocks, no absolute positions and a learned
relative-position bias shared by all layers of a stack (Raffel et al. 2020). The math follows
docs/formats.md section B; parameter names equal `T5ForConditionalGeneration`'s state-dict names.
"""
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .activations import ACTIVATIONS
from .cache import ConcatCache, KVCache, StaticCache, past_length, static_cache_len
from .config import ModelConfig
from .inputs import check_attention_mask, check_embeddings, check_inputs, check_mask, check_token_ids
from .masks import slots
from .outputs import ModelOutput
from .pretrained import PreTrainedModel


@dataclass
class T5Config(ModelConfig):
    """transformers' T5Config fields and defaults; `extra` keeps unknown config.json keys."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: Optional[bool] = None  # None: tie_word_embeddings (docs/formats.md B.5)
    is_encoder_decoder: bool = True
    use_cache: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: Optional[int] = None  # None: pad_token_id
    extra: dict = field(default_factory=dict, repr=False)

    model_type = "t5"
    architecture = "T5ForConditionalGeneration"
    sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
             "relative_attention_num_buckets", "relative_attention_max_distance")
    rates = ("dropout_rate",)
    positive = ("layer_norm_epsilon",)
    non_negative = ("initializer_factor",)
    derived = frozenset({"dense_act_fn", "is_gated_act"})

    def __post_init__(self):
        super().__post_init__()
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = bool(self.tie_word_embeddings)
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        if self.relative_attention_num_buckets < 4:  # half per direction, half of that exact, the rest log
            raise ConfigError(f"T5Config: relative_attention_num_buckets={self.relative_attention_num_buckets} "
                              f"must be >= 4")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ConfigError(f"T5Config: relative_attention_max_distance={self.relative_attention_max_distance} "
                              f"must exceed relative_attention_num_buckets // 4 = "
                              f"{self.relative_attention_num_buckets // 4} (the exact buckets)")
        for name in ("pad_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"T5Config: {name}={getattr(self, name)} is outside the vocabulary "
                                  f"[0, vocab_size={self.vocab_size})")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in ACTIVATIONS:
            raise ConfigError(f"T5Config: feed_forward_proj={self.feed_forward_proj!r}: expected ACT or 'gated-ACT' "
                              f"with ACT one of {sorted(ACTIVATIONS)}")

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # transformers maps "gated-gelu" to the tanh approximation, plain "gelu" to exact erf
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    def derived_fields(self) -> dict:
        return {"dense_act_fn": self.dense_act_fn, "is_gated_act": self.is_gated_act}


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """Mesh-TF bucket of `key_pos - query_pos` (any LongTensor shape): exact below num_buckets/2
    (per direction), logarithmic up to max_distance, then clamped. Float32 log, truncated, as HF."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = -relative_position.clamp(max=0)  # future keys fall in bucket 0; the causal mask hides them
    max_exact = num_buckets // 2
    log_ratio = torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """RMSNorm without mean subtraction or bias; the variance is taken in fp32 whatever the dtype."""

    def __init__(self, d_model, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d_kv) (the init absorbs it). Block 0 of each stack
    also owns the relative-position bias table that every block of that stack reuses."""

    def __init__(self, config, has_relative_attention_bias=False, is_decoder=False):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.n_heads, self.d_kv, self.is_decoder = config.num_heads, config.d_kv, is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.dropout = config.dropout_rate
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.n_heads)

    def compute_bias(self, query_pos, key_pos):
        """query_pos: (Tq,), key_pos: (Tk,) LongTensors -> bias (1, H, Tq, Tk)."""
        bucket = relative_position_bucket(key_pos[None, :] - query_pos[:, None], not self.is_decoder,
                                          self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def _heads(self, x):  # (B, T, H*d_kv) -> (B, H, T, d_kv)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def project_kv(self, x):
        """x: (B, Tk, d_model) -> k, v: (B, H, Tk, d_kv)."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(self, x, k, v, bias):
        """x: (B, Tq, d_model); k, v: (B, H, Tk, d_kv); bias: additive, broadcast to (B, H, Tq, Tk)."""
        q = self._heads(self.q(x))
        scores = q @ k.transpose(-1, -2) + bias
        p = F.dropout(F.softmax(scores.float(), dim=-1).type_as(scores), self.dropout, self.training)
        o = (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.o(o)


class T5DenseReluDense(nn.Module):
    """FF: wo(act(wi x)) for v1.0, wo(act(wi_0 x) * wi_1 x) for gated v1.1."""

    def __init__(self, config):
        super().__init__()
        self.is_gated = config.is_gated_act
        if self.is_gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.dense_act_fn]
        self.dropout = config.dropout_rate

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.is_gated else self.act(self.wi(x))
        return self.wo(F.dropout(h, self.dropout, self.training))


def _sublayer(name, module, config):
    """A pre-norm residual sublayer holder, named like HF (`layer.{j}.<name>`, `layer.{j}.layer_norm`)."""
    holder = nn.Module()
    setattr(holder, name, module)
    holder.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
    return holder


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder only), feed-forward; each pre-norm and residual."""

    def __init__(self, config, is_decoder, has_relative_attention_bias):
        super().__init__()
        self.is_decoder, self.dropout = is_decoder, config.dropout_rate
        layers = [_sublayer("SelfAttention", T5Attention(config, has_relative_attention_bias, is_decoder), config)]
        if is_decoder:
            layers.append(_sublayer("EncDecAttention", T5Attention(config, is_decoder=True), config))
        layers.append(_sublayer("DenseReluDense", T5DenseReluDense(config), config))
        self.layer = nn.ModuleList(layers)

    def forward(self, x, self_bias, layer: int, cache=None, cross=None, cross_bias=None):
        """x: (B, T, d_model); cache: None or a models.cache cache that this layer's self K/V are appended to;
        cross: None (encoder) or this layer's cross K/V of the encoder output, each (B, H, T_enc, d_kv)."""
        sa = self.layer[0]
        h = sa.layer_norm(x)
        k, v = sa.SelfAttention.project_kv(h)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        x = x + F.dropout(sa.SelfAttention(h, k, v, self_bias), self.dropout, self.training)
        if self.is_decoder:
            ca = self.layer[1]
            x = x + F.dropout(ca.EncDecAttention(ca.layer_norm(x), *cross, cross_bias), self.dropout, self.training)
        ff = self.layer[-1]
        return x + F.dropout(ff.DenseReluDense(ff.layer_norm(x)), self.dropout, self.training)


def _mask_keys(bias, key_mask):
    """bias: (1 or B, H or 1, Tq, Tk); key_mask: (B, Tk), 0 at padding -> bias with finfo.min there."""
    return bias.masked_fill(key_mask[:, None, None, :] == 0, torch.finfo(bias.dtype).min)


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention)."""

    def __init__(self, config, embed_tokens, is_decoder):
        super().__init__()
        self.embed_tokens, self.is_decoder, self.dropout = embed_tokens, is_decoder, config.dropout_rate
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, i == 0) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def cross_key_values(self, encoder_hidden_states, cross=None) -> list:
        """Per decoder layer, the cross-attention (k, v) of the encoder output (B, T_enc, d_model): cross[i]
        where given (not None), else projected here."""
        cross = cross or [None] * len(self.block)
        return [kv if kv is not None and kv[0] is not None else block.layer[1].EncDecAttention.project_kv(
            encoder_hidden_states) for block, kv in zip(self.block, cross)]

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, encoder_attention_mask=None,
                cache=None, cross=None):
        """Hidden states (B, T, d_model) after the final norm. The encoder takes input_ids or inputs_embeds and
        attention_mask (B, T). The decoder also takes cache (None, or a models.cache cache holding the self
        K/V of the T_past tokens before these, which it extends), cross (per layer the encoder output's
        (k, v): `cross_key_values`) and encoder_attention_mask (B, T_enc); attention_mask covers T_past + T
        keys."""
        names = ("decoder_input_ids", "decoder_inputs_embeds") if self.is_decoder else ("input_ids", "inputs_embeds")
        B, T = check_inputs(input_ids, inputs_embeds, self.embed_tokens.num_embeddings,
                            self.embed_tokens.embedding_dim, names)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        query_pos, key_pos = slots(cache, T, x.device)
        n_past = key_pos.size(0) - T  # a StaticCache's slots after these count too
        mask_name = "decoder_attention_mask" if self.is_decoder else "attention_mask"
        check_attention_mask(attention_mask, mask_name, (B, n_past + T), f"batch, {n_past} past + {T} new tokens")
        bias = self.block[0].layer[0].SelfAttention.compute_bias(query_pos, key_pos).to(x.dtype)
        if self.is_decoder:
            bias = bias.masked_fill(key_pos[None, :] > query_pos[:, None], torch.finfo(x.dtype).min)
        if attention_mask is not None:
            bias = _mask_keys(bias, attention_mask)
        cross_bias = 0.0
        if self.is_decoder:
            if cross[0][0].shape[0] != B:
                raise ValueError(f"encoder_outputs (or input_ids) have batch {cross[0][0].shape[0]}, the decoder "
                                 f"inputs (decoder_input_ids or labels) {B}")
            check_mask(encoder_attention_mask, "attention_mask", (B, cross[0][0].shape[2]), "batch, encoder tokens")
            if encoder_attention_mask is not None:
                cross_bias = _mask_keys(x.new_zeros(1, 1, 1, encoder_attention_mask.shape[1]), encoder_attention_mask)
        x = F.dropout(x, self.dropout, self.training)
        for i, block in enumerate(self.block):
            x = block(x, bias, i, cache, cross[i] if self.is_decoder else None, cross_bias)
        return F.dropout(self.final_layer_norm(x), self.dropout, self.training)


def padded_encoder_keys(cross: list, attention_mask, length: int) -> tuple:
    """Per layer the cross (k, v), each (B, H, T_enc, d_kv), and attention_mask (B, T_enc) or None, padded
    with masked keys to `length`: (cross, mask (B, length)). A masked key gets exactly zero weight, and
    encoder inputs of other lengths then give a compiled decode step the same shapes."""
    k = cross[0][0]
    mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.long, device=k.device) if attention_mask is None \
        else attention_mask
    pad = length - k.shape[2]
    return [tuple(F.pad(t, (0, 0, 0, pad)) for t in kv) for kv in cross], F.pad(mask, (0, pad))


@dataclass
class T5Cache:
    """Generation state: the encoder attention_mask (B, T_enc) or None, per decoder layer the encoder output's
    cross-attention (k, v), computed once, and the decoder's self K/V (a models.cache.KVCache or StaticCache)."""

    attention_mask: Optional[torch.Tensor]
    cross: list
    self_attention: Union[KVCache, StaticCache]

    @property
    def past_key_values(self) -> list:
        """What a KVCache holds, in forward's layout: per layer (self_k, self_v, cross_k, cross_v), views."""
        n, cache = self.self_attention.length, self.self_attention
        return [(cache.k[i, :, :, :n], cache.v[i, :, :, :n], *kv) for i, kv in enumerate(self.cross)]


class T5ForConditionalGeneration(PreTrainedModel):
    """T5 with its LM head. One embedding Parameter is shared by `shared`, both stacks' `embed_tokens`
    and, when tied, `lm_head`, so state_dict() names equal transformers' in-memory names.

    past_key_values: a list over decoder layers of (self_k, self_v, cross_k, cross_v), each
    (B, H, T, d_kv) taken after the k/v projections. Self K/V may be longer than the decoder tokens
    seen so far (a learned prefix): new queries sit at positions T_past + i, keys at 0..T_past+T-1,
    and decoder_attention_mask, when given, covers all T_past + T keys. cross_k/cross_v may be None,
    and are then computed from the encoder output.
    """

    config_class = T5Config
    checkpoint_layers = {"num_layers": r"encoder\.block\.(\d+)\.",  # models.loading.check_layer_count
                         "num_decoder_layers": r"decoder\.block\.(\d+)\."}
    prefix_mask = "decoder_attention_mask"  # a learned prefix enters decoder self-attention only

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # transformers' init: the q std absorbs the missing 1/sqrt(d_kv) in attention
        c, f = self.config, self.config.initializer_factor
        if isinstance(m, T5LayerNorm):
            nn.init.constant_(m.weight, f)
        elif isinstance(m, T5Attention):
            nn.init.normal_(m.q.weight, std=f * (c.d_model * c.d_kv) ** -0.5)
            for w in (m.k, m.v):
                nn.init.normal_(w.weight, std=f * c.d_model ** -0.5)
            nn.init.normal_(m.o.weight, std=f * (c.num_heads * c.d_kv) ** -0.5)
            if hasattr(m, "relative_attention_bias"):
                nn.init.normal_(m.relative_attention_bias.weight, std=f * c.d_model ** -0.5)
        elif isinstance(m, T5DenseReluDense):
            for wi in ([m.wi_0, m.wi_1] if m.is_gated else [m.wi]):
                nn.init.normal_(wi.weight, std=f * c.d_model ** -0.5)
            nn.init.normal_(m.wo.weight, std=f * c.d_ff ** -0.5)
        elif m is self.shared or m is self.lm_head:
            nn.init.normal_(m.weight, std=f)

    def _shift_right(self, labels):
        """(B, T) labels -> decoder inputs [start] + labels[:-1], with -100 replaced by pad."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, inputs_embeds=None, decoder_inputs_embeds=None, encoder_outputs=None,
                past_key_values=None, use_cache=False) -> ModelOutput:
        """input_ids/attention_mask: (B, T_enc); decoder_input_ids: (B, T); labels: (B, T), -100 ignored;
        encoder_outputs: (B, T_enc, d_model) to skip the encoder. Returns logits (B, T, V), loss
        (mean CE over labels != -100, no shift), past_key_values if use_cache, encoder_last_hidden_state."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, inputs_embeds, attention_mask)  # checks attention_mask
        else:
            check_embeddings(encoder_outputs, "encoder_outputs", self.config.d_model)
            check_attention_mask(attention_mask, "attention_mask", encoder_outputs.shape[:2], "batch, encoder tokens")
        if labels is not None:
            check_token_ids(labels, "labels", self.config.vocab_size, allowed=(-100,))
            given = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
            if isinstance(given, torch.Tensor):
                check_mask(labels, "labels", tuple(given.shape[:2]), "batch, sequence of the decoder inputs")
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        layers, c = self.config.num_decoder_layers, self.config
        past_length(past_key_values, layers, encoder_outputs.shape[0], c.num_heads, c.d_kv)
        cache = ConcatCache([kv[:2] for kv in past_key_values] if past_key_values else None, layers)
        cross = self.decoder.cross_key_values(encoder_outputs, [kv[2:] for kv in past_key_values or ()])
        y = self.decoder(decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask, attention_mask,
                         cache, cross)
        logits = self._logits(y)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                           ignore_index=-100)
        past = [(*kv, *ckv) for kv, ckv in zip(cache.layers, cross)] if use_cache else None
        return ModelOutput(logits=logits, loss=loss, past_key_values=past, encoder_last_hidden_state=encoder_outputs)

    def _logits(self, y):
        return self.lm_head(y * self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else y)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    # -- hooks for lowrank (see models/__init__) --

    def prefix_attention(self) -> tuple:
        """(layers, heads, head_dim) of the attention a learned prefix enters: decoder self-attention."""
        return self.config.num_decoder_layers, self.config.num_heads, self.config.d_kv

    @staticmethod
    def past_from_prefix(key_values: list) -> list:
        """Per decoder layer (k, v), each (B, H, P, d_kv) -> forward's past_key_values (cross K/V computed)."""
        return [(k, v, None, None) for k, v in key_values]

    # -- generation protocol (models/generate.py) --

    def generation_prefix(self, input_ids):
        """(B, T_enc, ...) -> (B, 1) LongTensor of decoder_start_token_id."""
        return torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id,
                          dtype=torch.long, device=input_ids.device)

    def prefill(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                cache_implementation="dynamic", max_new_tokens=0, max_cache_len=None):
        """Runs the encoder once on input_ids (B, T_enc) or inputs_embeds (B, T_enc, d_model), projects its
        cross K/V once, and runs the decoder on the start token -> (T5Cache, logits (B, V)).
        past_key_values: a learned decoder prefix in forward's layout (cross K/V may be None), which the start
        token and every later token attend to. cache_implementation "static": the decoder's self K/V in a
        StaticCache with room for max_new_tokens more (models.cache.static_cache_len)."""
        enc = self.encoder(input_ids, inputs_embeds, attention_mask)
        c, layers = self.config, self.config.num_decoder_layers
        P = past_length(past_key_values, layers, enc.shape[0], c.num_heads, c.d_kv)
        cross = self.decoder.cross_key_values(enc, [kv[2:] for kv in past_key_values or ()])
        if cache_implementation == "static":
            length = static_cache_len(P + 1 + max(max_new_tokens - 1, 0), max_cache_len)
            cache = StaticCache(layers, enc.shape[0], c.num_heads, c.d_kv, length, enc.dtype, enc.device)
            keys = static_cache_len(enc.shape[1], minimum=16)
            cross, attention_mask = padded_encoder_keys(cross, attention_mask, keys)
        else:
            cache = KVCache(layers, enc.shape[0], c.num_heads, c.d_kv, max(64, 2 * (P + 1)), enc.dtype, enc.device)
        cache.load(past_key_values)
        state = T5Cache(attention_mask, cross, cache)
        return state, self._decode(state, self.generation_prefix(enc))

    def decode_step(self, cache: T5Cache, tokens):
        """tokens: (B,) -> logits (B, V); one decoder step: appends to the self K/V, reuses the cross K/V."""
        return self._decode(cache, tokens[:, None])

    def _decode(self, state: T5Cache, tokens):
        """tokens (B, 1) -> next-token logits (B, V), the self K/V cache extended in place."""
        if isinstance(state.self_attention, KVCache):
            state.self_attention.reserve(1)
        y = self.decoder(tokens, attention_mask=None, encoder_attention_mask=state.attention_mask,
                         cache=state.self_attention, cross=state.cross)
        state.self_attention.advance(1)
        return self._logits(y[:, -1])

    # -- checkpoint hooks (models/loading.py) --

    @staticmethod
    def normalize_checkpoint(tensors: dict, config: T5Config) -> dict:
        """File keys -> state-dict keys (docs/formats.md B.2, B.5, G.2). The embedding is the first present of
        shared / encoder / decoder embed_tokens; lm_head is the file's if present, else the embedding.
        A tied config meeting a distinct lm_head is untied (config.tie_word_embeddings = False), as
        transformers does. Unknown keys pass through for the loader to report."""
        sd = dict(tensors)
        names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
        found = [sd.pop(k) for k in names if k in sd]
        if not found:
            raise ValueError(f"missing key: a T5 checkpoint needs one of {names}")
        emb = found[0]
        for k in [k for k in sd if k.endswith("EncDecAttention.relative_attention_bias.weight")]:
            del sd[k]  # legacy key that transformers ignores too
        lm_head = sd.pop("lm_head.weight", emb)
        if config.tie_word_embeddings and not (lm_head is emb or torch.equal(lm_head, emb)):
            config.tie_word_embeddings = False
        sd.update(dict.fromkeys(names, emb), **{"lm_head.weight": lm_head})
        return sd

    def checkpoint_state_dict(self) -> dict:
        """What transformers 5.x writes: only `shared.weight` of the tied copies; lm_head when untied."""
        tied = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
        if self.lm_head.weight is self.shared.weight:
            tied.append("lm_head.weight")
        return {k: v for k, v in self.state_dict().items() if k not in tied}
