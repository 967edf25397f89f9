"""Soft prompts (prompt tuning, prefix tuning, P-tuning) on the tiny GPT-2 and T5, as properties: configs that
reject what they must, inputs extended exactly as docs/formats.md D.3/E.3 say, the prefix's effect on attention
against a float64 hand computation, training that moves only the prompt, KV-cache generation equal to full
recomputation and to each row alone, and files that load exactly or not at all."""
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import lowrank
from lowrank import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from lowrank.prompts import prompt_inputs, resolve_config

from .helpers import assert_close_rel, tiny_gpt2, tiny_t5

# GPT-2's default init (std 0.02) leaves logits nearly flat, and greedy tokens blind to positions; 0.3 does not.
TINY = {"gpt2": lambda: tiny_gpt2(initializer_range=0.3), "t5": tiny_t5}
TASK = {"gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
METHODS = {
    "prompt-tuning": (PromptTuningConfig, {}),
    "prefix": (PrefixTuningConfig, {}),
    "prefix-projection": (PrefixTuningConfig, dict(prefix_projection=True, encoder_hidden_size=16)),
    "p-tuning-mlp": (PromptEncoderConfig, dict(encoder_hidden_size=16)),
    "p-tuning-lstm": (PromptEncoderConfig, dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=8)),
}
CASES = [(kind, method) for kind in TINY for method in METHODS]
MODELS = {kind: make() for kind, make in TINY.items()}  # read-only in tests that take no gradient steps


def config(kind, method, n=3, **overrides):
    cls, kwargs = METHODS[method]
    return cls(**{**kwargs, "task_type": TASK[kind], "num_virtual_tokens": n, **overrides})


@torch.no_grad()
def randomised(peft_model):
    """Every prompt parameter drawn fresh (N(0, 0.5)), so that no test leans on an init."""
    g = torch.Generator().manual_seed(7)
    for p in peft_model.prompt_encoder.parameters():
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return peft_model


def padded(rows, side="left"):
    """rows (lists of ids) -> ids (B, T), mask (B, T), padded with 0 on `side`."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row), 1
    return ids, mask


@st.composite
def padded_batches(draw, max_rows=3, max_len=7, side="left"):
    """(ids, mask): 1..max_rows rows of 1..max_len tokens in 2..63, padded on `side`."""
    rows = draw(st.lists(st.lists(st.integers(2, 63), min_size=1, max_size=max_len), min_size=1, max_size=max_rows))
    return padded(rows, side)


# -- configs --

@pytest.mark.parametrize("cls", [PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig])
@pytest.mark.parametrize("n", [0, -2, None, 2.5, True])
def test_prompt_without_positive_length_is_rejected(cls, n):
    with pytest.raises(ValueError, match=rf"num_virtual_tokens={n!r} must be an integer"):
        cls(num_virtual_tokens=n)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="tok"), "prompt_tuning_init_text=None"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="", tokenizer_name_or_path="tok"), "prompt_tuning_init_text=''"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "tokenizer_name_or_path=None"),
    (dict(prompt_tuning_init="WORDS"), "prompt_tuning_init='WORDS'"),
    (dict(tokenizer_kwargs={"use_fast": True}), "tokenizer_kwargs="),
    (dict(num_transformer_submodules=3), "num_transformer_submodules=3"),
    (dict(token_dim=0), "token_dim=0"),
    (dict(modules_to_save="ln_f"), "modules_to_save"),
])
def test_invalid_prompt_tuning_fields_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        PromptTuningConfig(num_virtual_tokens=2, **kwargs)


@pytest.mark.parametrize("cls,kwargs,message", [
    (PrefixTuningConfig, dict(init_weights="ones"), "init_weights='ones'"),
    (PrefixTuningConfig, dict(encoder_hidden_size=0), "encoder_hidden_size=0"),
    (PromptEncoderConfig, dict(encoder_reparameterization_type="GRU"), "encoder_reparameterization_type='GRU'"),
    (PromptEncoderConfig, dict(encoder_dropout=1.0), "encoder_dropout=1.0"),
    (PromptEncoderConfig, dict(encoder_num_layers=0), "encoder_num_layers=0"),
])
def test_invalid_prefix_and_p_tuning_fields_name_the_field_and_value(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(num_virtual_tokens=2, **kwargs)


@pytest.mark.parametrize("kind,method", CASES)
def test_config_json_round_trip_through_config_from_dict(kind, method):
    c = resolve_config(MODELS[kind], config(kind, method))
    assert lowrank.config_from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("kind,expected", [
    ("gpt2", dict(token_dim=32, num_layers=2, num_attention_heads=4, num_transformer_submodules=1)),
    ("t5", dict(token_dim=32, num_layers=2, num_attention_heads=4, num_transformer_submodules=2)),
])
def test_missing_fields_are_filled_from_the_model_config(kind, expected):
    c = resolve_config(MODELS[kind], config(kind, "p-tuning-lstm", encoder_hidden_size=None))
    assert {k: getattr(c, k) for k in expected} == expected and c.encoder_hidden_size == 32


@pytest.mark.parametrize("kind,method,overrides,message", [
    ("gpt2", "prompt-tuning", dict(token_dim=48), "token_dim=48 differs from the model's embedding width 32"),
    ("gpt2", "prompt-tuning", dict(task_type="SEQ_2_SEQ_LM"), "task_type='SEQ_2_SEQ_LM' does not fit"),
    ("gpt2", "prompt-tuning", dict(num_transformer_submodules=2), "num_transformer_submodules=2 needs"),
    ("gpt2", "prefix", dict(num_layers=3), "num_layers=3, but the model has 2 layers"),
    ("t5", "prefix", dict(num_attention_heads=8), "num_attention_heads=8 does not give the model's keys"),
    ("t5", "prompt-tuning", dict(task_type="SEQ_CLS"), "task_type='SEQ_CLS' needs a sequence classification model"),
    ("gpt2", "prefix", dict(task_type="SEQ_CLS"), "task_type='SEQ_CLS' needs a sequence classification model"),
])
def test_a_config_that_does_not_fit_the_model_is_rejected_before_it_changes(kind, method, overrides, message):
    model = TINY[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config(kind, method, **overrides))
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- the prompt in the inputs (docs/formats.md D.3, E.3) --

@given(batch=padded_batches(), n=st.integers(1, 5), kind=st.sampled_from(["gpt2", "t5"]))
def test_virtual_tokens_extend_embeddings_mask_and_labels_exactly(batch, n, kind):
    ids, mask = batch
    c = resolve_config(MODELS[kind], config(kind, "prompt-tuning", n=n))
    prompt = torch.randn(n * c.num_transformer_submodules, 32)
    labels = ids.masked_fill(mask == 0, -100)
    kw = prompt_inputs(MODELS[kind], c, prompt, dict(input_ids=ids, attention_mask=mask, labels=labels))
    B, T = ids.shape
    assert torch.equal(kw["inputs_embeds"][:, :n], prompt[:n].expand(B, n, 32))
    assert torch.equal(kw["inputs_embeds"][:, n:], MODELS[kind].get_input_embeddings()(ids))
    assert torch.equal(kw["attention_mask"], torch.cat([torch.ones(B, n, dtype=torch.long), mask], dim=1))
    if kind == "gpt2":  # T5's labels belong to the decoder, which the prompt leaves alone
        assert torch.equal(kw["labels"], torch.cat([torch.full((B, n), -100), labels], dim=1))
    else:
        assert kw["labels"] is labels
    assert "input_ids" not in kw


@given(batch=padded_batches(), n=st.integers(1, 5), kind=st.sampled_from(["gpt2", "t5"]))
def test_prefix_extends_the_self_attention_mask_and_maps_slots_to_layers(batch, n, kind):
    ids, mask = batch
    c = resolve_config(MODELS[kind], config(kind, "prefix", n=n))
    prefix = torch.randn(n, 2 * 2 * 32)
    B, T = ids.shape
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids, position_ids=torch.arange(T)[None])
    if kind == "t5":
        inputs = dict(input_ids=ids, attention_mask=mask, decoder_attention_mask=mask)
    kw = prompt_inputs(MODELS[kind], c, prefix, inputs)
    ones = torch.ones(B, n, dtype=torch.long)
    slots = prefix.view(n, 4, 4, 8)  # (N, 2L, H, head_dim)
    # GPT-2 layer i takes slots 2i, 2i+1; T5 decoder layer i takes slots 4i mod 2L, 4i+1 mod 2L (docs/formats.md E.3)
    expected = {"gpt2": [(0, 1), (2, 3)], "t5": [(0, 1), (0, 1)]}[kind]
    for layer, (k_slot, v_slot) in zip(kw["past_key_values"], expected):
        assert torch.equal(layer[0], slots[:, k_slot].permute(1, 0, 2).expand(B, 4, n, 8))
        assert torch.equal(layer[1], slots[:, v_slot].permute(1, 0, 2).expand(B, 4, n, 8))
    if kind == "gpt2":
        assert torch.equal(kw["attention_mask"], torch.cat([ones, mask], dim=1))
        assert torch.equal(kw["position_ids"], torch.arange(n, n + T)[None]) and kw["labels"] is ids
    else:
        assert kw["attention_mask"] is mask and torch.equal(kw["decoder_attention_mask"], torch.cat([ones, mask], 1))
        assert all(layer[2] is None and layer[3] is None for layer in kw["past_key_values"])


@given(batch=padded_batches(max_rows=2, max_len=6), n=st.integers(1, 4))
def test_zero_prefix_scales_each_attention_output_by_z_over_z_plus_n(batch, n):
    """With all-zero prefix keys and values, every prefix key scores exactly 0 and adds nothing to the values,
    so each real query's attention output is the prefix-free output times Z / (Z + N), where Z is the sum of
    exp(score) over the keys the query sees. Checked in float64 at every GPT-2 layer against this formula."""
    ids, mask = batch
    model = get_peft_model(tiny_gpt2().double(), config("gpt2", "prefix", n=n, init_weights="zero"))
    seen = {}
    for i, block in enumerate(model.base_model.transformer.h):
        block.attn.c_attn.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("qkv", i), out))
        block.attn.c_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("o", i), args[0]))
    model(input_ids=ids, attention_mask=mask)
    B, T = ids.shape
    allowed = torch.ones(T, T).tril().bool() & mask.bool()[:, None, :]  # (B, Tq, Tk) among real keys
    for i in range(2):
        q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in seen[("qkv", i)].split(32, dim=-1))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed[:, None], -math.inf)
        z = scores.exp().sum(-1, keepdim=True)
        expected = (scores.softmax(-1) @ v) * z / (z + n)
        actual = seen[("o", i)].view(B, T, 4, 8).transpose(1, 2)
        real = mask.bool()[:, None, :, None].expand_as(actual)
        assert_close_rel(actual[real], expected[real], torch.float64)


# -- training --

@pytest.mark.parametrize("kind,method", CASES)
def test_gradients_reach_only_the_prompt_and_adamw_never_moves_the_base(kind, method):
    model = get_peft_model(TINY[kind](), config(kind, method))
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    prompt_ids = {id(p) for p in model.prompt_encoder.parameters()}
    assert {id(p) for p in trainable} == prompt_ids
    prompt_before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, labels=ids) if kind == "gpt2" else dict(input_ids=ids, labels=ids[:, :4])
    for _ in range(3):
        opt.zero_grad()
        model(**inputs).loss.backward()
        assert all(p.grad is None for p in model.get_base_model().parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable if p.numel() > 1)
        opt.step()
    assert all(torch.equal(base[k], v) for k, v in model.get_base_model().state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(prompt_before, trainable))


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_disable_adapter_gives_the_base_model_exactly(kind):
    model = randomised(get_peft_model(TINY[kind](), config(kind, "prefix")))
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids) if kind == "gpt2" else dict(input_ids=ids, decoder_input_ids=ids[:, :3])
    with torch.no_grad(), model.disable_adapter():
        disabled = model(**inputs).logits
    assert torch.equal(disabled, model.get_base_model()(**inputs).logits)
    assert not torch.equal(model(**inputs).logits, disabled)


# -- generation --

def greedy_by_recomputation(model, kind, row, steps):
    """Greedy decoding by definition: the whole sequence through PeftModel.forward every step, no cache."""
    ids = torch.tensor([row])
    out = ids if kind == "gpt2" else torch.zeros(1, 1, dtype=torch.long)
    for _ in range(steps):
        logits = model(input_ids=out).logits if kind == "gpt2" else model(input_ids=ids, decoder_input_ids=out).logits
        out = torch.cat([out, logits[:, -1:].argmax(-1)], dim=1)
    return out[0, -steps:]


@pytest.mark.parametrize("kind,method", [(k, m) for k, m in CASES if m in ("prompt-tuning", "prefix", "p-tuning-mlp")])
@given(data=st.data(), n=st.integers(1, 4), steps=st.integers(1, 5))
def test_kv_cache_generation_of_a_padded_batch_equals_recomputing_each_row_alone(kind, method, data, n, steps):
    """GPT-2 pads on the left, as generation needs. T5 pads its encoder input on the right: virtual tokens go
    first, so left padding would sit between them and the text and change T5's relative positions (in PEFT
    too)."""
    ids, mask = data.draw(padded_batches(side="left" if kind == "gpt2" else "right"))
    note(f"mask={mask.tolist()}")
    model = randomised(get_peft_model(TINY[kind](), config(kind, method, n=n))).eval()
    out = model.generate(ids, mask, max_new_tokens=steps)
    prefix_len = ids.shape[1] if kind == "gpt2" else 1
    assert out.shape == (ids.shape[0], prefix_len + steps)
    for i in range(ids.shape[0]):
        row = ids[i, mask[i].bool()].tolist()
        assert torch.equal(out[i, prefix_len:], greedy_by_recomputation(model, kind, row, steps))


@pytest.mark.parametrize("method", list(METHODS))
def test_gpt2_forward_with_its_own_cache_equals_the_full_forward(method):
    model = randomised(get_peft_model(TINY["gpt2"](), config("gpt2", method)))
    ids, mask = padded([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits[:, -2:]
        first = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        rest = model(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=first.past_key_values).logits
    assert_close_rel(rest, full)


# -- text init --

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer.json whose ids index the tiny models' vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "classify", "the", "review", "<unk>"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("kind,text,expected_ids", [
    ("gpt2", "classify the review", [2, 3, 4, 2, 3]),  # repeated cyclically to N = 5 rows
    ("t5", "classify the review", [2, 3, 4, 2, 3, 4, 2, 3, 4, 2]),  # N * 2 rows for seq2seq
    ("gpt2", "the review the review classify the", [3, 4, 3, 4, 2]),  # cut to N rows
])
def test_text_init_copies_the_models_embeddings_of_the_tokenised_text(tokenizer_dir, kind, text, expected_ids):
    c = config(kind, "prompt-tuning", n=5, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
               tokenizer_name_or_path=str(tokenizer_dir))
    model = get_peft_model(TINY[kind](), c)
    table = model.get_base_model().get_input_embeddings().weight
    assert torch.equal(model.prompt_encoder["default"](), table[expected_ids])


def test_sample_vocab_init_takes_rows_of_the_embedding_table():
    model = get_peft_model(tiny_gpt2(), config("gpt2", "prompt-tuning", n=6, prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.get_base_model().get_input_embeddings().weight
    assert all((table == row).all(-1).any() for row in model.prompt_encoder["default"]())


# -- files --

@pytest.mark.parametrize("kind,method", CASES)
def test_save_then_load_gives_the_same_prompt_and_logits_exactly(tmp_path, kind, method):
    model = randomised(get_peft_model(TINY[kind](), config(kind, method)))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(TINY[kind](), tmp_path)
    assert torch.equal(loaded.prompt_encoder["default"](), model.prompt_encoder["default"]())
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids) if kind == "gpt2" else dict(input_ids=ids, decoder_input_ids=ids[:, :3])
    # with gradients on, as when it was saved: torch's LSTM takes another kernel under no_grad
    assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("edit,message", [
    (dict(num_virtual_tokens=4), r"adapter_model.safetensors: key 'prompt_embeddings' has shape \(3, 32\), expected \(4, 32\)"),
    (dict(token_dim=48), r"adapter_config.json: token_dim=48 differs from the model's embedding width 32"),
])
def test_loading_a_prompt_that_disagrees_with_file_or_model_fails_before_the_model_changes(tmp_path, edit, message):
    get_peft_model(tiny_gpt2(), config("gpt2", "prompt-tuning")).save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **edit}))
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(model, tmp_path)
    assert all(p.requires_grad for p in model.parameters())


def test_soft_prompts_load_for_inference_only_and_do_not_mix_with_lora(tmp_path):
    model = get_peft_model(tiny_gpt2(), config("gpt2", "prompt-tuning"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="inference only"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path, is_trainable=True)
    with pytest.raises(ValueError, match="cannot add a LORA adapter to a model with soft prompts"):
        model.add_adapter("lora", lowrank.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    model.add_adapter("other", replace(config("gpt2", "prefix"), inference_mode=True))
    with pytest.raises(ValueError, match="one at a time"):
        model.set_adapter(["default", "other"])
