"""Interop with peft 0.21 for soft prompts (docs/formats.md D, E, F) on transformers' tiny random GPT-2 and T5: a
prompt peft saves loads here (and on GPT-Neo, BLOOM and Llama with grouped-query attention) with the same logits and loss, one saved here loads in peft with the same
logits, greedy generation gives the same tokens, adapter_config.json reads back field for field, and the
trainable-parameter counts agree.

Logits are compared at real tokens only: at padding the two differ by design (ours lets a padding query
see its own key, see models.gpt2.attention_mask_for), and nothing reads them.
"""
import json
import warnings

import pytest
import torch

import lowrank
from lowrank import models

from ..helpers import assert_close_rel, greedy_by_forward
from .test_lora_peft import TASK, auto_class, hf_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

N = 4
METHODS = {
    "prompt-tuning": ("PromptTuningConfig", {}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-projection": ("PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=24)),
    "p-tuning-mlp": ("PromptEncoderConfig", dict(encoder_hidden_size=24)),
    "p-tuning-lstm": ("PromptEncoderConfig", dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=12)),
}
KINDS = ("gpt2", "t5", "gpt_neo", "bloom", "llama")  # llama: grouped-query attention (prefixes of K/V heads)
CASES = [(kind, method) for kind in KINDS for method in METHODS]


def configs(kind, method):
    """(peft config, our config) with the same fields."""
    cls, kwargs = METHODS[method]
    kwargs = dict(kwargs, task_type=TASK.get(kind, "CAUSAL_LM"), num_virtual_tokens=N)
    return getattr(peft, cls)(**kwargs), getattr(lowrank, cls)(**kwargs)


def inputs(kind):
    """A batch with a left-padded row and labels (-100 at padding); T5 also pads the decoder on the right."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    if kind != "t5":
        # The first real token of the padded row is predicted from a padding query's logits (its label
        # follows one): ignored too, as those logits differ by design.
        labels = ids.masked_fill(mask == 0, -100)
        labels[1, 3] = -100
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    dec = torch.randint(2, 64, (2, 6), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 4:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                labels=dec.masked_fill(dec_mask == 0, -100))


def real(logits, kind, method, batch):
    """The logits (rows, V) at real tokens: GPT-2 prompts add N virtual positions in front, always real."""
    mask = batch["attention_mask"] if kind != "t5" else batch["decoder_attention_mask"]
    if kind != "t5" and not method.startswith("prefix"):
        mask = torch.cat([torch.ones(mask.shape[0], N, dtype=mask.dtype), mask], dim=1)
    return logits[mask.bool()]


def assert_same_outputs(ours, theirs, kind, method):
    batch = inputs(kind)
    with torch.no_grad():
        a, b = ours(**batch), theirs(**batch)
    assert a.logits.shape == b.logits.shape
    assert_close_rel(real(a.logits, kind, method, batch), real(b.logits, kind, method, batch), rtol=1e-4)
    assert_close_rel(a.loss, b.loss, rtol=1e-4)


@torch.no_grad()
def randomise(model):
    """Move every trainable prompt parameter off its init, so that a zero or default init proves nothing."""
    for p in model.parameters():
        if p.requires_grad:
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{kind: folder with transformers' tiny random checkpoint}."""
    out = {}
    for kind in KINDS:
        out[kind] = tmp_path_factory.mktemp(kind)
        hf_model(kind).save_pretrained(out[kind])
    return out


def theirs_model(kind, base):
    return auto_class(kind).from_pretrained(base).eval()


@pytest.mark.parametrize("kind,method", CASES)
def test_peft_prompt_loads_here_with_the_same_logits_and_loss(bases, tmp_path, kind, method):
    peft_config, _ = configs(kind, method)
    theirs = peft.get_peft_model(theirs_model(kind, bases[kind]), peft_config).eval()
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(bases[kind]), tmp_path)
    assert_same_outputs(ours, theirs, kind, method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key peft writes is known here
        saved = lowrank.config_from_dict(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert type(saved).__name__ == METHODS[method][0]
    for field, value in saved.to_dict().items():
        if field != "inference_mode":
            assert value == getattr(theirs.peft_config["default"], field), field


@pytest.mark.parametrize("kind,method", CASES)
def test_prompt_saved_here_loads_in_peft_with_the_same_logits(bases, tmp_path, kind, method):
    _, config = configs(kind, method)
    ours = lowrank.get_peft_model(models.from_pretrained(bases[kind]), config)
    randomise(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(theirs_model(kind, bases[kind]), tmp_path)
    assert_same_outputs(ours, theirs, kind, method)


@pytest.mark.parametrize("kind,method", [(k, m) for k, m in CASES if m in ("prompt-tuning", "prefix", "p-tuning-mlp")])
def test_greedy_generate_equals_a_greedy_loop_over_peft_forward(bases, tmp_path, kind, method):
    """The reference is peft's forward, not its `generate` (which disagrees with its own forward for GPT-2
    prompt tuning in transformers 5.24). Prefix tuning also with a left-padded row; the virtual-token methods
    without padding, where peft numbers positions through the padding (see test_prompts.py for our
    padding-invariant rule)."""
    peft_config, _ = configs(kind, method)
    theirs = peft.get_peft_model(theirs_model(kind, bases[kind]), peft_config).eval()
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lowrank.PeftModel.from_pretrained(models.from_pretrained(bases[kind]), tmp_path)
    batch = inputs(kind)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if kind != "t5" and method != "prefix":
        mask = torch.ones_like(mask)
    config = theirs.get_base_model().config
    eos, pad = config.eos_token_id, config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    start = config.decoder_start_token_id if kind == "t5" else None
    expected = greedy_by_forward(theirs, ids, mask, 8, eos, pad, decoder_start=start)
    actual = ours.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("kind,method", CASES)
def test_trainable_parameter_counts_match_peft(bases, kind, method):
    peft_config, config = configs(kind, method)
    theirs = peft.get_peft_model(theirs_model(kind, bases[kind]), peft_config)
    ours = lowrank.get_peft_model(models.from_pretrained(bases[kind]), config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs_names = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == theirs_names
