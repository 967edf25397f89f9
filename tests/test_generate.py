"""Properties of models.generate: greedy decoding equals a full-recomputation argmax loop, eos
handling, and sampling (seeded, top-k, top-p). Agreement with transformers is in tests/interop/."""
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from lowrank.models.generate import generate, sample_next
from lowrank.models.gpt2 import GPT2Config, GPT2LMHeadModel

VOCAB = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=160, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                        eos_token_id=None)  # free generation unless a test names an eos
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def with_config_eos(model):
    """`model` whose config names an eos id (restored afterwards)."""
    def set_eos(eos):
        model.config.eos_token_id = eos
        return model
    yield set_eos
    model.config.eos_token_id = None


def left_padded(rows):
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return ids, mask


def greedy_by_recomputation(model, row, n):
    """The definition of greedy decoding: no cache, no padding, the whole sequence each step."""
    ids = torch.tensor([row])
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(row) :]


@given(rows=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), min_size=1, max_size=3),
       n=st.integers(1, 8))
def test_greedy_generate_equals_argmax_of_full_recomputation_per_row(model, rows, n):
    ids, mask = left_padded(rows)
    note(f"mask={mask.tolist()}")
    out = generate(model, ids, mask, max_new_tokens=n)
    assert out.shape == (len(rows), ids.size(1) + n) and torch.equal(out[:, : ids.size(1)], ids)
    for i, row in enumerate(rows):
        assert torch.equal(out[i, ids.size(1) :], greedy_by_recomputation(model, row, n))


def test_generation_past_the_initial_cache_capacity_stays_exact(model):
    row = [1, 2, 3]
    out = model.generate(torch.tensor([row]), max_new_tokens=70)  # the cache starts with 64 slots
    assert torch.equal(out[0, 3:], greedy_by_recomputation(model, row, 70))


def test_rows_that_emit_eos_are_padded_and_generation_stops_when_all_have(model):
    ids, mask = left_padded([[3, 4, 5], [6, 7]])
    free = generate(model, ids, mask, max_new_tokens=12)
    eos = int(free[0, 3])  # row 0 emits it first
    out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=VOCAB - 1)
    assert torch.equal(out[0, 3:], torch.tensor([eos] + [VOCAB - 1] * (out.size(1) - 4)))
    hits = (free[1, 3:] == eos).nonzero()
    if len(hits):  # row 1 ends at its own first eos, and nothing is generated after that
        assert out.size(1) == 3 + int(hits[0]) + 1 and out[1, -1] == eos
    else:
        assert torch.equal(out[1], free[1])


def test_padding_after_eos_defaults_to_eos(model):
    ids = torch.tensor([[3, 4, 5], [3, 4, 5]])
    eos = int(generate(model, ids, max_new_tokens=1)[0, -1])
    assert torch.equal(generate(model, ids, max_new_tokens=5, eos_token_id=[VOCAB - 2, eos])[:, 3:],
                       torch.full((2, 1), eos))


def test_eos_defaults_to_the_model_configs_as_in_transformers(model, with_config_eos):
    ids = torch.tensor([[3, 4, 5]])
    free = generate(model, ids, max_new_tokens=6)
    eos = int(free[0, 3])  # the first new token
    assert torch.equal(generate(with_config_eos(eos), ids, max_new_tokens=6), free[:, :4])
    assert torch.equal(generate(model, ids, max_new_tokens=6, eos_token_id=[VOCAB + 1]), free)  # an explicit id wins


def test_a_config_eos_outside_the_vocabulary_warns(model, with_config_eos):
    with pytest.warns(UserWarning, match=f"eos_token_id=50256 lies outside vocab_size={VOCAB}"):
        out = generate(with_config_eos(50256), torch.tensor([[1, 2]]), max_new_tokens=3)
    assert out.shape == (1, 5)


@pytest.mark.parametrize("eos", [[], 1.5, [2.0]])
def test_an_eos_that_is_no_token_id_is_refused_by_name(model, eos):
    with pytest.raises(ValueError, match="eos_token_id=.*expected a token id or a non-empty list"):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, eos_token_id=eos)


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(model):
    ids = torch.tensor([[1, 2, 3]])
    sample = lambda seed: generate(model, ids, max_new_tokens=30, do_sample=True, temperature=2.0, seed=seed)
    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@given(seed=st.integers(0, 2**16), k=st.integers(1, 5))
def test_top_k_samples_only_the_k_largest_logits(seed, k):
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    allowed = logits.topk(k, dim=-1).indices
    for _ in range(20):
        tokens = sample_next(logits, do_sample=True, top_k=k, generator=gen)
        assert (allowed == tokens[:, None]).any(-1).all()


@given(seed=st.integers(0, 2**16), p=st.floats(0.05, 0.95))
def test_top_p_samples_only_the_smallest_set_holding_p_of_the_mass(seed, p):
    logits = torch.randn(3, 15, generator=torch.Generator().manual_seed(seed)) * 2
    gen = torch.Generator().manual_seed(seed)
    probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
    size = (probs.cumsum(-1) < p).sum(-1) + 1  # the nucleus: top tokens until the mass reaches p
    for _ in range(20):
        tokens = sample_next(logits, do_sample=True, top_p=p, generator=gen)
        rank = (order == tokens[:, None]).int().argmax(-1)
        assert (rank < size).all()


def test_greedy_and_degenerate_sampling_agree():
    logits = torch.randn(5, 30)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    assert torch.equal(sample_next(logits, do_sample=True, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, do_sample=True, temperature=1e-4), logits.argmax(-1))


@pytest.mark.parametrize("bad, match", [(dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"),
                                        (dict(top_p=1.5), "top_p")])
def test_sampling_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        sample_next(torch.randn(2, 5), do_sample=True, **bad)


@pytest.mark.parametrize("bad, error, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens=-1 must be an integer >= 0"),
    (dict(max_new_tokens=2.5), ValueError, "max_new_tokens=2.5"),
    (dict(max_new_tokens=True), ValueError, "max_new_tokens=True"),
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    (dict(input_ids=torch.tensor([[1, VOCAB]])), ValueError, rf"input_ids\[0, 1\] = {VOCAB} is outside the vocabulary"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, r"shape \(1, 0\)"),
])
def test_bad_generate_arguments_are_refused_by_name(model, bad, error, match):
    with pytest.raises(error, match=match):
        generate(model, **{"input_ids": torch.tensor([[1, 2]]), "max_new_tokens": 3, **bad})


def test_zero_new_tokens_returns_the_prompt(model):
    ids = torch.tensor([[1, 2]])
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


@pytest.mark.parametrize("bad, match", [
    (dict(do_sample=True, temperature=float("nan")), "temperature=nan"), (dict(do_sample="false"), "do_sample='false'"),
    (dict(do_sample=True, top_k=2.5), "top_k=2.5"), (dict(do_sample=True, top_p="0.9"), "top_p='0.9'"),
    (dict(pad_token_id=VOCAB), f"pad_token_id={VOCAB}"), (dict(seed=2 ** 70), "seed="),
    (dict(eos_token_id="</s>"), "eos_token_id='</s>'"), (dict(eos_token_id=[[1, 2], [3]]), "eos_token_id="),
])
def test_bad_sampling_and_stopping_arguments_are_named(model, bad, match):
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=2, **bad)
