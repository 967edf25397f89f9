"""GPT-2, GPT-Neo, BLOOM, Llama/Qwen2/Mistral and T5 as plain torch modules with Hugging Face names (causal
LM and sequence classification heads on the decoders); safetensors in and out; generation.

The contract with lowrank (docs/architecture.md, "The contract between lowrank and models"): lowrank uses
models only through the names exported here, and through these hooks on a model (optional where lowrank
has a default; an arbitrary torch module works without them):

    config                    vocab_size, eos_token_id, is_encoder_decoder (absent: False)
    get_input_embeddings()    the token embedding (soft prompts)
    prefill, decode_step, generation_prefix, generate    the generation protocol (models.generate)
    save_pretrained(path)     config.json + model.safetensors
    max_positions             the most tokens a sequence may have; None: no limit (T5)
    base_model_prefix         the submodule a headless checkpoint's keys lack ("transformer"), or None
    prefix_attention()        (layers, heads, head_dim) of the attention a learned prefix enters
    prefix_mask               the keyword of the mask that a prefix's keys extend
    past_from_prefix(kvs)     per-layer (k, v) of a prefix -> the model's past_key_values layout

models itself uses nothing of lowrank but its leaf modules lowrank.errors, lowrank.checks and lowrank.files.
"""
from .bloom import BloomConfig, BloomForCausalLM, BloomForSequenceClassification
from .cache import ConcatCache, KVCache
from .config import ModelConfig
from .generate import generate, sample_next
from .gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from .gpt_neo import GPTNeoConfig, GPTNeoForCausalLM, GPTNeoForSequenceClassification
from .inputs import check_inputs
from .llama import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from .loading import (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, from_pretrained, read_config, save_pretrained,
                      shard_keys)
from .outputs import ModelOutput
from .t5 import T5Config, T5ForConditionalGeneration
from .tokenizer import load_tokenizer, word_tokenizer

__all__ = [
    "BloomConfig", "BloomForCausalLM", "BloomForSequenceClassification",
    "CONFIG_NAME", "ConcatCache", "INDEX_NAME", "GPT2Config", "GPT2ForSequenceClassification", "GPT2LMHeadModel", "KVCache", "ModelConfig", "ModelOutput",
    "GPTNeoConfig", "GPTNeoForCausalLM", "GPTNeoForSequenceClassification",
    "LlamaConfig", "LlamaForCausalLM", "MistralConfig", "MistralForCausalLM", "Qwen2Config", "Qwen2ForCausalLM",
    "T5Config", "T5ForConditionalGeneration", "WEIGHTS_NAME", "check_inputs", "from_pretrained", "generate", "load_tokenizer",
    "read_config", "sample_next", "save_pretrained", "shard_keys", "word_tokenizer",
]
