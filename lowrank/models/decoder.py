"""Decoder-only models once: the argument checks, caches, generation protocol, prefix hooks and checkpoint
rules that GPT-2, GPT-Neo, BLOOM and the Llama family share; a family supplies its stack and config.

A family's base class (e.g. models.gpt2.GPT2PreTrainedModel) subclasses DecoderModel and sets:

    config_class, checkpoint_layers     models.loading's hooks
    base_model_prefix, body_class       the stack, built as self.<base_model_prefix>: body_class(config), whose
                                        forward(input_ids, inputs_embeds, position_ids, key_mask, cache,
                                        token_type_ids) -> hidden states (B, T, C); key_mask: None (every key
                                        real) or (B, cache.length + T) bool
    embeddings_name                     the body's token embedding attribute ("wte")
    _init_weights(module)               transformers' initialisation of the family (default: its generic one)
    prefix_attention()                  (layers, key/value heads, head_dim) of its attention
    positions_field                     the config field of the most tokens a sequence may have
                                        ("n_positions"), or None (no limit)

and optionally ignored_key_suffixes (derived buffers in old checkpoints), uses_position_ids (False where
positions come from the mask alone, as BLOOM's ALiBi) and takes_token_type_ids. A head class (CausalLM here,
models.classification.SequenceClassifier) adds the head; a model is both: class
GPT2LMHeadModel(CausalLM, GPT2PreTrainedModel).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import ConcatCache, KVCache, StaticCache, past_length, static_cache_len
from .inputs import check_attention_mask, check_inputs, check_mask, check_positions, check_token_ids, key_mask_of
from .outputs import ModelOutput
from .pretrained import PreTrainedModel


class DecoderModel(PreTrainedModel):
    """A decoder stack (self.<base_model_prefix>) and one head (head_names: its top-level modules)."""

    body_class = None
    embeddings_name = None
    positions_field = None
    head_names = ()
    ignored_key_suffixes = ()
    uses_position_ids = True
    takes_token_type_ids = False
    prefix_mask = "attention_mask"  # the mask a learned prefix's keys extend

    def __init__(self, config):
        super().__init__()
        self.config = config
        setattr(self, self.base_model_prefix, self.body_class(config))
        self.build_head(config)
        self.apply(self._init_weights)

    def build_head(self, config) -> None:
        raise NotImplementedError

    def _init_weights(self, module) -> None:
        """transformers' PreTrainedModel._init_weights, which GPT-Neo and BLOOM keep: N(0, initializer_range)
        linear and embedding weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range or 0.02  # transformers reads 0 as unset
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def body(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self.body, self.embeddings_name)

    @property
    def max_positions(self):
        """The most tokens a sequence may have; None: no limit."""
        return getattr(self.config, self.positions_field) if self.positions_field else None

    @staticmethod
    def past_from_prefix(key_values: list) -> list:
        """Per layer (k, v), each (B, H_kv, P, head_dim) -> forward's past_key_values."""
        return list(key_values)

    def check_length(self, n_past: int, n_new: int) -> None:
        limit = self.max_positions
        if limit is not None and n_past + n_new > limit:
            raise ValueError(f"sequence of {n_past + n_new} tokens ({n_past} past + {n_new} new) is longer than "
                             f"{self.positions_field}={limit}")

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, use_cache=False, token_type_ids=None, labels_shape=None):
        """forward's arguments, checked (labels: see the head) -> (hidden states (B, T, C), cache or None).

        attention_mask (B, T_past + T), 1 = real token; position_ids (B or 1, T), default T_past + arange(T);
        past_key_values: one (k, v) per layer, each (B, H_kv, T_past, head_dim), keys as the layer's
        attention holds them (models.cache.ConcatCache).
        """
        c = self.config
        B, T = check_inputs(input_ids, inputs_embeds, c.vocab_size, c.hidden_size)
        if position_ids is not None and not self.uses_position_ids:
            raise ValueError(f"{type(self).__name__} takes no position_ids: its positions come from attention_mask")
        check_positions(position_ids, self.max_positions or 2 ** 62, B, T)
        if token_type_ids is not None:
            if not self.takes_token_type_ids:
                raise ValueError(f"{type(self).__name__} takes no token_type_ids")
            check_mask(token_type_ids, "token_type_ids", (B, T), "batch, sequence")
            check_token_ids(token_type_ids, "token_type_ids", c.vocab_size)
        if isinstance(past_key_values, (list, tuple)) and not past_key_values:
            past_key_values = None
        layers, heads, head_dim = self.prefix_attention()
        past_length(past_key_values, layers, B, heads, head_dim)
        cache = ConcatCache(past_key_values, layers) if use_cache or past_key_values is not None else None
        n_past = cache.length if cache is not None else 0
        self.check_length(n_past, T)
        device = self.get_input_embeddings().weight.device
        if position_ids is None:
            position_ids = torch.arange(n_past, n_past + T, device=device)[None]
        check_attention_mask(attention_mask, "attention_mask", (B, n_past + T),
                             f"batch, {n_past} past + {T} new tokens")
        key_mask = key_mask_of(attention_mask)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.body(input_ids, inputs_embeds, position_ids, key_mask, cache, **extra), cache

    # Checkpoint hooks used by models.loading.

    @classmethod
    def normalize_checkpoint(cls, tensors: dict, config) -> dict:
        """File keys (with or without the body's prefix, old derived buffers dropped) -> state-dict keys
        (docs/formats.md A.2, robust loader rule)."""
        prefix, out = cls.base_model_prefix + ".", {}
        for key, tensor in tensors.items():
            if key.endswith(cls.ignored_key_suffixes):
                continue
            name = key if key.split(".", 1)[0] in cls.head_names else prefix + key.removeprefix(prefix)
            if name in out:
                raise ValueError(f"key {key!r} is in the file with and without the {prefix!r} prefix")
            out[name] = tensor
        return cls.tie_head(out, config)

    @classmethod
    def tie_head(cls, state: dict, config) -> dict:
        return state

    def checkpoint_state_dict(self) -> dict:
        return self.state_dict()


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one; -100 ignored.

    The labels shift (padded with -100 at the end) rather than the logits: slicing (B, T, V) logits would copy
    them forward and zero-fill a full-size gradient backward."""
    next_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), next_labels.flatten(), ignore_index=-100)


class CausalLM(DecoderModel):
    """The language-model head `lm_head` (tied to the token embedding when config.tie_word_embeddings), the
    causal LM loss and KV-cache generation (models.generate's protocol)."""

    head_names = ("lm_head",)

    def build_head(self, config) -> None:
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=False, token_type_ids=None) -> ModelOutput:
        """input_ids (B, T) or inputs_embeds (B, T, C); labels (B, T) (see DecoderModel.hidden_states for the
        rest). Returns logits (B, T, V), loss, and the extended cache when use_cache."""
        if labels is not None:
            B, T = check_inputs(input_ids, inputs_embeds, self.config.vocab_size, self.config.hidden_size)
            check_mask(labels, "labels", (B, T), "batch, sequence")
            check_token_ids(labels, "labels", self.config.vocab_size, allowed=(-100,))
        x, cache = self.hidden_states(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                      use_cache, token_type_ids)
        logits = self.lm_head(x)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, past_key_values=cache.layers if use_cache else None)

    # Generation protocol used by models.generate (see there).

    def generation_prefix(self, input_ids):
        return input_ids

    def prefill(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None,
                cache_implementation="dynamic", max_new_tokens=0, max_cache_len=None):
        """input_ids (B, T) or inputs_embeds (B, T, C), left-padded where attention_mask is 0
        -> (KVCache or StaticCache, next-token logits (B, V)).

        past_key_values: a learned prefix that every token attends to, one (k, v) per layer, each
        (B, H_kv, P, head_dim) (forward's layout); attention_mask then covers P + T keys.
        Position ids count real keys only (cumsum(mask) - 1, clamped at 0), as transformers' generate does,
        so the tokens sit at positions P.. as in `forward`.
        cache_implementation "static": a StaticCache with room for max_new_tokens more (models.cache.
        static_cache_len; max_cache_len its length), the positions they need checked here, not per step.
        """
        c = self.config
        B, T = check_inputs(input_ids, inputs_embeds, c.vocab_size, c.hidden_size)
        layers, heads, head_dim = self.prefix_attention()
        P = past_length(past_key_values, layers, B, heads, head_dim)
        self.check_length(P, T)
        check_attention_mask(attention_mask, "attention_mask", (B, P + T), f"batch, {P} prefix + {T} new tokens")
        weight = self.lm_head.weight
        key_mask = key_mask_of(attention_mask)
        if key_mask is None:
            position_ids = torch.arange(P, P + T, device=weight.device).expand(B, T)
        else:
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        limit = self.max_positions
        if cache_implementation == "static":
            self.check_length(P + T, max(max_new_tokens - 1, 0))  # the last new token is never fed back
            length = static_cache_len(P + T + max(max_new_tokens - 1, 0), max_cache_len, limit)
            cache = StaticCache(layers, B, heads, head_dim, length, weight.dtype, weight.device, key_mask)
        else:
            capacity = max(64, 2 * (P + T)) if limit is None else min(limit, max(64, 2 * (P + T)))
            cache = KVCache(layers, B, heads, head_dim, capacity, weight.dtype, weight.device, key_mask,
                            max_length=limit)
        cache.load(past_key_values)
        x = self.body(input_ids, inputs_embeds, position_ids, cache.key_mask_for(T), cache)
        cache.advance(T, position_ids[:, -1] + 1)
        return cache, self.lm_head(x[:, -1])

    def decode_step(self, cache, tokens):
        """tokens (B,) -> next-token logits (B, V); appends to the cache (KVCache or StaticCache) in place.
        With a StaticCache it reads no Python number that changes per step: one compiled graph serves all."""
        if isinstance(cache, KVCache):  # a StaticCache's room was made and checked at prefill
            self.check_length(cache.length, 1)
            cache.reserve(1)
        x = self.body(tokens[:, None], None, cache.positions[:, None], cache.key_mask_for(1), cache)
        cache.advance(1, cache.positions + 1)
        return self.lm_head(x[:, -1])

    @classmethod
    def tie_head(cls, state: dict, config) -> dict:
        embeddings = f"{cls.base_model_prefix}.{cls.embeddings_name}.weight"
        if config.tie_word_embeddings and embeddings in state:
            state["lm_head.weight"] = state[embeddings]
        return state

    def checkpoint_state_dict(self) -> dict:
        """What save_pretrained writes: transformers' names, the tied lm_head omitted."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]
        return state
