"""Rotary position embeddings (RoPE, Su et al. 2021) and the scalings of transformers' Llama family.

Channel i < D/2 of a head and channel i + D/2 form a pair, rotated by the angle position * inv_freq[i]
(transformers' `rotate_half` layout, not the interleaved one of the paper). The config's `rope_parameters`
(transformers 5's name; {"rope_type", "rope_theta", ...}) chooses the frequencies:

    default   inv_freq[i] = 1 / theta^(2i / D)
    linear    default / factor (positions interpolated by `factor`)
    dynamic   NTK-aware: theta grown to theta * (factor * L / M - (factor - 1))^(D / (D - 2)) once the sequence
              length L = max(position_ids) + 1 exceeds M = max_position_embeddings; default up to M
    llama3    wavelengths 2 pi / inv_freq above original_max_position_embeddings / low_freq_factor divided by
              `factor`, below original_max_position_embeddings / high_freq_factor kept, smoothly mixed between

Frequencies are computed in float32 with transformers' operations in transformers' order, so angles agree
to the last bit. They are computed per forward, never held in a buffer: models are built on the meta device
(models.loading) and a buffer there would have no values to load.

Dynamic scaling, statelessly: each forward uses L of its own position_ids. transformers' rotary module keeps
the largest L it has seen and goes back to the default only for an L below M, so the two agree whenever the
lengths a transformers model has seen above M never decrease (a fresh model; a generation loop). In KV-cache
decoding (ours and transformers' generate alike) a key keeps the rotation of the step that wrote it, while
full recomputation re-rotates every key with the current L: past M the two differ, in both libraries.
"""
import math

import torch
import torch.nn as nn

from ..checks import is_count, is_number
from ..errors import ConfigError

# The keys each rope_type reads besides rope_theta and rope_type.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_parameters(params: dict, head_dim: int, owner: str) -> None:
    """ConfigError naming rope_parameters' key that is missing, of the wrong type or not supported."""
    where = f"{owner}: rope_parameters"
    rope_type = params.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}['rope_type']={rope_type!r} is not supported; supported: {sorted(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}['partial_rotary_factor']={params['partial_rotary_factor']!r}: the Llama family "
                          f"rotates whole heads (1.0)")
    for key in ("rope_theta", *ROPE_TYPES[rope_type]):
        value = params.get(key)
        valid = is_count(value) if key == "original_max_position_embeddings" else is_number(value) and value > 0
        if not valid:
            raise ConfigError(f"{where}[{key!r}]={value!r} must be a number > 0 (rope_type={rope_type!r})")
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ConfigError(f"{where}['high_freq_factor']={params['high_freq_factor']!r} must be greater than "
                          f"low_freq_factor={params['low_freq_factor']!r}")
    if rope_type == "dynamic" and head_dim <= 2:
        raise ConfigError(f"{owner}: head_dim={head_dim} must be > 2 for rope_type 'dynamic' (exponent D / (D - 2))")


def default_inverse_frequencies(theta, dim: int, device=None) -> torch.Tensor:
    """1 / theta^(2i / dim), i < dim / 2: (dim / 2,) float32. theta: a number or a 0-d float32 tensor."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def dynamic_theta(theta, factor, seq_len, max_positions: int, dim: int):
    """theta of dynamic NTK scaling at sequence length seq_len (>= max_positions): a Python int gives a Python
    float, a tensor a float32 tensor, as transformers computes it at init and in forward respectively."""
    return theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))


def llama3_inverse_frequencies(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling of default frequencies (dim / 2,)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(is_medium, smoothed, scaled)


def inverse_frequencies(params: dict, dim: int, max_positions: int, seq_len=0, device=None) -> torch.Tensor:
    """The rotation frequencies (dim / 2,) float32 of rope_parameters `params`; seq_len: the sequence length
    the forward sees, an int or a 0-d long tensor (dynamic scaling only)."""
    rope_type, theta = params["rope_type"], params["rope_theta"]
    if rope_type == "dynamic":
        # Both frequency sets, selected on the device: choosing in Python would read seq_len, a host sync
        # (and a graph break under torch.compile).
        seq_len = torch.as_tensor(seq_len, device=device)
        short = default_inverse_frequencies(dynamic_theta(theta, params["factor"], max_positions, max_positions, dim),
                                            dim, device)
        long = default_inverse_frequencies(dynamic_theta(theta, params["factor"], seq_len, max_positions, dim),
                                           dim, device)
        return torch.where(seq_len > max_positions, long, short)
    inv_freq = default_inverse_frequencies(theta, dim, device)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    if rope_type == "llama3":
        inv_freq = llama3_inverse_frequencies(inv_freq, params)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated: cos, sin (B or 1, T, D), shared by the heads."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class RotaryEmbedding(nn.Module):
    """position_ids (B or 1, T) -> (cos, sin), each (B or 1, T, head_dim) in `dtype`, for apply_rotary.

    No parameters and no buffers: nothing of it is in a checkpoint.
    """

    def __init__(self, rope_parameters: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope_parameters, self.head_dim = rope_parameters, head_dim
        self.max_position_embeddings = max_position_embeddings

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        dynamic = self.rope_parameters["rope_type"] == "dynamic"
        seq_len = position_ids.max() + 1 if dynamic else 0
        inv_freq = inverse_frequencies(self.rope_parameters, self.head_dim, self.max_position_embeddings, seq_len,
                                       position_ids.device)
        angles = position_ids[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, rope_parameters={self.rope_parameters}"
