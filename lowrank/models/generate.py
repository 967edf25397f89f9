"""KV-cache generation as plain functions (gpt-fast style), for any model with this protocol:

    cache, logits = model.prefill(input_ids, attention_mask)   # logits (B, V) for the next token
    logits = model.decode_step(cache, tokens)                  # tokens (B,); updates cache in place
    model.generation_prefix(input_ids) -> (B, P)               # what precedes the new tokens in the output
    model.config.eos_token_id, model.config.vocab_size          # the default eos, as in transformers

and, for cache_implementation="static", prefill(..., cache_implementation="static", max_new_tokens=n,
max_cache_len=L or None) returning a models.cache.StaticCache, on which decode_step may be compiled (gpt-fast's
decode_one_token): the prefill runs eagerly, the decode step as one graph for every step and prompt length.
"""
import warnings
from typing import Optional, Sequence, Union

import torch

from ..checks import is_count, is_number


def sample_next(logits, do_sample=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next tokens (B,) long: argmax, or a sample after temperature, top-k, then top-p
    (the order transformers applies them)."""
    check_sampling(do_sample, temperature, top_k, top_p)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(do_sample, temperature, top_k, top_p) -> None:
    """ValueError naming the first sampling argument that is not what it must be (greedy ignores the others)."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample={do_sample!r} must be True or False")
    if not do_sample:
        return
    if not (is_number(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if top_k is not None and not is_count(top_k):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1]")


def decode_one_token(model, cache, tokens):
    """model.decode_step(cache, tokens): the function compiled, one top-level frame whatever the model."""
    return model.decode_step(cache, tokens)


_compiled = {}  # repr of torch.compile's options -> decode_one_token compiled with them


def compiled_decode(compile, device):
    """decode_one_token compiled with `compile`: True (torch.compile's defaults; "reduce-overhead", CUDA
    graphs, on a CUDA `device`) or a dict of torch.compile's keyword arguments; fullgraph unless the dict says
    otherwise. Kept per options, so later calls reuse the graphs (torch.compile's cache holds them per
    compiled function)."""
    if compile is True:
        compile = {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    options = {"fullgraph": True, **compile}
    key = repr(sorted(options.items()))
    if key not in _compiled:
        _compiled[key] = torch.compile(decode_one_token, **options)
    return _compiled[key]


def check_cache_options(cache_implementation, compile) -> None:
    """ValueError naming cache_implementation or compile when it is not what it must be."""
    if cache_implementation not in ("dynamic", "static"):
        raise ValueError(f"cache_implementation={cache_implementation!r} must be 'dynamic' or 'static'")
    if not (compile is False or compile is True or isinstance(compile, dict)):
        raise ValueError(f"compile={compile!r} must be True, False or a dict of torch.compile's arguments")
    if compile is not False and cache_implementation != "static":
        raise ValueError("compile needs cache_implementation='static': a dynamic cache's length changes every "
                         "step, and each new length would recompile the decode step")


def eos_ids(model, eos_token_id, device) -> Optional[torch.Tensor]:
    """eos_token_id (an id or a non-empty sequence of ids) as a 1-D long tensor; None means the model
    config's eos_token_id (transformers' default), with a warning when that id lies outside the vocabulary
    (generation can then never stop at it). None if neither names one."""
    config = getattr(model, "config", None) if eos_token_id is None else None
    if config is not None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return None
    flat = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not flat or not all(isinstance(i, int) and not isinstance(i, bool) and abs(i) < 2 ** 62 for i in flat):
        raise ValueError(f"eos_token_id={eos_token_id!r}: expected a token id or a non-empty list of ids")
    ids = torch.as_tensor(flat, device=device)
    if ids.is_floating_point() or ids.is_complex() or ids.numel() == 0:
        raise ValueError(f"eos_token_id={eos_token_id!r}: expected a token id or a non-empty list of ids")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and bool(((ids < 0) | (ids >= vocab)).any()):
        warnings.warn(f"the model config's eos_token_id={eos_token_id} lies outside vocab_size={vocab}: "
                      "generation will not stop at it; pass eos_token_id")
    return ids.flatten().long()


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
             pad_token_id=None, seed=None, cache_implementation="dynamic", compile=False, max_cache_len=None):
    """input_ids (B, T), left-padded where attention_mask (B, T) is 0 -> (B, P + n) long, n <= max_new_tokens:
    generation_prefix(input_ids) followed by the new tokens. After a row emits an eos token it gets
    pad_token_id (default: the first eos id); generation stops when every row has finished. eos_token_id
    defaults to model.config.eos_token_id, as in transformers. seed makes sampling reproducible (a
    private torch.Generator).

    cache_implementation: "dynamic" (a cache that grows) or "static" (one of a fixed length: max_cache_len,
    default models.cache.static_cache_len's power of two); compile (static only): True or a dict of
    torch.compile's arguments, see `compiled_decode`. A compiled step recompiles for a new batch size, cache
    length or model, never for a new step or prompt length."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    check_sampling(do_sample, temperature, top_k, top_p)
    check_cache_options(cache_implementation, compile)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if pad_token_id is not None and not (is_count(pad_token_id, 0) and pad_token_id < (vocab or 2 ** 62)):
        raise ValueError(f"pad_token_id={pad_token_id!r} must be a token id in [0, {vocab})")
    if seed is not None and not (is_count(seed, 0) and seed < 2 ** 63):
        raise ValueError(f"seed={seed!r} must be None or an integer in [0, 2**63)")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    eos = eos_ids(model, eos_token_id, input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (None if eos is None else int(eos[0]))
    finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    static = {}
    if cache_implementation == "static":
        static = dict(cache_implementation="static", max_new_tokens=max_new_tokens, max_cache_len=max_cache_len)
    cache, logits = model.prefill(input_ids, attention_mask, **static)
    decode = model.decode_step
    if compile is not False:
        step_function = compiled_decode(compile, input_ids.device)
        decode = lambda cache, tokens: step_function(model, cache, tokens)
    for step in range(max_new_tokens):
        tokens = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos is not None:
            tokens = tokens.masked_fill(finished, pad)
            finished |= torch.isin(tokens, eos)
        new_tokens.append(tokens)
        if step + 1 == max_new_tokens or (eos is not None and finished.all()):
            break
        logits = decode(cache, tokens)
    prefix = model.generation_prefix(input_ids)
    return torch.cat([prefix, torch.stack(new_tokens, dim=1).to(prefix.dtype)], dim=1) if new_tokens else prefix
