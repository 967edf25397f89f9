"""Soft prompts: prompt tuning, P-tuning and prefix tuning on GPT-2 and T5 (docs/formats.md D, E, F).

A soft prompt is one tensor, `prompt_shape(config)`:
    prompt tuning, P-tuning: (N * num_transformer_submodules, token_dim) rows prepended to the input
        embeddings (T5: the first N rows, encoder only);
    prefix tuning: (N, 2 * num_layers * token_dim), N keys and values per layer before the tokens' own.
A prompt encoder (`build_encoder`) computes it: a plain table, or a reparameterising network while training.
`prompt_inputs` turns the base model's keyword arguments into ones that carry the prompt, for forward and,
through `PromptedGeneration`, for KV-cache generation.
"""
import math
import warnings
from dataclasses import replace

import torch
from torch import nn

from .models import check_inputs, generate, load_tokenizer

from .config import (ENCODER_DECODER_TASKS, PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig,
                     PromptTuningConfig, is_encoder_decoder)

# Where PEFT looks in the model's config for what a prompt-learning config leaves None, in order.
_MODEL_FIELDS = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
}


def _config_value(model_config, field_name: str):
    """The first of _MODEL_FIELDS[field_name] the model's config has; ValueError if none."""
    for name in _MODEL_FIELDS[field_name]:
        value = getattr(model_config, name, None)
        if value is not None:
            return value
    raise ValueError(f"{field_name}=None and the model's config has none of {list(_MODEL_FIELDS[field_name])}; "
                     f"set {field_name}")


def resolve_config(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """`config` with token_dim, num_layers, num_attention_heads, num_transformer_submodules (2 for
    SEQ_2_SEQ_LM, else 1) and encoder_hidden_size (token_dim) filled in from `model` as PEFT fills them,
    then checked against the model (prefix tuning on grouped-query attention: token_dim and
    num_attention_heads of the key/value heads, as PEFT). ValueError naming the field and value, before anything changes."""
    wants_enc_dec = ENCODER_DECODER_TASKS.get(config.task_type, False)
    if config.task_type not in (None, "SEQ_CLS") and wants_enc_dec != is_encoder_decoder(model) or \
            config.task_type == "SEQ_CLS" and is_encoder_decoder(model):
        raise ValueError(f"task_type={config.task_type!r} does not fit a {type(model).__name__}; soft prompts "
                         f"take CAUSAL_LM or SEQ_CLS (decoders) or SEQ_2_SEQ_LM (T5)")
    filled = {name: getattr(config, name) or _config_value(model.config, name) for name in _MODEL_FIELDS}
    kv_heads = getattr(model.config, "num_key_value_heads", None)
    if isinstance(config, PrefixTuningConfig) and kv_heads is not None:
        # Grouped-query attention: a prefix holds the key/value heads only, as PEFT sizes it.
        head_dim = getattr(model.config, "head_dim", None) or filled["token_dim"] // filled["num_attention_heads"]
        filled["token_dim"], filled["num_attention_heads"] = head_dim * kv_heads, kv_heads
    filled["num_transformer_submodules"] = config.num_transformer_submodules or (
        2 if config.task_type == "SEQ_2_SEQ_LM" else 1)
    if isinstance(config, (PrefixTuningConfig, PromptEncoderConfig)):
        filled["encoder_hidden_size"] = config.encoder_hidden_size or filled["token_dim"]
    config = replace(config, **filled)
    if config.num_transformer_submodules == 2 and not is_encoder_decoder(model):
        raise ValueError(f"num_transformer_submodules=2 needs an encoder-decoder model, not a {type(model).__name__}")
    positions = getattr(model, "max_positions", None)
    if positions is not None and config.num_virtual_tokens >= positions:
        raise ValueError(f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for a token: the model "
                         f"holds {positions} positions")
    if isinstance(config, PrefixTuningConfig):
        _check_prefix_fits(model, config)
    else:
        width = model.get_input_embeddings().embedding_dim
        if config.token_dim != width:
            raise ValueError(f"token_dim={config.token_dim} differs from the model's embedding width {width}")
    return config


def _check_prefix_fits(model: nn.Module, config: PrefixTuningConfig) -> None:
    """Each layer's prefix is (H, N, token_dim / H): it must be the shape of that layer's own keys (the
    model's prefix_attention() hook)."""
    if not hasattr(model, "prefix_attention"):
        raise ValueError(f"{type(model).__name__} takes no prefix (it has no prefix_attention hook)")
    layers, heads, head_dim = model.prefix_attention()
    if config.num_layers != layers:
        raise ValueError(f"num_layers={config.num_layers}, but the model has {layers} layers that take a prefix")
    if config.token_dim % config.num_attention_heads or \
            (config.num_attention_heads, config.token_dim // config.num_attention_heads) != (heads, head_dim):
        raise ValueError(f"token_dim={config.token_dim} over num_attention_heads={config.num_attention_heads} does "
                         f"not give the model's keys ({heads} heads of {head_dim}); set token_dim={heads * head_dim}")


def prompt_shape(config: PromptLearningConfig) -> tuple:
    """(rows, width) of the prompt a resolved config describes, which is also the shape of the file's
    `prompt_embeddings` (docs/formats.md D.2, E.2, F)."""
    if isinstance(config, PrefixTuningConfig):
        return config.num_virtual_tokens, 2 * config.num_layers * config.token_dim
    return config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim


# -- prompt encoders: forward() -> the prompt, prompt_shape(config) --

class PromptEmbedding(nn.Module):
    """A prompt that is its own parameter, `embedding.weight` (rows, width): prompt tuning, prefix tuning
    without projection, and every prompt loaded from a file."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning: prompt = head(embedding.weight), (rows, d), with h = encoder_hidden_size and
    MLP:  mlp_head = Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d);
    LSTM: lstm_head = a bidirectional LSTM(d -> h) over the rows in order, then
          mlp_head = Linear(2h, 2h), ReLU, Linear(2h, d)."""

    def __init__(self, rows: int, config: PromptEncoderConfig):
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(rows, d)
        self.lstm_head = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning with prefix_projection: prefix = transform(embedding.weight), (N, 2 L d), where
    transform = Linear(d, encoder_hidden_size), Tanh, Linear(encoder_hidden_size, 2 L d)."""

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        self.transform = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 2 * config.num_layers * d))
        if config.init_weights == "zero":
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


def build_encoder(config: PromptLearningConfig, word_embeddings: nn.Embedding) -> nn.Module:
    """The prompt encoder of a resolved config, in fp32 on the embeddings' device. With inference_mode it is
    the plain table a file fills (PEFT builds the same); otherwise the method's trainable encoder."""
    rows, width = prompt_shape(config)
    if isinstance(config, PromptEncoderConfig) and not config.inference_mode:
        encoder = PromptEncoder(rows, config)
    elif isinstance(config, PrefixTuningConfig) and config.prefix_projection and not config.inference_mode:
        encoder = PrefixEncoder(config)
    else:
        encoder = PromptEmbedding(rows, width)
        if not config.inference_mode:
            _init_table(config, encoder.embedding.weight, word_embeddings)
    return encoder.to(word_embeddings.weight.device)


@torch.no_grad()
def _init_table(config: PromptLearningConfig, table: torch.Tensor, word_embeddings: nn.Embedding) -> None:
    """Overwrite nn.Embedding's N(0, 1) init where the config asks: prompt tuning's TEXT / SAMPLE_VOCAB rows
    of the model's embeddings, prefix tuning's init_weights="zero"."""
    if isinstance(config, PromptTuningConfig) and config.prompt_tuning_init != "RANDOM":
        ids = init_token_ids(config, table.shape[0], word_embeddings.num_embeddings)
        table.copy_(word_embeddings(ids.to(word_embeddings.weight.device)))
    if isinstance(config, PrefixTuningConfig) and config.init_weights == "zero":
        table.zero_()


def init_token_ids(config: PromptTuningConfig, rows: int, vocab_size: int) -> torch.Tensor:
    """(rows,) token ids whose embeddings start the prompt: random ones for SAMPLE_VOCAB; for TEXT the
    tokenised init text (with the tokenizer's special tokens), repeated cyclically or cut to `rows`."""
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (rows,))
    if config.tokenizer_kwargs:
        raise ValueError(f"tokenizer_kwargs={config.tokenizer_kwargs!r}: models.load_tokenizer takes no arguments")
    ids = load_tokenizer(config.tokenizer_name_or_path).encode(config.prompt_tuning_init_text)
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenises to no tokens "
                         f"(a zero-length prompt)")
    return torch.tensor((ids * math.ceil(rows / len(ids)))[:rows])


# -- the prompt in the model's inputs --

def _pad_before(kw: dict, name: str, n: int, value):
    """kw[name] (B, T) -> (B, n + T) with `value` in the first n columns; absent or None stays None."""
    t = kw.get(name)
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a (batch, sequence) tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return torch.cat([t.new_full((t.shape[0], n), value), t], dim=1)


def prefix_key_values(config: PrefixTuningConfig, prefix: torch.Tensor, batch: int) -> list:
    """prefix (N, 2 L d) -> per layer i, (k, v) each (batch, H, N, d / H): slots (2 s i) mod 2L and
    (2 s i + 1) mod 2L of the prefix viewed as (N, 2L, H, d / H), s = num_transformer_submodules.

    PEFT gives each layer the next 2s slots of the slots repeated s times (self K/V, then cross K/V that
    T5 discards), hence GPT-2 layer i takes slots 2i, 2i+1 and T5 decoder layer i slots 4i, 4i+1 mod 2L.
    """
    n_slots, heads = 2 * config.num_layers, config.num_attention_heads
    slots = prefix.view(config.num_virtual_tokens, n_slots, heads, -1).permute(1, 2, 0, 3)
    step = 2 * config.num_transformer_submodules
    return [tuple(slots[(step * i + j) % n_slots].expand(batch, -1, -1, -1) for j in (0, 1))
            for i in range(config.num_layers)]


def prompt_inputs(model: nn.Module, config: PromptLearningConfig, prompt: torch.Tensor, kwargs: dict) -> dict:
    """The base model's keyword arguments `kwargs` with the prompt (prompt_shape(config)) put in; None values
    are dropped. PEFT's rules (docs/formats.md D.3, E.3, F):

    virtual tokens, decoders: inputs_embeds = [prompt; embeddings] (B, N + T, d), attention_mask and labels get
        N leading ones / -100s (SEQ_CLS: labels are one per row and stay); position_ids are ignored (virtual
        tokens take positions 0..N-1).
    virtual tokens, T5: the first N rows go before the encoder's embeddings, attention_mask gets N ones;
        the decoder and labels are untouched.
    prefix, GPT-2: past_key_values = the per-layer prefix, attention_mask gets N ones, position_ids + N.
    prefix, T5: the prefix goes to decoder self-attention only; decoder_attention_mask gets N ones.
    Where the prompt is already in what is passed (a cache, or T5's encoder_outputs), only masks grow.
    token_type_ids are ignored.
    """
    kw = {k: v for k, v in kwargs.items() if v is not None}
    ignored = ["token_type_ids"] + ([] if isinstance(config, PrefixTuningConfig) else ["position_ids"])
    for name in ignored:
        if kw.pop(name, None) is not None:
            warnings.warn(f"{name} are not used with {config.peft_type}; ignoring them", stacklevel=3)
    n, enc_dec = config.num_virtual_tokens, is_encoder_decoder(model)
    if isinstance(config, PrefixTuningConfig):
        kw = _with_prefix(model, config, prompt, kw)
    else:
        kw = _with_virtual_tokens(model, prompt[:n], kw, enc_dec, not enc_dec and config.task_type != "SEQ_CLS")
    return {k: v for k, v in kw.items() if v is not None}


def _with_virtual_tokens(model, rows, kw, enc_dec: bool, token_labels: bool) -> dict:
    n = rows.shape[0]
    kw["attention_mask"] = _pad_before(kw, "attention_mask", n, 1)
    if "encoder_outputs" in kw or (not enc_dec and "past_key_values" in kw):
        return kw
    ids, embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
    table = model.get_input_embeddings()
    check_inputs(ids, embeds, table.num_embeddings, table.embedding_dim)
    embeds = table(ids) if embeds is None else embeds
    kw["inputs_embeds"] = torch.cat([rows.to(embeds.dtype).expand(embeds.shape[0], -1, -1), embeds], dim=1)
    if token_labels:
        kw["labels"] = _pad_before(kw, "labels", n, -100)
    return kw


def _with_prefix(model, config: PrefixTuningConfig, prefix, kw) -> dict:
    n = config.num_virtual_tokens
    kw[model.prefix_mask] = _pad_before(kw, model.prefix_mask, n, 1)
    if "position_ids" in kw:
        kw["position_ids"] = kw["position_ids"] + n
    if "past_key_values" in kw:
        return kw
    given = [kw[k] for k in ("input_ids", "inputs_embeds", "encoder_outputs") if k in kw]
    if not given or not isinstance(given[0], torch.Tensor) or given[0].dim() < 2:
        raise ValueError("pass input_ids (batch, sequence), inputs_embeds or encoder_outputs as tensors")
    batch = given[0].shape[0]
    past = prefix_key_values(config, prefix.to(model.get_input_embeddings().weight.dtype), batch)
    kw["past_key_values"] = model.past_from_prefix(past)
    return kw


class PromptedGeneration:
    """models.generate's protocol for `model` with a soft prompt: prefill takes the prompt (through
    `prompt_inputs`, the prompt computed by `prompt()`); decode steps, the output prefix and the config
    (its eos) are the model's."""

    def __init__(self, model: nn.Module, prompt_config: PromptLearningConfig, prompt):
        self.model, self.prompt_config, self.prompt = model, prompt_config, prompt
        self.config = model.config

    def prefill(self, input_ids, attention_mask=None, **cache_options):
        """cache_options: the model's prefill's (cache_implementation, max_new_tokens, max_cache_len)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        return self.model.prefill(**prompt_inputs(self.model, self.prompt_config, self.prompt(), inputs),
                                  **cache_options)

    def decode_step(self, cache, tokens):
        return self.model.decode_step(cache, tokens)

    def generation_prefix(self, input_ids):
        return self.model.generation_prefix(input_ids)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """models.generate with the prompt: (B, T) -> (B, P + n), only real tokens."""
        return generate(self, input_ids, attention_mask, **kwargs)
