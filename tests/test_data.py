"""Local data files to examples: jsonl, csv and txt read alike, the loss falls on the completion only,
classification labels become class ids by one rule, collation pads with masks and -100 (or stacks class
ids), and bad files fail with the file, line and column named."""
import pytest
import torch

from lowrank.models import word_tokenizer
from lowrank.data import (causal_lm_examples, class_labels, classification_examples, collate, label_maps,
                          label_tokens, read_records, seq2seq_examples)

WORDS = "what is two plus three five a b c positive negative great awful".split()
ROWS = [("what is two plus three", "five"), ("a b", "c")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(WORDS, tmp_path_factory.mktemp("tokenizer"))


def write(path, text):
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


@pytest.fixture(params=["jsonl", "csv"])
def prompt_file(request, tmp_path):
    if request.param == "jsonl":
        text = "".join(f'{{"prompt": "{p}", "completion": "{c}"}}\n' for p, c in ROWS)
    else:
        text = "prompt,completion\n" + "".join(f"{p},{c}\n" for p, c in ROWS)
    return write(tmp_path / f"data.{request.param}", text)


def test_jsonl_and_csv_give_the_same_records_with_line_numbers(prompt_file):
    records = read_records(prompt_file)
    assert [r.fields for r in records] == [{"prompt": p, "completion": c} for p, c in ROWS]
    assert [r.line for r in records] == ([1, 2] if prompt_file.suffix == ".jsonl" else [2, 3])


def test_loss_falls_on_the_completion_only_which_ends_in_the_tokenizers_eos_by_default(prompt_file, tokenizer):
    eos = tokenizer.eos_token_id
    assert eos is not None
    first, second = causal_lm_examples(prompt_file, tokenizer, max_length=16)
    prompt, completion = tokenizer.encode(ROWS[0][0]), tokenizer.encode(ROWS[0][1]) + [eos]
    assert first["input_ids"] == prompt + completion
    assert first["labels"] == [-100] * len(prompt) + completion
    assert len(second["input_ids"]) == 4 and second["labels"][:2] == [-100, -100]


def test_plain_text_learns_every_token_and_eos_unless_opted_out(tmp_path, tokenizer):
    corpus = write(tmp_path / "corpus.txt", "\na b c\n\n")
    (example,) = causal_lm_examples(corpus, tokenizer, max_length=8)
    assert example["input_ids"] == example["labels"] == tokenizer.encode("a b c") + [tokenizer.eos_token_id]
    (example,) = causal_lm_examples(corpus, tokenizer, max_length=8, eos_token_id=None)
    assert example["input_ids"] == example["labels"] == tokenizer.encode("a b c")


def test_a_tokenizer_without_eos_needs_an_explicit_choice(prompt_file, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "eos_token_id", None)
    with pytest.raises(ValueError, match="no end-of-sequence token.*eos_token_id=None"):
        causal_lm_examples(prompt_file, tokenizer, max_length=16)
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        seq2seq_examples(prompt_file, tokenizer, 16, source_column="prompt", target_column="completion")
    (example, _) = causal_lm_examples(prompt_file, tokenizer, max_length=16, eos_token_id=None)
    assert example["input_ids"] == tokenizer.encode(ROWS[0][0]) + tokenizer.encode(ROWS[0][1])


def test_seq2seq_examples_end_in_eos(tmp_path, tokenizer):
    path = write(tmp_path / "cls.jsonl", '{"text": "a great b", "label": "positive"}\n')
    (example,) = seq2seq_examples(path, tokenizer, 8, source_column="text", target_column="label", eos_token_id=1)
    assert example == {"input_ids": tokenizer.encode("a great b") + [1], "labels": tokenizer.encode("positive") + [1]}
    (cut,) = seq2seq_examples(path, tokenizer, 3, max_target_length=1, source_column="text", target_column="label",
                              eos_token_id=1, truncation="truncate")
    assert cut == {"input_ids": tokenizer.encode("a great") + [1], "labels": [1]}  # truncated, still ended


def test_collate_pads_ids_masks_and_labels(tokenizer):
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [9, 9]}],
                    pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, 9, -100]]
    assert label_tokens(batch["labels"], shifted=True) == 3 and label_tokens(batch["labels"], shifted=False) == 4


def test_over_long_examples_are_refused_or_truncated(prompt_file, tokenizer):
    with pytest.raises(ValueError, match=rf"{prompt_file.name}, line \d: 7 tokens, longer than max_length=5"):
        causal_lm_examples(prompt_file, tokenizer, max_length=5)
    first, _ = causal_lm_examples(prompt_file, tokenizer, max_length=6, truncation="truncate", eos_token_id=1)
    assert first["input_ids"] == tokenizer.encode("what is two plus three five")
    with pytest.raises(ValueError, match="leaves no completion token"):
        causal_lm_examples(prompt_file, tokenizer, max_length=5, truncation="truncate")


@pytest.mark.parametrize("name, text, message", [
    ("empty.jsonl", "\n\n", r"empty.jsonl: empty file, no examples"),
    ("empty.csv", "prompt,completion\n", r"empty.csv: empty file, no examples"),
    ("missing.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
     r"missing.jsonl, line 2: missing column 'completion' \(found \['prompt'\]\)"),
    ("missing.csv", "prompt,answer\na,b\n", r"missing.csv, line 2: missing column 'completion'"),
    ("short.csv", 'prompt,completion\n"a\nb",c\nd\n', r"short.csv, line 4: missing column 'completion' \(found \['prompt'\]\)"),
    ("number.jsonl", '{"prompt": "a", "completion": 5}\n', r"number.jsonl, line 1, column 'completion': expected text"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",}\n', r"bad.jsonl, line 2, column 16: not valid JSON"),
    ("list.jsonl", '["a", "b"]\n', r"list.jsonl, line 1: expected a JSON object, got list"),
    ("data.parquet", "x", r"data.parquet: unknown data format '.parquet'"),
    ("latin1.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n',
     r"latin1.jsonl, line 2: not UTF-8 text \(byte 0xe9 at offset 50\)"),
])
def test_bad_files_name_file_line_and_column(tmp_path, tokenizer, name, text, message):
    with pytest.raises(ValueError, match=message):
        causal_lm_examples(write(tmp_path / name, text), tokenizer, max_length=16)


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Excel and Notepad start UTF-8 files with a BOM; it must not turn into a column name or bad JSON."""
    bom = "\ufeff"
    jsonl = read_records(write(tmp_path / "d.jsonl", bom + '{"prompt": "a", "completion": "b"}\n'))
    csv_ = read_records(write(tmp_path / "d.csv", bom + "prompt,completion\na,b\n"))
    assert [r.fields for r in jsonl] == [r.fields for r in csv_] == [{"prompt": "a", "completion": "b"}]


def test_missing_file_and_bad_options(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        read_records(tmp_path / "nope.jsonl")
    path = write(tmp_path / "d.txt", "a b\n")
    with pytest.raises(ValueError, match="truncation='left'"):
        causal_lm_examples(path, tokenizer, max_length=4, truncation="left")
    with pytest.raises(ValueError, match="max_length=0"):
        seq2seq_examples(path, tokenizer, max_length=0)


def test_bad_sizes_tokenizers_and_fields_are_named(tmp_path, tokenizer):
    data = write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ValueError, match="max_length='16' must be an integer"):
        causal_lm_examples(data, tokenizer, max_length="16")
    with pytest.raises(TypeError, match="tokenizer must be"):
        causal_lm_examples(data, None, max_length=16)
    with pytest.raises(ValueError, match="eos_token_id=1.5"):
        causal_lm_examples(data, tokenizer, max_length=16, eos_token_id=1.5)
    huge = write(tmp_path / "huge.csv", "prompt,completion\n" + "a" * 200_000 + ",b\n")
    with pytest.raises(ValueError, match="huge.csv: not a csv file this reader takes"):
        causal_lm_examples(huge, tokenizer, max_length=16)
    empty = write(tmp_path / "e.txt", "x\n \n")
    lone = write(tmp_path / "s.jsonl", '{"prompt": "a \\ud800", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl, line 1, column 'prompt': not text"):
        causal_lm_examples(lone, tokenizer, max_length=16)
    assert causal_lm_examples(empty, tokenizer, max_length=16, eos_token_id=None)  # blank lines are skipped


def test_text_labels_are_classes_in_sorted_order_and_other_files_must_use_them(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", '{"text": "a great b", "label": "positive"}\n'
                                            '{"text": "awful", "label": "negative"}\n'
                                            '{"text": "c", "label": "positive"}\n')
    classes = class_labels(train)
    assert classes == ("negative", "positive")
    assert label_maps(classes) == {"id2label": {"0": "negative", "1": "positive"},
                                   "label2id": {"negative": 0, "positive": 1}}
    examples = classification_examples(train, tokenizer, max_length=8)
    assert examples == [{"input_ids": tokenizer.encode("a great b"), "labels": 1},
                        {"input_ids": tokenizer.encode("awful"), "labels": 0},
                        {"input_ids": tokenizer.encode("c"), "labels": 1}]  # no eos: the classifier reads the text
    only_positive = write(tmp_path / "eval.jsonl", '{"text": "great", "label": "positive"}\n')
    assert classification_examples(only_positive, tokenizer, 8, labels=classes)[0]["labels"] == 1
    unknown = write(tmp_path / "bad.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b", "label": "great"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2, column 'label': label 'great' is not one of the 2 "
                                         r"known labels \['negative', 'positive'\]"):
        classification_examples(unknown, tokenizer, 8, labels=classes)


def test_integer_labels_sort_by_value_alike_in_jsonl_and_csv(tmp_path, tokenizer):
    jsonl = write(tmp_path / "d.jsonl", "".join(f'{{"review": "a", "stars": {n}}}\n' for n in (10, 2, 1, 2)))
    csv_ = write(tmp_path / "d.csv", "review,stars\n" + "".join(f"a,{n}\n" for n in (10, 2, 1, 2)))
    for path in (jsonl, csv_):
        assert class_labels(path, "stars") == ("1", "2", "10")
        examples = classification_examples(path, tokenizer, 8, text_column="review", label_column="stars")
        assert [e["labels"] for e in examples] == [2, 1, 0, 1]
    mixed = write(tmp_path / "m.jsonl", '{"text": "a", "label": "spam"}\n{"text": "b", "label": 3}\n'
                                        '{"text": "c", "label": "03"}\n')
    assert class_labels(mixed) == ("3", "03", "spam")  # integers first; "03" is text, not the integer 3


@pytest.mark.parametrize("text, message", [
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', r"d.jsonl, line 2: missing column 'label' \(found \['text'\]\)"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', r"d.jsonl: one class only \('1' in column 'label'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": " "}\n', r"d.jsonl, line 2, column 'label': empty label"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 1.5}\n', r"line 2, column 'label': expected text, got float"),
    ('{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n', r"d.jsonl, line 2: column 'text' has no tokens"),
    ('{"text": "a b c", "label": "x"}\n{"text": "b", "label": "y"}\n', r"line 1: 3 tokens, longer than max_length=2"),
])
def test_bad_classification_files_name_file_line_and_label(tmp_path, tokenizer, text, message):
    with pytest.raises(ValueError, match=message):
        classification_examples(write(tmp_path / "d.jsonl", text), tokenizer, max_length=2)


def test_given_labels_must_be_two_distinct_names(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n')
    for bad in (["x"], "xy", ["x", "x"], ["x", 1]):
        with pytest.raises(ValueError, match="must be at least 2 distinct class names"):
            classification_examples(path, tokenizer, 8, labels=bad)


def test_collate_stacks_class_ids_and_pads_ids_on_the_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert label_tokens(batch["labels"], shifted=True) == 2  # one label per example, whatever the model shifts
