"""lowrank: parameter-efficient fine-tuning (LoRA, prompt tuning, prefix tuning, P-tuning) for GPT-2 and T5,
with PEFT's API names and file format."""
from . import kernels, models
from .config import (CONFIG_CLASSES, LoraConfig, PeftConfig, PrefixTuningConfig, PromptEncoderConfig,
                     PromptLearningConfig, PromptTuningConfig, config_from_dict)
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .lora import LoraLayer
from .peft_model import PeftModel, get_peft_model
from .train import Trainer, TrainingConfig, train

__all__ = ["CONFIG_CLASSES", "LoraConfig", "LoraLayer", "PeftConfig", "PeftModel", "PrefixTuningConfig",
           "PromptEncoderConfig", "PromptLearningConfig", "PromptTuningConfig", "Trainer", "TrainingConfig",
           "config_from_dict", "get_peft_model", "hotswap_adapter", "kernels", "models",
           "prepare_model_for_compiled_hotswap", "train"]
