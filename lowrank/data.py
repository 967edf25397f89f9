"""Training data from local files: jsonl, csv or plain text, tokenized with a tokenizer.json.

A record is one row of the file as a dict of strings (a .txt file gives {"text": line} per non-empty line).
An example is {"input_ids": [int], "labels": [int]} ("labels": int, a class id, for classification):

- causal LM, prompt/completion: input_ids = prompt + completion + eos; labels = -100 on the prompt, the
  completion's ids after it (GPT-2 shifts inside its loss, so labels align with input_ids);
- causal LM, plain text: labels = input_ids (every token is learned);
- seq2seq (T5): input_ids = source + eos; labels = target + eos (T5 shifts labels into decoder inputs);
- sequence classification: input_ids = text (no eos: the classifier reads the last real token); labels = one
  class id (an int, not a list).

The classes of a classification file are its distinct labels, sorted: integers (JSON 3, or the text "3" as a
csv holds it) by value first, then text alphabetically; class id i is the i-th. The training file's classes
are the model config's id2label / label2id (label_maps); other files' labels must be among them.

Errors name the file, the line and the column at fault, and are raised while reading, before training.
"""
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .checks import is_count

IGNORE_INDEX = -100
TRUNCATION = ("refuse", "truncate")
TOKENIZER_EOS = "tokenizer"  # the eos_token_id default: the tokenizer's own eos
INTEGER_TEXT = re.compile(r"0|-?[1-9][0-9]*")  # a label written as an integer: "3", not "03" or " 3"


@dataclass(frozen=True)
class Record:
    """One row of a data file, with the line it starts on (1-based) for error messages."""

    fields: dict
    line: int


def read_records(path) -> list:
    """Records of a .jsonl (one JSON object per line), .csv (header row) or .txt file (one text per line).
    ValueError naming the file (and line) for an unknown suffix, bad JSON, a non-object line or an empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    try:
        records = _records(path, suffix)
    except csv.Error as e:  # a field over csv's size limit, a NUL byte
        raise ValueError(f"{path}: not a csv file this reader takes ({e})") from None
    except UnicodeDecodeError:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:  # decoding the whole file gives the offset in the file
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                             f"{e.start}); save the file as UTF-8") from None
        raise
    if not records:
        raise ValueError(f"{path}: empty file, no examples")
    return records


def _records(path: Path, suffix: str) -> list:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a leading BOM (Excel) is not text
        if suffix == ".jsonl":
            records = list(_jsonl_records(path, f))
        elif suffix == ".csv":
            records = list(_csv_records(f))
        elif suffix == ".txt":
            records = [Record({"text": line.rstrip("\r\n")}, i) for i, line in enumerate(f, 1) if line.strip()]
        else:
            raise ValueError(f"{path}: unknown data format {suffix!r}; use .jsonl, .csv or .txt")
    return records


def _jsonl_records(path: Path, lines):
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}, column {e.colno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}, line {i}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
        yield Record(row, i)


def _csv_records(lines):
    """Records of a csv file with a header row, each with the line it starts on (a quoted field may span
    lines). A short row's missing fields are left out rather than set to None."""
    reader = csv.reader(lines)
    header = next(reader, None)
    while header is not None:
        line = reader.line_num + 1
        row = next(reader, None)
        if row is None:
            return
        if row:
            yield Record(dict(zip(header, row)), line)


def column(record: Record, name: str, path) -> str:
    """The record's text in column `name`; ValueError naming file, line and column if absent or not text."""
    if record.fields.get(name) is None:
        raise ValueError(f"{path}, line {record.line}: missing column {name!r} (found {sorted(record.fields)})")
    value = record.fields[name]
    if not isinstance(value, str):
        raise ValueError(f"{path}, line {record.line}, column {name!r}: expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON) is no text a tokenizer takes
        raise ValueError(f"{path}, line {record.line}, column {name!r}: not text ({e.reason} at character "
                         f"{e.start})") from None
    return value


def resolve_eos(tokenizer, eos_token_id) -> Optional[int]:
    """The eos id examples end in: the tokenizer's own for TOKENIZER_EOS (ValueError if it has none), else
    eos_token_id as given (None: no eos)."""
    _check_tokenizer(tokenizer)
    if eos_token_id != TOKENIZER_EOS:
        if eos_token_id is not None and not is_count(eos_token_id, 0):
            raise ValueError(f"eos_token_id={eos_token_id!r} must be a token id >= 0, None or {TOKENIZER_EOS!r}")
        return eos_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token (</s>, <|endoftext|>, <eos> or [SEP]); "
                         "pass eos_token_id=ID, or eos_token_id=None for examples without one")
    return tokenizer.eos_token_id


def _check_tokenizer(tokenizer) -> None:
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "eos_token_id"):
        raise TypeError(f"tokenizer must be a models.load_tokenizer tokenizer, got {type(tokenizer).__name__}")


def _with_eos(ids: list, eos: Optional[int]) -> list:
    """ids ending in eos (appended unless the tokenizer's post-processor already did, as T5's does)."""
    return ids if eos is None or ids[-1:] == [eos] else ids + [eos]


def _fit(ids: list, max_length: int, truncation: str, where: str, end: Optional[int] = None) -> list:
    """ids if they fit in max_length; else ValueError ("refuse") or the first max_length ("truncate"), then
    still ending in `end` when they did (T5 sequences end in </s>, as transformers' tokenizer truncates)."""
    if len(ids) <= max_length:
        return ids
    if truncation == "refuse":
        raise ValueError(f"{where}: {len(ids)} tokens, longer than max_length={max_length} "
                         f"(shorten it, raise max_length, or set truncation='truncate')")
    if end is not None and ids[-1] == end:
        return ids[:max_length - 1] + [end]
    return ids[:max_length]


def _check_options(max_length: int, truncation: str, name: str = "max_length") -> None:
    if not is_count(max_length):
        raise ValueError(f"{name}={max_length!r} must be an integer >= 1")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r} must be one of {TRUNCATION}")


def causal_lm_examples(path, tokenizer, max_length: int, prompt_column: str = "prompt",
                       completion_column: str = "completion", text_column: Optional[str] = None,
                       truncation: str = "refuse", eos_token_id: Union[int, None, str] = TOKENIZER_EOS) -> list:
    """Examples for a causal LM from the file at `path` (see the module docstring). With `text_column`
    (the default for .txt files, whose column is "text") every token is learned; otherwise the loss falls
    on the completion only. truncation: "refuse" (ValueError) or "truncate" (keep the first max_length
    tokens) for an example longer than max_length; one left with no completion token is refused either way.
    eos_token_id: the tokenizer's eos by default, so that a trained model learns to stop; None for none."""
    _check_options(max_length, truncation)
    eos_token_id = resolve_eos(tokenizer, eos_token_id)
    records = read_records(path)
    if text_column is None and Path(path).suffix.lower() == ".txt":
        text_column = "text"
    examples = []
    for r in records:
        where = f"{path}, line {r.line}"
        if text_column is not None:
            ids = _fit(_with_eos(tokenizer.encode(column(r, text_column, path)), eos_token_id), max_length,
                       truncation, where)
            labels = list(ids)
            if not ids:
                raise ValueError(f"{where}: column {text_column!r} has no tokens (and eos_token_id=None)")
        else:
            prompt = tokenizer.encode(column(r, prompt_column, path))
            completion = _with_eos(tokenizer.encode(column(r, completion_column, path), add_special_tokens=False),
                                   eos_token_id)
            ids = _fit(prompt + completion, max_length, truncation, where)
            labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
            if len(ids) <= len(prompt):
                raise ValueError(f"{where}: the prompt alone has {len(prompt)} tokens, so max_length={max_length} "
                                 f"leaves no completion token to learn")
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def seq2seq_examples(path, tokenizer, max_length: int, max_target_length: Optional[int] = None,
                     source_column: str = "source", target_column: str = "target", truncation: str = "refuse",
                     eos_token_id: Union[int, None, str] = TOKENIZER_EOS) -> list:
    """Examples for T5 (text to text; classification is generating the label's text) from the file at `path`.
    max_target_length defaults to max_length; truncation and eos_token_id as in causal_lm_examples."""
    max_target_length = max_length if max_target_length is None else max_target_length
    eos_token_id = resolve_eos(tokenizer, eos_token_id)
    _check_options(max_length, truncation)
    _check_options(max_target_length, truncation, "max_target_length")
    examples = []
    for r in read_records(path):
        where = f"{path}, line {r.line}"
        source = _with_eos(tokenizer.encode(column(r, source_column, path)), eos_token_id)
        target = _with_eos(tokenizer.encode(column(r, target_column, path)), eos_token_id)
        for name, ids in ((source_column, source), (target_column, target)):
            if not ids:
                raise ValueError(f"{where}, column {name!r}: no tokens (and eos_token_id=None)")
        examples.append({
            "input_ids": _fit(source, max_length, truncation, f"{where}, column {source_column!r}", eos_token_id),
            "labels": _fit(target, max_target_length, truncation, f"{where}, column {target_column!r}", eos_token_id)})
    return examples


def class_labels(path, label_column: str = "label") -> tuple:
    """The class names of the classification file at `path`, in class-id order (see the module docstring),
    as text ("3" for the integer 3). ValueError naming the file for one class only, and the line for a
    missing, empty or non-label value."""
    return _classes_of(read_records(path), label_column, path)


def classification_examples(path, tokenizer, max_length: int, text_column: str = "text", label_column: str = "label",
                            labels: Optional[Sequence[str]] = None, truncation: str = "refuse") -> list:
    """Examples {"input_ids": the text's ids, "labels": its class id} for a sequence classifier, from the file
    at `path`. labels: the class names in id order, class_labels of the training file, so that other files
    get the same ids (None: this file's own); a label outside them is a ValueError naming the file, line and
    label. truncation as in causal_lm_examples."""
    _check_options(max_length, truncation)
    _check_tokenizer(tokenizer)
    records = read_records(path)
    classes = _classes_of(records, label_column, path) if labels is None else _checked_classes(labels)
    class_ids = {_label_key(name): i for i, name in enumerate(classes)}
    examples = []
    for r in records:
        where = f"{path}, line {r.line}"
        label = _label(r, label_column, path)
        if label not in class_ids:
            raise ValueError(f"{where}, column {label_column!r}: label {str(label)!r} is not one of the "
                             f"{len(classes)} known labels {list(classes)}")
        ids = _fit(tokenizer.encode(column(r, text_column, path)), max_length, truncation, where)
        if not ids:
            raise ValueError(f"{where}: column {text_column!r} has no tokens")
        examples.append({"input_ids": ids, "labels": class_ids[label]})
    return examples


def label_maps(classes: Sequence[str]) -> dict:
    """{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}: the class names as a model config holds them."""
    classes = _checked_classes(classes)
    return {"id2label": {str(i): name for i, name in enumerate(classes)},
            "label2id": {name: i for i, name in enumerate(classes)}}


def _label_key(text: str) -> Union[int, str]:
    """A label as the classes order it: the integer for integer text ("3" -> 3), else the text."""
    return int(text) if INTEGER_TEXT.fullmatch(text) else text


def _label(record: Record, name: str, path) -> Union[int, str]:
    """The record's label in column `name`: a JSON integer, or text (integer text read as the integer)."""
    value = record.fields.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = column(record, name, path)
    if not text.strip():
        raise ValueError(f"{path}, line {record.line}, column {name!r}: empty label")
    return _label_key(text)


def _classes_of(records: list, label_column: str, path) -> tuple:
    labels = {_label(r, label_column, path) for r in records}
    if len(labels) < 2:
        raise ValueError(f"{path}: one class only ({str(next(iter(labels)))!r} in column {label_column!r} on every "
                         f"line); classification needs at least 2")
    return tuple(str(label) for label in sorted(labels, key=lambda label: (isinstance(label, str), label)))


def _checked_classes(classes) -> tuple:
    """classes as a tuple, if they are at least 2 distinct class names; else ValueError."""
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) < 2 \
            or not all(isinstance(c, str) for c in classes) or len(set(map(_label_key, classes))) != len(classes):
        raise ValueError(f"labels={classes!r} must be at least 2 distinct class names (class_labels of the "
                         f"training file)")
    return tuple(classes)


def is_class_id(labels) -> bool:
    """Whether an example's labels are one class id (a classification example), not a list of token labels."""
    return isinstance(labels, int) and not isinstance(labels, bool)


def collate(examples: list, pad_token_id: int) -> dict:
    """examples -> {"input_ids": (B, T) long, right-padded with pad_token_id; "attention_mask": (B, T) long,
    1 on real tokens; "labels": (B,) long class ids for classification examples, else (B, T_labels) long
    right-padded with -100}. A sequence classifier reads each row at its last token that is not its
    config.pad_token_id, so that is the pad_token_id to pass for classification."""
    def pad(rows, value):
        out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    ids, labels = [e["input_ids"] for e in examples], [e["labels"] for e in examples]
    return {"input_ids": pad(ids, pad_token_id), "attention_mask": pad([[1] * len(r) for r in ids], 0),
            "labels": torch.tensor(labels, dtype=torch.long) if is_class_id(labels[0]) else pad(labels, IGNORE_INDEX)}


def label_tokens(labels: torch.Tensor, shifted: bool) -> int:
    """How many labels a batch's loss averages over: B for (B,) class ids; for (B, T) token labels those
    != -100, without the first column when the model shifts labels left (causal LMs predict token t + 1
    from t)."""
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] if shifted else labels).ne(IGNORE_INDEX).sum())
