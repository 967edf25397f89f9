"""The base class of every model here: generate and save_pretrained once, and the defaults of the hooks
lowrank reads (models/__init__)."""
from torch import nn

from .generate import generate
from .loading import save_pretrained


class PreTrainedModel(nn.Module):
    """A subclass sets config_class and checkpoint_layers (models.loading) and implements the generation
    protocol (prefill, decode_step, generation_prefix) and the checkpoint hooks (normalize_checkpoint,
    checkpoint_state_dict)."""

    base_model_prefix = None
    max_positions = None

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """models.generate on this model: (B, T) -> (B, P + n) tokens."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors that transformers loads (models.loading.save_pretrained)."""
        save_pretrained(self, path)
