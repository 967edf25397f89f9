"""The `lowrank` command on tiny checkpoints in tmp_path: finetune (a causal LM, T5, a sequence classifier),
generate, merge (a checkpoint transformers loads, with our merged model's logits), info; bad arguments and bad
files end in one line, not a traceback."""
import json
from dataclasses import replace
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank import models
from examples.common import tiny_gpt2, tiny_t5, write_jsonl
from lowrank.models import word_tokenizer
from lowrank import PeftModel
from lowrank.cli import classifier_config, main


WORDS = "one two three four five positive negative good bad movie is".split()
ROOT = Path(__file__).resolve().parents[1]


def checkpoint(folder, build):
    """A tiny random model saved with a word tokenizer in `folder`."""
    tokenizer = word_tokenizer(WORDS, folder)
    model = build(tokenizer, **({"d_model": 32} if build is tiny_t5 else {"n_embd": 32}))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("gpt2"), tiny_gpt2)


@pytest.fixture(scope="module")
def gpt2_adapter(gpt2_dir, tmp_path_factory):
    """A LoRA adapter trained by `lowrank finetune` on prompt/completion jsonl."""
    out = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(out / "data" / "train.jsonl", [{"prompt": "one two", "completion": "three four"}] * 4)
    assert main(["finetune", str(gpt2_dir), str(data), "--output-dir", str(out), "--r", "4", "--lora-alpha", "16",
                 "--target-modules", "c_attn,c_fc", "--max-steps", "3", "--batch-size", "2", "--lr", "0.05",
                 "--save-steps", "2", "--no-progress", "--device", "cpu"]) == 0
    return out


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `lowrank argv` run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_writes_a_peft_adapter_checkpoints_and_a_log(gpt2_adapter):
    config = json.loads((gpt2_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc"] and config["task_type"] == "CAUSAL_LM"
    tensors = load_file(gpt2_adapter / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)
    assert (gpt2_adapter / "checkpoint-2" / "trainer_state.pt").is_file()
    assert [h["step"] for h in json.loads((gpt2_adapter / "train_log.json").read_text())["history"]] == [1, 2, 3]


def test_finetune_t5_on_csv_reports_eval_loss(tmp_path, capsys):
    model_dir = checkpoint(tmp_path / "t5", tiny_t5)
    data = tmp_path / "cls.csv"
    data.write_text("text,label\nmovie is good,positive\nmovie is bad,negative\n")
    code, out, _ = run(capsys, "finetune", model_dir, data, "--eval-data", data, "--output-dir", tmp_path / "out",
                       "--source-column", "text", "--target-column", "label", "--max-steps", "2", "--no-progress")
    assert code == 0 and "trainable params" in out and "eval_loss=" in out and "perplexity=" in out
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_resume_continues_from_the_latest_checkpoint(gpt2_dir, gpt2_adapter, tmp_path, capsys):
    """The fixture's run saved checkpoint-2 of 3 steps; resuming it ends with the same adapter."""
    data = gpt2_adapter / "data" / "train.jsonl"
    code, _, _ = run(capsys, "finetune", gpt2_dir, data, "--output-dir", tmp_path, "--r", "4", "--lora-alpha", "16",
                     "--target-modules", "c_attn,c_fc", "--max-steps", "3", "--batch-size", "2", "--lr", "0.05",
                     "--no-progress", "--device", "cpu", "--resume", gpt2_adapter / "checkpoint-2")
    assert code == 0
    resumed, whole = (load_file(d / "adapter_model.safetensors") for d in (tmp_path, gpt2_adapter))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.parametrize("method, peft_type, extra", [
    ("prompt", "PROMPT_TUNING", []), ("prefix", "PREFIX_TUNING", []),
    ("ptuning", "P_TUNING", ["--encoder-hidden-size", "16"]),
])
def test_soft_prompt_methods_finetune_generate_and_report(gpt2_dir, gpt2_adapter, tmp_path, capsys, method, peft_type,
                                                          extra):
    code, out, _ = run(capsys, "finetune", gpt2_dir, gpt2_adapter / "data" / "train.jsonl", "--output-dir", tmp_path,
                       "--method", method, "--num-virtual-tokens", "4", "--max-steps", "2", "--no-progress", *extra)
    assert code == 0 and "trainable params" in out
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["num_virtual_tokens"] == 4
    code, out, _ = run(capsys, "generate", gpt2_dir, "--prompt", "one two", "--adapter", tmp_path,
                       "--max-new-tokens", "2")
    assert code == 0 and out.startswith(f"[{tmp_path}] ")
    code, out, _ = run(capsys, "info", tmp_path)
    assert code == 0 and out.startswith(f"adapter: {peft_type}")


def test_generate_with_no_adapter_and_with_two(gpt2_dir, gpt2_adapter, capsys):
    code, out, _ = run(capsys, "generate", gpt2_dir, "--prompt", "one two", "--max-new-tokens", "3")
    assert code == 0 and len(out.split()) == 3 and set(out.split()) <= set(WORDS)
    code, out, _ = run(capsys, "generate", gpt2_dir, "--prompt", "one two", "--adapter", gpt2_adapter,
                       "--adapter", gpt2_adapter, "--max-new-tokens", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(f"[{gpt2_adapter}]")


def test_generate_with_a_lora_and_a_prefix_adapter_gives_one_generation_each(gpt2_dir, gpt2_adapter, tmp_path,
                                                                            capsys):
    data = gpt2_adapter / "data" / "train.jsonl"
    assert run(capsys, "finetune", gpt2_dir, data, "--output-dir", tmp_path, "--method", "prefix",
               "--num-virtual-tokens", "4", "--max-steps", "2", "--no-progress")[0] == 0
    code, out, err = run(capsys, "generate", gpt2_dir, "--prompt", "one two", "--adapter", gpt2_adapter,
                         "--adapter", tmp_path, "--adapter", gpt2_adapter, "--max-new-tokens", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3, err
    assert [line.split("] ")[0] for line in lines] == [f"[{gpt2_adapter}", f"[{tmp_path}", f"[{gpt2_adapter}"]
    assert lines[0] == lines[2]  # the LoRA adapter gives the same tokens after the prefix adapter was unloaded


def test_generate_samples_with_top_k_and_top_p_reproducibly(gpt2_dir, capsys):
    argv = ["generate", gpt2_dir, "--prompt", "one two", "--max-new-tokens", "6", "--temperature", "3", "--seed", "1"]
    greedy = run(capsys, *argv)
    assert greedy[0] == 0 and run(capsys, *argv, "--do-sample", "--top-k", "1") == greedy  # k=1 leaves the argmax
    assert run(capsys, *argv, "--do-sample", "--top-p", "1e-6") == greedy  # so does the smallest mass
    sampled = run(capsys, *argv, "--do-sample", "--top-k", "5", "--top-p", "0.95")
    assert sampled[0] == 0 and sampled == run(capsys, *argv, "--do-sample", "--top-k", "5", "--top-p", "0.95")


def test_finetune_refuses_to_overwrite_an_earlier_run_unless_told(gpt2_dir, gpt2_adapter, tmp_path, capsys):
    data = gpt2_adapter / "data" / "train.jsonl"
    argv = ["finetune", gpt2_dir, data, "--output-dir", tmp_path, "--r", "2", "--max-steps", "1", "--no-progress"]
    assert run(capsys, *argv)[0] == 0
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    code, _, err = run(capsys, *argv, "--lr", "0.5")
    assert code == 1 and "already holds adapter_config.json" in err and "--overwrite" in err
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert run(capsys, *argv, "--lr", "0.5", "--overwrite")[0] == 0
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != before


def test_merge_writes_a_checkpoint_transformers_loads_with_equal_logits(gpt2_dir, gpt2_adapter, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    code, _, _ = run(capsys, "merge", gpt2_dir, gpt2_adapter, tmp_path / "merged")
    assert code == 0 and (tmp_path / "merged" / "tokenizer.json").is_file()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    ours = PeftModel.from_pretrained(models.from_pretrained(gpt2_dir), gpt2_adapter).merge_and_unload()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    base = models.from_pretrained(gpt2_dir)
    assert not torch.allclose(base(ids).logits, ours(ids).logits)


def test_info_prints_config_and_parameter_counts(gpt2_dir, gpt2_adapter, capsys):
    code, out, _ = run(capsys, "info", gpt2_adapter)
    tensors = load_file(gpt2_adapter / "adapter_model.safetensors")
    count = sum(t.numel() for t in tensors.values())
    assert code == 0 and out.startswith("adapter: LORA (LoraConfig)")
    assert f"adapter_model.safetensors: {len(tensors)} tensors, {count:,d} parameters (F32)" in out
    code, out, _ = run(capsys, "info", gpt2_dir)
    model = models.from_pretrained(gpt2_dir)
    assert code == 0 and out.startswith("model: gpt2 (GPT2LMHeadModel)")
    assert f"{sum(p.numel() for p in model.parameters()):,d} parameters" in out


@pytest.mark.parametrize("argv, message", [
    (["finetune", "{model}", "{tmp}/missing.jsonl", "--output-dir", "{tmp}"], "missing.jsonl: data file not found"),
    (["finetune", "{model}", "{tmp}/empty.jsonl", "--output-dir", "{tmp}"], "empty.jsonl: empty file"),
    (["finetune", "{model}", "{tmp}/empty.jsonl", "--output-dir", "{tmp}", "--method", "prompt", "--r", "4"],
     "--r does not apply to --method prompt"),
    (["finetune", "{model}", "{tmp}/empty.jsonl", "--output-dir", "{tmp}", "--method", "prompt", "--r", "4",
      "--use-rslora"], "--r, --use-rslora do not apply to --method prompt"),
    (["finetune", "{model}", "{tmp}/empty.jsonl", "--output-dir", "{tmp}", "--batch-size", "0"], "batch_size=0"),
    (["finetune", "{tmp}", "{tmp}/empty.jsonl", "--output-dir", "{tmp}"], "no config.json"),
    (["merge", "{model}", "{tmp}", "{tmp}/out"], "no adapter config"),
    (["info", "{tmp}"], "neither adapter_config.json"),
    (["info", "{tmp}/broken"], "model.safetensors: not a readable safetensors file"),
    (["generate", "{tmp}/badtok", "--prompt", "one"], "tokenizer.json: not a readable tokenizer.json"),
    (["generate", "{model}", "--prompt", ""], "--prompt '' encodes to no tokens"),
    (["finetune", "{model}", "{tmp}/empty.jsonl", "--output-dir", "{tmp}", "--method", "prompt",
      "--num-virtual-tokens", "8", "--max-length", "32"], "--max-length 32 does not fit: the model holds n_positions=32"),
    (["info", "{tmp}/badadapter"], "badadapter/adapter_config.json: expected a JSON object, got list"),
    (["info", "{tmp}/badadapter2"], "badadapter2/adapter_config.json: LoraConfig: use_rslora='false' must be true"),
    (["finetune", "{tmp}/badconfig", "{tmp}/empty.jsonl", "--output-dir", "{tmp}/o"],
     "badconfig/config.json: GPT2Config: n_embd=33 is not divisible by n_head=4"),
    (["generate", "{model}", "--prompt", "one", "--adapter", "{tmp}/badadapter"], "expected a JSON object"),
    *([] if torch.cuda.is_available() else
      [(["generate", "{model}", "--prompt", "one", "--device", "cuda"], "--device cuda: no CUDA device is available")]),
])
def test_bad_files_and_values_give_one_line_and_exit_1(gpt2_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty.jsonl").write_text("")
    for name, weights in [("broken", slice(0, 1000)), ("badtok", slice(None))]:  # a cut-short checkpoint;
        folder = tmp_path / name  # a good one beside an unreadable tokenizer.json
        folder.mkdir()
        (folder / "config.json").write_text((gpt2_dir / "config.json").read_text())
        (folder / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes()[weights])
        (folder / "tokenizer.json").write_text("{not json")
    for name, config in [("badadapter", []), ("badadapter2", {"peft_type": "LORA", "use_rslora": "false"})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "badconfig").mkdir()
    config = json.loads((gpt2_dir / "config.json").read_text())
    (tmp_path / "badconfig" / "config.json").write_text(json.dumps({**config, "n_embd": 33}))
    code, out, err = run(capsys, *(a.format(model=gpt2_dir, tmp=tmp_path) for a in argv))
    assert code == 1 and out == "" and err.count("\n") == 1 and message in err
    assert err.startswith(f"lowrank {argv[0]}: error: ")


REVIEWS = [{"text": "movie is good", "label": "good"}, {"text": "movie is bad", "label": "bad"},
           {"text": "good good movie", "label": "good"}, {"text": "bad movie is bad", "label": "bad"}]


def test_finetune_seq_cls_trains_a_classifier_adapter_and_reports_accuracy(gpt2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    with pytest.warns(UserWarning, match=r"GPT2LMHeadModel checkpoint loaded as GPT2ForSequenceClassification: "
                                         r"\['score.weight'\] newly initialised"):
        code, out, err = run(capsys, "finetune", gpt2_dir, data, "--eval-data", data, "--task", "seq-cls",
                             "--output-dir", tmp_path / "out", "--max-steps", "4", "--batch-size", "2",
                             "--lr", "0.05", "--no-progress")
    assert code == 0, err
    assert "classes: 0=bad 1=good" in out and "eval_loss=" in out and "accuracy=" in out and "perplexity" not in out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert load_file(tmp_path / "out" / "adapter_model.safetensors")
    history = json.loads((tmp_path / "out" / "train_log.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and 0 <= history[-1]["accuracy"] <= 1


def test_info_shows_a_classification_checkpoints_head(tmp_path, capsys):
    torch.manual_seed(0)
    config = models.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=16, n_positions=8, pad_token_id=0)
    labels = {"id2label": {"0": "bad", "1": "good"}, "label2id": {"bad": 0, "good": 1}}
    models.GPT2ForSequenceClassification(replace(config, extra=labels)).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "info", tmp_path)
    assert code == 0 and out.startswith("model: gpt2 (GPT2ForSequenceClassification)")
    assert out.endswith("head: score.weight [2, 32], 2 labels: bad, good\n")


@pytest.mark.parametrize("rows, eval_rows, message", [
    (REVIEWS, REVIEWS[:1] + [{"text": "movie", "label": "meh"}],
     "eval.jsonl, line 2, column 'label': label 'meh' is not one of the 2 known labels ['bad', 'good']"),
    (REVIEWS[:2] + [{"text": "movie"}], None, "train.jsonl, line 3: missing column 'label' (found ['text'])"),
    (REVIEWS[::2], None, "train.jsonl: one class only ('good' in column 'label' on every line)"),
    (REVIEWS, "t5", "--task seq-cls: {t5} is an encoder-decoder model (T5), which has no sequence classification head"),
])
@pytest.mark.filterwarnings("ignore:.*newly initialised:UserWarning")
def test_bad_classification_inputs_give_one_line_naming_them(gpt2_dir, tmp_path, capsys, rows, eval_rows, message):
    model_dir = checkpoint(tmp_path / "t5", tiny_t5) if eval_rows == "t5" else gpt2_dir
    extra = ["--eval-data", write_jsonl(tmp_path / "eval.jsonl", eval_rows)] if isinstance(eval_rows, list) else []
    code, out, err = run(capsys, "finetune", model_dir, write_jsonl(tmp_path / "train.jsonl", rows), *extra,
                         "--task", "seq-cls", "--output-dir", tmp_path / "out", "--max-steps", "1", "--no-progress")
    assert code == 1 and out == "" and message.format(t5=model_dir) in err and err.count("\n") == 1


def test_a_classifier_without_a_pad_token_pads_with_eos_and_says_so(capsys):
    config = models.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=16, eos_token_id=None, pad_token_id=None)
    tokenizer = SimpleNamespace(pad_token_id=None, eos_token_id=3)
    labelled = classifier_config(config, ("bad", "good"), tokenizer)
    assert labelled.pad_token_id == 3 and labelled.num_labels == 2
    assert labelled.extra["label2id"] == {"bad": 0, "good": 1}
    assert "padding with the eos token (id 3)" in capsys.readouterr().err
    assert classifier_config(replace(config, pad_token_id=5), ("bad", "good"), tokenizer).pad_token_id == 5
    with pytest.raises(ValueError, match="set no pad token"):
        classifier_config(config, ("bad", "good"), SimpleNamespace(pad_token_id=None, eos_token_id=None))


@pytest.mark.parametrize("argv", [[], ["finetune"], ["train", "x"], ["info", "a", "b"], ["generate", "m"],
                                  ["finetune", "m", "d", "--output-dir", "o", "--r", "four"],
                                  ["generate", "m", "--prompt", "x", "--max-new-tokens", "-1"],
                                  ["finetune", "m", "d", "--output-dir", "o", "--max-length", "0"],
                                  ["finetune", "m", "d", "--output-dir", "o", "--task", "cls"]])
def test_bad_arguments_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "usage: lowrank" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_too(gpt2_dir, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something\ninside broke")
    monkeypatch.setattr(models, "from_pretrained", broken)
    code, out, err = run(capsys, "generate", gpt2_dir, "--prompt", "one")
    assert code == 1 and err == "lowrank generate: error: RuntimeError: something inside broke\n"
    monkeypatch.setenv("LOWRANK_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["generate", str(gpt2_dir), "--prompt", "one"])


@pytest.mark.parametrize("module", ["lowrank", "lowrank.cli"])
def test_python_dash_m_prints_usage_in_a_real_process(module, tmp_path):
    """Both entry points (torchrun -m lowrank.cli launches DDP runs), run outside the checkout."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: lowrank")
    assert all(c in result.stdout for c in ("finetune", "generate", "merge", "info"))
