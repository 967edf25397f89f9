"""Sequence classification on its own: which token the score reads, label checks, and every PEFT method
with task_type SEQ_CLS training the score head and saving it (transformers/peft agreement: tests/interop)."""
import pytest
import torch

import lowrank
from lowrank import models

from .helpers import assert_close_rel, train_steps

PAD = 0


def classifier(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, pad_token_id=PAD)
    return models.GPT2ForSequenceClassification(models.GPT2Config(**{**config, **overrides}).with_labels(3)).eval()


def test_the_score_is_read_at_the_last_real_token_for_either_padding():
    model = classifier()
    row = torch.randint(1, 63, (1, 5))
    alone = model(row).logits
    right = torch.cat([row, torch.full((1, 3), PAD)], dim=1)
    left = torch.cat([torch.full((1, 3), PAD), row], dim=1)
    with torch.no_grad():
        assert_close_rel(model(right, attention_mask=(right != PAD).long()).logits, alone)
        positions = (torch.arange(8) - 3).clamp(min=0)[None]  # GPT-2's absolute positions, as a padded generate
        assert_close_rel(model(left, attention_mask=(left != PAD).long(), position_ids=positions).logits, alone)
        unpadded = classifier(pad_token_id=63)  # same weights; 63 is nowhere in `right`: reads the last column
        assert not torch.allclose(unpadded(right).logits, alone)


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0, 3]), "outside the 3 labels"),
    (torch.tensor([[0], [1]]), r"\(2,\) integer class ids"),
    (torch.tensor([0.5, 1.0]), r"multi_label_classification have shape \(2,\), expected \(2, 3\)"),
    ([0, 1], "labels must be a torch.Tensor"),
])
def test_bad_labels_are_named(labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        classifier()(torch.ones(2, 4, dtype=torch.long), labels=labels)


def test_a_batch_without_a_pad_token_id_is_refused():
    model = classifier(pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        model(torch.ones(2, 4, dtype=torch.long))
    assert model(torch.ones(1, 4, dtype=torch.long)).logits.shape == (1, 3)


def test_problem_type_and_id2label_are_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="problem_type='ranking'"):
        models.GPT2Config(extra={"problem_type": "ranking"})
    with pytest.raises(ValueError, match="id2label="):
        models.GPT2Config(extra={"id2label": {"1": "a", "2": "b"}})
    assert models.GPT2Config().with_labels(5).num_labels == 5 and models.GPT2Config().num_labels == 2


METHODS = {
    "lora": lowrank.LoraConfig(task_type="SEQ_CLS", r=2),
    "prompt-tuning": lowrank.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    "prefix": lowrank.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    "p-tuning": lowrank.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_the_score_head_and_saves_it(method, tmp_path):
    ids = torch.randint(1, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    ids[0, 4:] = PAD
    mask, labels = (ids != PAD).long(), torch.tensor([0, 1, 2, 1])
    model = lowrank.get_peft_model(classifier(), METHODS[method])
    assert "score" in model.peft_config["default"].modules_to_save
    train_steps(model, 5, 1e-2, input_ids=ids, attention_mask=mask, labels=labels)
    wrapper = model.get_base_model().score
    assert not torch.equal(wrapper.modules_to_save["default"].weight, wrapper.original_module.weight)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        model.save_pretrained(tmp_path)
        loaded = lowrank.PeftModel.from_pretrained(classifier(), tmp_path)
        assert_close_rel(loaded(ids, attention_mask=mask).logits, expected)
        with loaded.disable_adapter():
            assert_close_rel(loaded(ids, attention_mask=mask).logits, classifier()(ids, attention_mask=mask).logits)
        plain = loaded.unload()
        assert isinstance(plain.score, torch.nn.Linear)
