"""What a model's forward returns: attribute access with transformers' names."""
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class ModelOutput:
    """logits: (B, T, V); loss: scalar when labels were given.

    past_key_values: the KV cache to pass back for incremental decoding
    (model-specific layout, documented on each model); encoder_last_hidden_state:
    (B, T_enc, d_model) for encoder-decoder models.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    past_key_values: Any = None
    encoder_last_hidden_state: Optional[torch.Tensor] = None
