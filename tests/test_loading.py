"""Properties of models.loading: save/load round trips bit-exactly; every malformed folder raises
an error naming the file, key and shapes at fault, before any weight is assigned."""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowrank import models
from lowrank.errors import CheckpointError, ConfigError
from lowrank.models import loading
from lowrank.models.gpt2 import GPT2Config, GPT2LMHeadModel

from .helpers import tiny_t5

TINY = dict(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides})).eval()


@pytest.fixture
def saved(tmp_path):
    """A folder written by save_pretrained, and the model it holds."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.fixture
def no_assignment(monkeypatch):
    """Fails the test if a failing load got as far as assigning weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_state_dict was reached: the checkpoint was not validated first")
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", refuse)


def rewrite_weights(folder, edit):
    """Apply edit(tensors dict) to folder/model.safetensors."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def assert_same_weights(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k


def test_save_then_load_is_bit_exact_and_keeps_the_tie(saved):
    folder, model = saved
    loaded = models.from_pretrained(folder)
    assert_same_weights(loaded, model)
    assert loaded.config.to_dict() == {**model.config.to_dict(), "dtype": "float32"} and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_saved_files_use_transformers_names_and_format(saved):
    folder, model = saved
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict()) - {"lm_head.weight"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["dtype"] == "float32"
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]  # no temporary files left


def test_untied_lm_head_round_trips(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = models.from_pretrained(tmp_path)
    assert_same_weights(loaded, model)
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", "torch.float64"])
def test_dtype_is_honoured_by_every_tensor(saved, dtype):
    loaded = models.from_pretrained(saved[0], dtype=dtype, device="cpu")
    expected = loading.resolve_dtype(dtype)
    assert {t.dtype for t in loaded.state_dict().values()} == {expected}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_unprefixed_keys_with_old_mask_buffers_load(saved):
    folder, model = saved
    def strip_prefix_and_add_buffers(tensors):
        for k in list(tensors):
            tensors[k.removeprefix("transformer.")] = tensors.pop(k)
        for i in range(2):
            tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32, dtype=torch.uint8).tril()
            tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    rewrite_weights(folder, strip_prefix_and_add_buffers)
    assert_same_weights(models.from_pretrained(folder), model)


def test_sharded_checkpoint_loads(saved):
    folder, model = saved
    tensors = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for n, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_weights(models.from_pretrained(folder), model)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"),
     r"missing key 'transformer.h.1.mlp.c_fc.bias' \(shape \(64,\)\)"),
    (lambda t: t.update({"transformer.h.0.attn.extra": torch.zeros(3)}),
     r"unexpected key 'transformer.h.0.attn.extra' \(shape \(3,\)\)"),
    (lambda t: t.update({"transformer.wpe.weight": torch.zeros(31, 16)}),
     r"key 'transformer.wpe.weight' has shape \(31, 16\), expected \(32, 16\)"),
    (lambda t: t.update({"transformer.ln_f.bias": torch.zeros(16, dtype=torch.int32)}),
     r"key 'transformer.ln_f.bias' has dtype torch.int32"),
])
def test_mismatched_checkpoint_is_refused_naming_file_and_key(saved, no_assignment, edit, message):
    rewrite_weights(saved[0], edit)
    with pytest.raises(ValueError, match=message) as error:
        models.from_pretrained(saved[0])
    assert "model.safetensors" in str(error.value)


def test_truncated_file_is_refused_naming_it(saved, no_assignment):
    file = saved[0] / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        models.from_pretrained(saved[0])


def test_shard_missing_a_listed_key_is_refused(saved, no_assignment):
    folder = saved[0]
    (folder / "model.safetensors").rename(folder / "part.safetensors")
    index = {"weight_map": {"transformer.ghost": "part.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"part.safetensors: keys listed in the shard index are absent: \['transformer.gh"):
        models.from_pretrained(folder)


def test_pickle_only_folder_is_refused_with_a_way_to_convert(saved, no_assignment):
    folder = saved[0]
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: pickle checkpoints are refused.*save_pretrained"):
        models.from_pretrained(folder)


def test_folder_without_weights_or_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.from_pretrained(tmp_path)


def test_unknown_model_type_is_refused_naming_it(saved, no_assignment):
    config = saved[0] / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"config.json: unknown model_type 'gpt_neox'"):
        models.from_pretrained(saved[0])


def test_t5_without_an_embedding_is_refused_naming_file_and_keys(tmp_path, no_assignment):
    tiny_t5().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda t: [t.pop(k, None) for k in
                                         ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")])
    with pytest.raises(ValueError, match=r"model.safetensors: missing key: a T5 checkpoint needs one of \['shared.weight'"):
        models.from_pretrained(tmp_path)


def test_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    folder, model = saved
    def crash(tensors, path, metadata):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(loading, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny_model(n_layer=1).save_pretrained(folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert_same_weights(models.from_pretrained(folder), model)


@pytest.fixture
def tokenizer_folder(tmp_path):
    """A byte-level BPE tokenizer.json (GPT-2's kind) trained here on a few sentences, appending </s> like T5's."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["low rank adapters", "the lower the rank the fewer the weights", "adapt a model"], trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_tokenizer_round_trips_text_and_pads_batches_on_either_side(tokenizer_folder):
    tok = models.load_tokenizer(tokenizer_folder)
    ids = tok.encode("the lower rank")
    assert ids[-1] == 1 and tok.encode("the lower rank", add_special_tokens=False) == ids[:-1]
    assert tok.decode(ids) == "the lower rank" and tok.decode(torch.tensor(ids)) == "the lower rank"
    batch = tok(["adapt", "the fewer weights"], padding_side="left")
    short = tok.encode("adapt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, len(ids))
    assert batch["input_ids"][0, -len(short):].tolist() == short and batch["attention_mask"][0].sum() == len(short)
    assert (batch["input_ids"][0, : -len(short)] == tok.pad_token_id).all() and tok.pad_token_id == 0
    right = tok(["adapt", "the fewer weights"])
    assert right["input_ids"][0, : len(short)].tolist() == short and right["attention_mask"][0, len(short):].sum() == 0
    with pytest.raises(ValueError, match="padding=True"):
        tok(["adapt", "the fewer weights"], padding=False)


def test_missing_tokenizer_file_or_library_is_reported(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        models.load_tokenizer(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        models.load_tokenizer(tmp_path)


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: c.update(n_layer=-1), ConfigError, "config.json: GPT2Config: n_layer=-1 must be >= 1"),
    (lambda c: c.update(n_layer=3), CheckpointError, "config.json says n_layer=3, the file holds layers 0..1"),
    (lambda c: c.update(n_layer=10 ** 9), CheckpointError, "n_layer=1000000000"),  # refused before building
    (lambda c: c.update(n_embd="16"), ConfigError, "n_embd='16' must be an integer"),
    (lambda c: c.update(n_embd=15), ConfigError, "n_embd=15 is not divisible by n_head=2"),
    (lambda c: c.update(dtype="float33"), ConfigError, "dtype='float33'"),
    (lambda c: c.update(model_type=["gpt2"]), CheckpointError, "unknown model_type"),
])
def test_a_bad_config_json_is_blamed_on_config_json_naming_the_field(saved, no_assignment, edit, error, message):
    config = json.loads((saved[0] / "config.json").read_text())
    edit(config)
    (saved[0] / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=re.escape(message)):
        models.from_pretrained(saved[0])


@pytest.mark.parametrize("file, content, message", [
    ("config.json", "[1, 2]", "config.json: expected a JSON object, got list"),
    ("config.json", '"gpt2"', "config.json: expected a JSON object, got str"),
    ("model.safetensors.index.json", "{nope", "model.safetensors.index.json: not a valid UTF-8 JSON file"),
    ("model.safetensors.index.json", "[]", "model.safetensors.index.json: expected a JSON object"),
])
def test_json_that_is_not_an_object_is_named(saved, no_assignment, file, content, message):
    if file.endswith("index.json"):
        (saved[0] / "model.safetensors").unlink()
    (saved[0] / file).write_text(content)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        models.from_pretrained(saved[0])


@pytest.mark.parametrize("dtype", ["float33", "int8", torch.int64, 3])
def test_a_dtype_that_is_not_a_float_dtype_is_refused(saved, dtype):
    with pytest.raises(ValueError, match="dtype"):
        models.from_pretrained(saved[0], dtype=dtype)


def test_mixed_dtypes_and_duplicate_keys_are_refused(saved, no_assignment):
    rewrite_weights(saved[0], lambda t: t.update({"transformer.ln_f.bias": t["transformer.ln_f.bias"].half()}))
    with pytest.raises(CheckpointError, match="several dtypes.*pass dtype="):
        models.from_pretrained(saved[0])
    rewrite_weights(saved[0], lambda t: t.update({"ln_f.bias": torch.zeros(16)}))
    with pytest.raises(CheckpointError, match="with and without the 'transformer.' prefix"):
        models.from_pretrained(saved[0], dtype=torch.float32)


def test_an_unknown_device_is_named(saved):
    with pytest.raises(ValueError, match="device='nonsense'"):
        models.from_pretrained(saved[0], device="nonsense")
