"""A thin wrapper over the `tokenizers` library's tokenizer.json (never a hand-written BPE)."""
from pathlib import Path

import torch

# Tried in order when tokenizer.json sets no padding token; GPT-2 has none and pads with <|endoftext|>.
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|endoftext|>")
# The end-of-sequence token, the first of these in the vocabulary (T5, GPT-2, Gemma-style, BERT-style).
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")


class Tokenizer:
    """encode/decode one text; __call__ batches texts into padded id and mask tensors. pad_token_id and
    eos_token_id are ids in the vocabulary, or None where tokenizer.json has no such token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        padding = tokenizer.padding
        pad_ids = [tokenizer.token_to_id(t) for t in _PAD_CANDIDATES]
        self.pad_token_id = padding["pad_id"] if padding else next((i for i in pad_ids if i is not None), None)
        self.eos_token_id = next((i for i in map(tokenizer.token_to_id, _EOS_CANDIDATES) if i is not None), None)

    def __len__(self) -> int:
        """The vocabulary size, special tokens included (what a model's vocab_size must cover)."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids: a list or a 1-D tensor of token ids."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts, padding: bool = True, padding_side: str = "right", max_length=None,
                 add_special_tokens: bool = True) -> dict:
        """texts: str or list of str -> {"input_ids": (B, T) long, "attention_mask": (B, T) long}.

        max_length truncates each text; padding_side "left" is what batched generation needs.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(t, add_special_tokens)[:max_length] for t in ([texts] if isinstance(texts, str) else texts)]
        width = max(map(len, rows), default=0)
        if any(len(r) != width for r in rows):
            if not padding:
                raise ValueError("texts encode to different lengths; pass padding=True")
            if self.pad_token_id is None:
                raise ValueError(f"no padding token: tokenizer.json sets none and has none of {_PAD_CANDIDATES}")
        input_ids = torch.full((len(rows), width), self.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[i, cols] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


WORD_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's pad, eos and unk


def word_tokenizer(words, folder, append_eos: bool = False) -> Tokenizer:
    """Write folder/tokenizer.json for a whitespace word-level vocabulary (<pad>, </s>, <unk>, then `words` in
    order; made by the tokenizers library, nothing downloaded) and load it: a tokenizer for tiny models on
    made-up tasks. append_eos: encoding ends every text with </s>, as T5's tokenizer does."""
    tokenizers = _tokenizers()
    pad, eos, unk = WORD_SPECIAL_TOKENS
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*WORD_SPECIAL_TOKENS, *words]))}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(WORD_SPECIAL_TOKENS))
    if append_eos:
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single=f"$A {eos}",
                                                                            special_tokens=[(eos, vocab[eos])])
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(Path(folder) / "tokenizer.json"))
    return load_tokenizer(folder)


def _tokenizers():
    """The tokenizers package, or ImportError saying how to install it."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("lowrank.models needs the `tokenizers` package for tokenizers: pip install tokenizers "
                          "(or the lowrank[interop] extra)") from e
    return tokenizers


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer saved as <path>/tokenizer.json (needs the `tokenizers` package)."""
    tokenizers = _tokenizers()
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json in {path}")
    try:
        return Tokenizer(tokenizers.Tokenizer.from_file(str(file)))
    except Exception as e:  # the tokenizers library raises its own exception type for a bad file
        raise ValueError(f"{file}: not a readable tokenizer.json: {e}") from None
