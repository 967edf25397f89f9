"""Sequence classification against transformers and peft 0.21 on random tiny decoders: the score head's
logits and losses, LoRA SEQ_CLS adapters (with the trained `score` copy, modules_to_save) both ways, and
peft's prompt tuning and P-tuning SEQ_CLS adapters loaded here (docs/formats.md A.6, C.6, D.4). (peft 0.21's prefix
tuning refuses transformers 5's classifiers, whose forward calls the cache `cache`: ours is checked alone,
in tests/test_seq_cls.py.)"""
import json
import warnings

import pytest
import torch

import lowrank
from lowrank import models

from ..helpers import assert_close_rel, train_steps

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB, PAD, LABELS = 64, 0, 3
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64),
    "gpt_neo": lambda: transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=VOCAB,
                                                 attention_types=[[["global", "local"], 1]], window_size=4,
                                                 max_position_embeddings=64),
    "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
}
RTOL = 1e-4


def hf_classifier(kind, num_labels=LABELS):
    torch.manual_seed(0)
    config = CONFIGS[kind]()
    config.num_labels, config.pad_token_id = num_labels, PAD
    config.bos_token_id = config.eos_token_id = VOCAB - 1
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def padded(lengths, side: str, seed=0):
    """(input_ids, attention_mask) with PAD on the given side; real tokens are never PAD."""
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    columns = torch.arange(width)
    real = columns >= width - torch.tensor(lengths)[:, None] if side == "left" else columns < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~real, PAD), real.long()


@pytest.fixture(params=sorted(CONFIGS))
def saved(request, tmp_path):
    """(kind, transformers' classifier, the folder it saved)."""
    hf = hf_classifier(request.param)
    hf.save_pretrained(tmp_path / "base")
    return request.param, hf, tmp_path


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_equal_transformers_on_padded_batches(saved, side):
    kind, hf, tmp = saved
    ours = models.from_pretrained(tmp / "base")
    assert type(ours).__name__ == type(hf).__name__ and ours.config.num_labels == LABELS
    ids, mask = padded([5, 9, 2], side)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask).logits
        assert logits.shape == (3, LABELS)
        assert_close_rel(logits, hf(ids, attention_mask=mask).logits, rtol=RTOL)


@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression"])
def test_loss_follows_transformers_problem_type(saved, problem, tmp_path):
    kind, _, _ = saved
    hf = hf_classifier(kind, num_labels=1 if problem == "regression" else LABELS)
    hf.save_pretrained(tmp_path / problem)
    ours = models.from_pretrained(tmp_path / problem)
    ids, mask = padded([6, 4, 7, 3], "right", seed=1)
    labels = {"single_label_classification": torch.tensor([0, 2, 1, 2]),
              "multi_label_classification": (torch.rand(4, LABELS) > 0.5).float(),
              "regression": torch.randn(4)}[problem]
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=labels).loss
        assert hf.config.problem_type == problem  # the choice transformers made from num_labels and dtype
        assert_close_rel(ours(ids, attention_mask=mask, labels=labels).loss, theirs, rtol=RTOL)


def test_a_causal_lm_checkpoint_loads_for_seq_cls_with_a_new_score_head(saved, tmp_path):
    kind, hf, _ = saved
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()
    lm.save_pretrained(tmp_path / "lm")
    with pytest.warns(UserWarning, match=r"\['score.weight'\] newly initialised"):
        ours = models.from_pretrained(tmp_path / "lm", task_type="SEQ_CLS", num_labels=4)
    assert ours.score.weight.shape == (4, lm.config.hidden_size) and ours.score.weight.std() > 0
    body = getattr(lm, ours.base_model_prefix)
    assert torch.equal(ours.get_input_embeddings().weight, body.get_input_embeddings().weight)


@torch.no_grad()
def perturb_trainable(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def lora_config(**overrides):
    return dict(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False, **overrides)


def test_peft_lora_seq_cls_adapter_loads_here_with_its_score_head(saved):
    kind, hf, tmp = saved
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**lora_config()))
    perturb_trainable(theirs)  # the score copy moves off the base head: the file must carry it
    theirs.save_pretrained(tmp / "adapter")
    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(tmp / "base"), tmp / "adapter")
    ids, mask = padded([7, 3], "right", seed=2)
    with torch.no_grad():
        assert_close_rel(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits, rtol=RTOL)
    assert ours.get_nb_trainable_parameters() == (0, theirs.get_nb_trainable_parameters()[1])


def test_our_trained_lora_seq_cls_adapter_loads_in_peft(saved):
    kind, hf, tmp = saved
    ours = lowrank.get_peft_model(models.from_pretrained(tmp / "base"), lowrank.LoraConfig(**lora_config()))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "base_model.model.score.modules_to_save.default.weight" in trainable
    assert ours.get_nb_trainable_parameters() == \
        peft.get_peft_model(hf_classifier(kind), peft.LoraConfig(**lora_config())).get_nb_trainable_parameters()
    ids, mask = padded([6, 8, 2, 5], "left", seed=3)
    labels = torch.tensor([0, 1, 2, 1])
    train_steps(ours, 3, 5e-2, input_ids=ids, attention_mask=mask, labels=labels)
    copy = ours.base_model.model.score.modules_to_save["default"].weight
    assert not torch.equal(copy, ours.base_model.model.score.original_module.weight)
    ours.save_pretrained(tmp / "ours")
    saved_config = json.loads((tmp / "ours" / "adapter_config.json").read_text())
    assert saved_config["task_type"] == "SEQ_CLS" and set(saved_config["modules_to_save"]) == {"classifier", "score"}
    theirs = peft.PeftModel.from_pretrained(hf_classifier(kind), tmp / "ours").eval()
    with torch.no_grad():
        assert_close_rel(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits, rtol=RTOL)


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
def test_peft_soft_prompt_seq_cls_adapter_loads_here(saved, method):
    kind, hf, tmp = saved
    make = {"prompt-tuning": peft.PromptTuningConfig, "p-tuning": peft.PromptEncoderConfig}[method]
    theirs = peft.get_peft_model(hf, make(task_type="SEQ_CLS", num_virtual_tokens=4))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp / method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(tmp / "base"), tmp / method)
    ids, mask = padded([7, 3, 5], "left", seed=4)
    with torch.no_grad():
        assert_close_rel(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits, rtol=RTOL)
        with ours.disable_adapter():
            assert_close_rel(ours(ids, attention_mask=mask).logits, hf_classifier(kind)(ids, attention_mask=mask).logits,
                             rtol=RTOL)
