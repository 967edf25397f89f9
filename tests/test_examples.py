"""Every example runs with --smoke in seconds, writes its loss-curve PNG, and keeps the promises it prints
that do not depend on training long: base weights untouched, adapters that reload exactly, merged and
mixed-batch outputs equal to the plain ones."""
import pytest

from examples import causal_lm, complaints, digits, instruct, multi_task, sentiment, seq2seq



def smoke(module, tmp_path, png):
    result = module.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / png).stat().st_size > 1000
    return result


def test_digits(tmp_path):
    result = smoke(digits, tmp_path, "digits_loss.png")
    assert result["base_unchanged"] and result["disabled_equals_base"]
    assert result["worst"] == int(result["before"].argmax())


def test_causal_lm(tmp_path):
    result = smoke(causal_lm, tmp_path, "causal_lm_loss.png")
    assert result["reload_equal"] and result["merge_diff"] < 1e-4
    assert result["eval_loss"] < result["eval_loss_before"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_seq2seq(tmp_path):
    result = smoke(seq2seq, tmp_path, "seq2seq_loss.png")
    assert set(result["accuracy_after"]) == {"LoRA (q, v, r=8)", "prompt tuning (16 tokens)"}


def test_multi_task(tmp_path):
    result = smoke(multi_task, tmp_path, "multi_task_loss.png")
    assert result["base_unchanged"] and result["mixed_diff"] < 1e-5 and len(result["mixed"]) == 3


def test_sentiment(tmp_path):
    result = smoke(sentiment, tmp_path, "sentiment_loss.png")
    assert result["reload_equal"] and 0 <= result["accuracy_after"] <= 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_complaints(tmp_path):
    result = smoke(complaints, tmp_path, "complaints_loss.png")
    assert result["reload_equal"] and 0 <= result["accuracy_init"] <= 1
    assert (tmp_path / "prompt" / "adapter_model.safetensors").is_file()


def test_instruct(tmp_path):
    result = smoke(instruct, tmp_path, "instruct_loss.png")
    assert result["reload_equal"] and result["merge_diff"] < 1e-4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
