"""What torch.compile sees of every model: one graph.

For every family (GPT-2, GPT-Neo, BLOOM, Llama, Qwen2, Mistral, T5) and every way of calling it (eval
forward with and without a left-padded attention_mask, a training forward + loss with live LoRA dropout, a
mixed-adapter batch, prompt tuning, prefix tuning, P-tuning, sequence-classification heads),
`torch._dynamo.explain` finds 0 graph breaks, on the torch path and on the Triton kernels (interpreted on a
CPU). Compiled results equal eager ones: bitwise through aot_eager (the traced graph, run by eager
kernels), within fp32's tolerance through Inductor; with LoRA dropout, the same torch.manual_seed gives
the same masks (Inductor with fallback_random, which draws as eager does).
"""
import pytest
import torch
import torch._dynamo as dynamo

import lowrank
from lowrank import models

from .helpers import assert_close_rel, tiny_t5
from .kernel_checks import backend
from .test_decoder_cache import DECODERS, VOCAB

FAMILIES = sorted(DECODERS) + ["t5"]
CASES = ["eval", "padded", "mixed", "train", "prompt", "prefix", "ptuning"]
PROMPTS = {
    "prompt": lambda task: lowrank.PromptTuningConfig(num_virtual_tokens=3, task_type=task),
    "prefix": lambda task: lowrank.PrefixTuningConfig(num_virtual_tokens=3, task_type=task),
    "ptuning": lambda task: lowrank.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type=task),
}


def base_model(family: str):
    torch.manual_seed(0)
    if family == "t5":
        return tiny_t5(vocab_size=VOCAB)
    model_class, config_class, config = DECODERS[family]
    return model_class(config_class(**config)).eval()


def peft_model(family: str, case: str):
    """The model a case calls: LoRA r=4 with dropout 0.1 on every linear plus a second adapter (r=2), both
    with random B, or a soft prompt; in train mode for the training cases."""
    task = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
    if case in PROMPTS:
        return lowrank.get_peft_model(base_model(family), PROMPTS[case](task)).train()
    lora = dict(target_modules="all-linear", task_type=task, init_lora_weights=False)  # B != 0: the LoRA term counts
    model = lowrank.get_peft_model(base_model(family), lowrank.LoraConfig(r=4, lora_dropout=0.1, **lora))
    model.add_adapter("other", lowrank.LoraConfig(r=2, **lora))
    return model.train() if case == "train" else model.eval()


def call(model, family: str, case: str):
    """A function of no arguments running the case: logits in eval, the loss in training."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = dict(input_ids=ids) if case == "eval" else dict(input_ids=ids, attention_mask=mask)
    if family == "t5":
        inputs["decoder_input_ids" if case in ("eval", "padded", "mixed") else "labels"] = ids[:, :5]
    elif case not in ("eval", "padded", "mixed"):
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    if case == "mixed":
        inputs["adapter_names"] = ["other", "default"]
    if "labels" in inputs:
        return lambda: model(**inputs).loss
    return lambda: model(**inputs).logits


def graph_breaks(fn) -> int:
    dynamo.reset()
    explanation = dynamo.explain(fn)()
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_forward_traces_as_one_graph_on_the_torch_path(family, case):
    model = peft_model(family, case)
    assert graph_breaks(call(model, family, case)) == 0


@pytest.mark.parametrize("case", ["padded", "mixed", "train", "prefix"])
@pytest.mark.parametrize("family", ["gpt2", "llama_biases", "t5"])
def test_every_forward_traces_as_one_graph_on_the_triton_kernels(family, case):
    with backend("triton"):
        model = peft_model(family, case)
        assert graph_breaks(call(model, family, case)) == 0


def classifier(head):
    """A random 2-layer classifier over 3 labels, pad token 0."""
    torch.manual_seed(0)
    if head is models.GPT2ForSequenceClassification:
        config = models.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0)
    else:
        config = models.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)
    return head(config.with_labels(3))


@pytest.mark.parametrize("method", ["lora"] + sorted(PROMPTS))
@pytest.mark.parametrize("head", [models.GPT2ForSequenceClassification, models.BloomForSequenceClassification])
def test_sequence_classification_heads_trace_as_one_graph(head, method):
    """Soft prompts feed inputs_embeds, whose score is read at the last column: batches of one row there,
    as the Trainer runs them."""
    config = (lowrank.LoraConfig(r=4, lora_dropout=0.1, task_type="SEQ_CLS") if method == "lora"
              else PROMPTS[method]("SEQ_CLS"))
    model = lowrank.get_peft_model(classifier(head), config).train()
    rows = 2 if method == "lora" else 1
    ids = torch.randint(1, VOCAB, (rows, 6), generator=torch.Generator().manual_seed(2))
    assert graph_breaks(lambda: model(input_ids=ids, labels=torch.tensor([2, 0][:rows])).loss) == 0


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_compiled_eval_forwards_equal_eager_ones_bitwise(family):
    model = peft_model(family, "eval")
    for case in ("eval", "padded", "mixed"):
        fn = call(model, family, case)
        dynamo.reset()
        assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(), fn()), case


def loss_and_grads(model, loss_fn, seed: int = 7):
    """The loss and the trainable parameters' gradients of one backward, torch.manual_seed(seed) first."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn()
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("family", ["gpt2", "llama_biases", "t5"])
def test_a_compiled_training_step_with_dropout_equals_eager_for_the_same_seed(family, backend_name):
    with backend(backend_name):
        model = peft_model(family, "train")
        loss_fn = call(model, family, "train")
        eager = loss_and_grads(model, loss_fn)
        dynamo.reset()
        compiled = loss_and_grads(model, torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
        other_seed = loss_and_grads(model, loss_fn, seed=8)
    assert not torch.equal(eager[0], other_seed[0])  # the masks do depend on the seed
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_inductor_compiles_a_training_step_that_equals_eager():
    """Inductor's C++ kernels fuse and reorder, so fp32's tolerance rather than bitwise; fallback_random makes
    its dropout draw as eager does, so the masks, and with them the loss, agree."""
    model = peft_model("gpt2", "train")
    loss_fn = call(model, "gpt2", "train")
    eager = loss_and_grads(model, loss_fn)
    dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = loss_and_grads(model, torch.compile(loss_fn, fullgraph=True))
    for got, want in zip(compiled, eager):
        assert_close_rel(got, want)


def traced_graphs(fn) -> list:
    """The forward and backward graphs AOTAutograd traces from fn (run once), as torch.fx GraphModules."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(graph, _inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))().backward()
    return graphs


def test_a_triton_training_step_reads_no_value_on_the_host():
    """Forward and backward of a LoRA training step on the Triton kernels: each LoRA linear is one
    lowrank::lora_matmul node, the dropout seed a torch.randint in the graph, each backward's dX one
    lowrank::lora_matmul_dx (but the first layer's: the embeddings need no gradient), and no node reads a
    tensor's value on the host (aten._local_scalar_dense, the op behind .item())."""
    with backend("triton"):
        model = peft_model("gpt2", "train")
        forward, backward = traced_graphs(call(model, "gpt2", "train"))
    targets = lambda graph: [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    lora_linears = sum(isinstance(m, lowrank.lora.LoraLayer) for m in model.modules())
    assert targets(forward).count("lowrank.lora_matmul.default") == lora_linears
    assert targets(forward).count("aten.randint.low") == lora_linears
    assert targets(backward).count("lowrank.lora_matmul_dx.default") == lora_linears - 1
    assert targets(backward).count("lowrank.lora_dropped_t_matmul.default") == lora_linears
    assert not any("_local_scalar_dense" in t for t in targets(forward) + targets(backward))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_a_compiled_mixed_adapter_training_step_equals_eager(backend_name):
    """adapter_names in training (no dropout, so one batched kernel call per layer): the backward's per-adapter
    gradient sums trace too."""
    with backend(backend_name):
        torch.manual_seed(0)
        lora = dict(target_modules=["c_attn", "c_fc"], init_lora_weights=False)
        model = lowrank.get_peft_model(base_model("gpt2"), lowrank.LoraConfig(r=4, **lora))
        model.add_adapter("other", lowrank.LoraConfig(r=2, **lora))
        model.train()
        ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
        loss_fn = lambda: model(input_ids=ids, labels=ids, adapter_names=["other", "default", "other"]).loss
        eager = loss_and_grads(model, loss_fn)
        dynamo.reset()
        compiled = loss_and_grads(model, torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    assert all(grad.abs().sum() > 0 for grad in eager[1:])
    for got, want in zip(compiled, eager):
        assert_close_rel(got, want)
