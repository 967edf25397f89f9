"""Activation functions by the names transformers' configs use (its ACT2FN)."""
from functools import partial

import torch
import torch.nn.functional as F

_tanh_gelu = partial(F.gelu, approximate="tanh")

# transformers' ACT2FN names -> functions. The tanh-approximation variants differ from each
# other only by float rounding, so the fused C kernel serves them all.
ACTIVATIONS = {
    **dict.fromkeys(["gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "gelu_python_tanh"], _tanh_gelu),
    **dict.fromkeys(["gelu", "gelu_python"], F.gelu),
    **dict.fromkeys(["silu", "swish"], F.silu),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}
