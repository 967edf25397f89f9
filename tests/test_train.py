"""The training loop on the tiny GPT-2 and T5: the loss falls, only the adapter moves, accumulated
micro-batches equal one big batch, a resumed run ends bit for bit where an uninterrupted one does, and a
sequence classifier trains on class ids and is evaluated by accuracy."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowrank import LoraConfig, PromptTuningConfig, get_peft_model, models
from lowrank.errors import CheckpointError
from lowrank.train import Trainer, TrainingConfig, lr_factor, train

from .helpers import assert_close_rel, tiny_gpt2, tiny_t5


def examples(n, seed=0, prompt=3):
    """n causal-LM examples of 5..10 random tokens, the first `prompt` of them masked out of the loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 64, (int(torch.randint(5, 11, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def peft_gpt2(dropout=0.0, model_dropout=0.1):
    """LoRA on a tiny GPT-2; dropout is LoRA's, model_dropout the base model's (active in training)."""
    base = tiny_gpt2(resid_pdrop=model_dropout, embd_pdrop=model_dropout, attn_pdrop=model_dropout)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                  target_modules=["c_attn", "c_fc"]))


def prompt_gpt2(model_dropout=0.1):
    """Prompt tuning (3 virtual tokens) on a tiny GPT-2: its labels get 3 leading -100s inside the model."""
    base = tiny_gpt2(resid_pdrop=model_dropout, embd_pdrop=model_dropout, attn_pdrop=model_dropout)
    return get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))


def class_examples(n, seed=0):
    """n classification examples: 2..7 random tokens (never the pad id 0) and a class id of 3."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 64, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist(),
             "labels": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(n)]


def classifier(seed=0):
    """A tiny GPT2ForSequenceClassification over 3 classes, without dropout, padded with id 0."""
    torch.manual_seed(seed)
    return models.GPT2ForSequenceClassification(models.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, pad_token_id=0, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0).with_labels(3)).eval()


def config(**overrides):
    return TrainingConfig(**{"batch_size": 4, "learning_rate": 1e-2, "progress": False, "device": "cpu", **overrides})


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def without_timings(history):
    return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]


def test_the_progress_bar_draws_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    """Under pytest stderr is no terminal, like a log file: progress=True must write no bar there."""
    run = lambda: Trainer(peft_gpt2(), config(max_steps=3, progress=True, output_dir=str(tmp_path)), examples(4)).train()
    run()
    assert "train:" not in capsys.readouterr().err
    monkeypatch.setattr(type(__import__("sys").stderr), "isatty", lambda self: True, raising=False)
    run()
    assert "train: 100%" in capsys.readouterr().err  # the bar itself still works where it can be seen


@pytest.mark.parametrize("make", [peft_gpt2, lambda: get_peft_model(tiny_t5(), LoraConfig(r=4))], ids=["gpt2", "t5"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(make):
    data = examples(4)
    trainer = Trainer(make(), config(max_steps=15, learning_rate=5e-2, lr_scheduler_type="constant"), data, eval_data=data)
    before = trainer.evaluate()
    after = trainer.train()
    assert after["eval_loss"] < before["eval_loss"] - 0.3
    assert after["perplexity"] == pytest.approx(torch.tensor(after["eval_loss"]).exp().item())
    assert [h["step"] for h in trainer.history] == list(range(1, 16))


def test_only_adapter_parameters_change():
    model = peft_gpt2()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = trainable(model)
    assert adapter and all(".lora_" in n for n in adapter)
    train(model, examples(8), config(max_steps=3))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if ".lora_B." in n)


@pytest.mark.parametrize("make, prompt", [(peft_gpt2, 3), (peft_gpt2, 0), (prompt_gpt2, 0)],
                         ids=["lora-completion", "lora-text", "prompt-tuning-text"])
def test_accumulated_micro_batches_equal_one_big_batch(make, prompt):
    """k = 2 micro-batches of 2 and one batch of 4 (the same 4 examples, padded differently) give the same
    step. eps = lr = 1e3 makes Adam's first step ~ the gradient itself, so the comparison is of gradients.
    With a prepended soft prompt every original label counts (no shift), which the weights must know."""
    data = examples(4, prompt=prompt)
    adam_as_sgd = dict(max_steps=1, learning_rate=1e3, adam_epsilon=1e3, max_grad_norm=None)
    start = trainable(make(model_dropout=0.0))
    one = train(make(model_dropout=0.0), data, config(batch_size=4, **adam_as_sgd)).model
    two = train(make(model_dropout=0.0), data, config(batch_size=2, gradient_accumulation_steps=2,
                                                      **adam_as_sgd)).model
    for (name, a), b in zip(trainable(one).items(), trainable(two).values()):
        assert_close_rel(b - start[name], a - start[name], rtol=1e-4)
    assert any(not torch.equal(a, start[n]) for n, a in trainable(one).items())


@pytest.mark.parametrize("make", [peft_gpt2, prompt_gpt2], ids=["lora", "prompt-tuning"])
def test_eval_loss_does_not_depend_on_the_batch_size(make):
    model, data = make(), examples(5, prompt=0)
    losses = [Trainer(model, config(batch_size=b), data, data).evaluate()["eval_loss"] for b in (1, 2, 5)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(losses[2], rel=1e-5)


def test_resume_equals_uninterrupted_training_bit_for_bit(tmp_path):
    """Dropout, shuffling over several epochs, accumulation and warm-up: everything the state must carry."""
    data = examples(10)
    opts = dict(max_steps=6, batch_size=3, gradient_accumulation_steps=2, warmup_steps=2, save_steps=3,
                lr_scheduler_type="cosine")
    whole = train(peft_gpt2(dropout=0.2), data, config(output_dir=str(tmp_path / "a"), **opts))
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainable.safetensors", "trainer_state.pt",
            "rng_state_0.pt"} <= {p.name for p in checkpoint.iterdir()}

    resumed = Trainer(peft_gpt2(dropout=0.2), config(output_dir=str(tmp_path / "b"), **opts), data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(trainable(whole.model).items(), trainable(resumed.model).values()):
        assert torch.equal(a, b), name
    assert without_timings(resumed.history) == without_timings(whole.history)
    saved = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(t, whole.model.adapter_tensors("default")[k]) for k, t in saved.items())
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == list(range(1, 7))


def test_resume_latest_and_bad_checkpoints_are_refused(tmp_path):
    data = examples(6)
    train(peft_gpt2(), data, config(output_dir=str(tmp_path), max_steps=4, save_steps=2))
    (tmp_path / "checkpoint-best").mkdir()  # not a step: ignored
    (tmp_path / "checkpoint-9").mkdir()  # a save cut short: incomplete, skipped
    (tmp_path / "checkpoint-9" / "trainable.safetensors").write_bytes(b"")
    trainer = Trainer(peft_gpt2(), config(output_dir=str(tmp_path), max_steps=4), data)
    assert trainer._resolve_checkpoint("latest").name == "checkpoint-2"
    other = Trainer(get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"])),
                    config(max_steps=4), data)
    with pytest.raises(ValueError, match="trainable.safetensors: does not match"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    reordered = Trainer(peft_gpt2(), config(output_dir=str(tmp_path), max_steps=4, batch_size=2, seed=1), data)
    before = trainable(reordered.model)
    with pytest.raises(ValueError, match="orders the data.*batch_size 4 -> 2, seed 0 -> 1"):
        reordered.train(resume_from_checkpoint="latest")
    assert all(torch.equal(p, before[n]) for n, p in trainable(reordered.model).items())


@pytest.mark.parametrize("name, cut", [("trainable.safetensors", 100), ("trainer_state.pt", 100),
                                       ("rng_state_0.pt", 50), ("trainer_state.pt", 0)])
def test_a_truncated_checkpoint_file_is_named_and_nothing_changes(tmp_path, name, cut):
    data = examples(6)
    train(peft_gpt2(), data, config(output_dir=str(tmp_path), max_steps=4, save_steps=2))
    file = tmp_path / "checkpoint-2" / name
    file.write_bytes(file.read_bytes()[:cut])
    trainer = Trainer(peft_gpt2(), config(max_steps=4), data)
    before = trainable(trainer.model)
    with pytest.raises(CheckpointError, match=f"checkpoint-2/{name}: not a readable"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.step == 0 and all(torch.equal(p, before[n]) for n, p in trainable(trainer.model).items())


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=0), "batch_size=0"), (dict(batch_size=True), "batch_size=True must be an integer"),
    (dict(learning_rate="1e-3"), "learning_rate='1e-3' must be a number"), (dict(shuffle="no"), "shuffle='no'"),
    (dict(warmup_steps=-1), "warmup_steps=-1 must be >= 0"), (dict(learning_rate=float("nan")), "learning_rate=nan"), (dict(lr_scheduler_type="step"), "lr_scheduler_type='step'"),
    (dict(mixed_precision="fp8"), "mixed_precision='fp8'"), (dict(num_epochs=0), "num_epochs=0"),
])
def test_bad_training_config_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**bad)


def test_fp16_mixed_precision_on_cpu_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="mixed_precision='fp16' needs a CUDA device"):
        Trainer(peft_gpt2(), config(mixed_precision="fp16"), examples(2))


def test_bf16_autocast_gives_the_fp32_loss_and_adapter_gradients():
    """One batch through LoRA (dropout on, the same seed) in fp32 and under CPU bf16 autocast: the loss and
    the fp32 adapters' gradients agree to bf16's precision (relative to the largest gradient)."""
    model = peft_gpt2(dropout=0.1, model_dropout=0.0).train()
    with torch.no_grad():  # B = 0 at init would leave A's gradient zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(p.numel()))
    batch = Trainer(model, config(max_steps=1), examples(4))._batch(examples(4))
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        grads[precision] = (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (loss32, grads32), (loss16, grads16) = grads["fp32"], grads["bf16"]
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for name, g in grads16.items():
        assert g.dtype == torch.float32 and g.abs().max() > 0
        assert_close_rel(g, grads32[name], rtol=3e-2, scale=grads32[name].abs().max().item())


def test_bf16_autocast_training_on_cpu_tracks_the_fp32_losses():
    losses = {}
    for precision in (None, "bf16"):
        trainer = Trainer(peft_gpt2(dropout=0.1, model_dropout=0.0),
                          config(max_steps=6, mixed_precision=precision, learning_rate=1e-2), examples(8))
        trainer.train()
        losses[precision] = [h["loss"] for h in trainer.history]
    assert losses["bf16"][-1] < losses["bf16"][0]
    np.testing.assert_allclose(losses["bf16"], losses[None], rtol=2e-2)


def test_schedules_warm_up_then_decay_to_zero():
    assert [lr_factor(s, "linear", 2, 6) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = [lr_factor(s, "cosine", 0, 4) for s in range(5)]
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5) and cosine[4] == pytest.approx(0.0)
    assert lr_factor(5, "constant", 2, 6) == 1.0


@pytest.mark.parametrize("bad, message", [
    (dict(adam_epsilon=0.0), "adam_epsilon=0.0 must be > 0"), (dict(adam_beta1=1.5), "adam_beta1=1.5"),
    (dict(max_grad_norm=0.0), "max_grad_norm=0.0"), (dict(seed=2 ** 70), "seed="),
    (dict(device="nonsense"), "device='nonsense'"),
])
def test_bad_optimizer_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**bad)


def test_a_state_that_does_not_load_leaves_the_optimizer_and_model_as_they_were(tmp_path):
    data = examples(6)
    train(peft_gpt2(), data, config(output_dir=str(tmp_path), max_steps=4, save_steps=2))
    state = torch.load(tmp_path / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    torch.save({**state, "scheduler": {}}, tmp_path / "checkpoint-2" / "trainer_state.pt")
    trainer = Trainer(peft_gpt2(), config(max_steps=4), data)
    optimizer, before = trainer.optimizer.state_dict(), trainable(trainer.model)
    with pytest.raises(CheckpointError, match="the scheduler state does not load"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.optimizer.state_dict() == optimizer and trainer.step == 0
    assert all(torch.equal(p, before[n]) for n, p in trainable(trainer.model).items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .partial or .old folder left


@pytest.mark.parametrize("data, message", [
    ("text", "train_data must be a non-empty list"), ([{"input_ids": [1, 2]}], r"train_data\[0\]\['labels'\]"),
    ([{"input_ids": "ab", "labels": [1]}], r"train_data\[0\]\['input_ids'\]"),
])
def test_bad_training_data_is_named(data, message):
    with pytest.raises(ValueError, match=message):
        Trainer(peft_gpt2(), config(max_steps=1), data)


def test_classifier_eval_reports_accuracy_and_loss_against_a_hand_count():
    """Batches of 3 padded on the right give, row by row, what each example gives alone."""
    model, data = classifier(), class_examples(7)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])) for e in data]
    correct = sum(int(out.logits.argmax(-1)) == e["labels"] for out, e in zip(alone, data))
    assert 0 < correct < len(data)  # a count that a wrong padding or argmax axis would change
    metrics = Trainer(model, config(batch_size=3), data, data).evaluate()
    assert metrics.keys() == {"eval_loss", "accuracy"}
    assert metrics["accuracy"] == correct / len(data)
    assert metrics["eval_loss"] == pytest.approx(sum(out.loss.item() for out in alone) / len(data), rel=1e-5)


def test_lora_on_a_classifier_learns_its_classes():
    data = class_examples(6)
    model = get_peft_model(classifier(), LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"))
    trainer = Trainer(model, config(max_steps=30, learning_rate=5e-2, lr_scheduler_type="constant", batch_size=3),
                      data, eval_data=data)
    before = trainer.evaluate()
    after = trainer.train()
    assert after["eval_loss"] < before["eval_loss"] and after["accuracy"] == 1.0


def test_accumulated_classifier_micro_batches_weigh_each_example_once():
    """3 examples as micro-batches of 2 and 1 (k = 2) or as one batch: each example weighs 1/3 either way."""
    data, adam_as_sgd = class_examples(3), dict(max_steps=1, learning_rate=1e3, adam_epsilon=1e3, max_grad_norm=None)
    start = trainable(classifier())
    one = train(classifier(), data, config(batch_size=3, **adam_as_sgd)).model
    two = train(classifier(), data, config(batch_size=2, gradient_accumulation_steps=2, **adam_as_sgd)).model
    for (name, a), b in zip(trainable(one).items(), trainable(two).values()):
        assert_close_rel(b - start[name], a - start[name], rtol=1e-4)


@pytest.mark.parametrize("make, kwargs, message", [
    (classifier, dict(pad_token_id=5), "pad_token_id=5, but the classifier reads .* config.pad_token_id=0"),
    (lambda: get_peft_model(classifier(), PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS")), {},
     "batch_size=4: behind a soft prompt"),
    (classifier, dict(eval_data=examples(2)), "eval_data are token-label examples, train_data classification ones"),
    (classifier, dict(train_data=class_examples(2) + examples(1)), r"train_data\[2\]\['labels'\] must be a class id"),
    (classifier, dict(train_data=[{"input_ids": [1], "labels": -1}]),
     r"train_data\[0\]\['labels'\] must be a class id >= 0"),
])
def test_classification_data_the_classifier_would_misread_is_refused(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(make(), config(max_steps=1), **{"train_data": class_examples(2), **kwargs})
