"""GPT-2 and T5 as plain torch modules with Hugging Face names; safetensors in and out; generation."""
from .generate import generate, sample_next
from .gpt2 import GPT2Config, GPT2LMHeadModel
from .loading import from_pretrained, save_pretrained
from .outputs import ModelOutput
from .t5 import T5Config, T5ForConditionalGeneration
from .tokenizer import load_tokenizer, word_tokenizer

__all__ = [
    "GPT2Config", "GPT2LMHeadModel", "ModelOutput", "T5Config", "T5ForConditionalGeneration",
    "from_pretrained", "generate", "load_tokenizer", "sample_next", "save_pretrained", "word_tokenizer",
]
