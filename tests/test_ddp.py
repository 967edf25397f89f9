"""DistributedDataParallel on CPU: 2 gloo processes, set up through torchrun's environment variables, train
the same adapter as 1 process with the same global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lowrank import LoraConfig, get_peft_model
from lowrank.train import TrainingConfig, train

from .helpers import assert_close_rel, tiny_gpt2
from .test_train import examples


STEPS, PER_PROCESS_BATCH, ACCUMULATION = 3, 2, 2


def run(output_dir, world_size):
    """Train LoRA on 12 examples with global batch 2 * PER_PROCESS_BATCH * ACCUMULATION; rank 0 saves it.
    Adam with eps = lr = 1e3 steps by about the gradient itself, so a wrongly scaled gradient shows."""
    model = get_peft_model(tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                           LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    config = TrainingConfig(output_dir=str(output_dir), max_steps=STEPS, batch_size=PER_PROCESS_BATCH * 2 // world_size,
                            gradient_accumulation_steps=ACCUMULATION, learning_rate=1e3, adam_epsilon=1e3,
                            max_grad_norm=None,
                            progress=False, device="cpu")
    return train(model, examples(12), config)


def worker(rank, world_size, port, output_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        run(output_dir, world_size)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_the_same_adapter_as_one(tmp_path):
    mp.spawn(worker, args=(2, free_port(), tmp_path / "ddp"), nprocs=2, join=True)
    single = run(tmp_path / "single", 1)
    assert single.process.world_size == 1
    ddp, one = load_file(tmp_path / "ddp" / "adapter_model.safetensors"), single.model.adapter_tensors("default")
    assert ddp.keys() == one.keys()
    for key, tensor in ddp.items():
        assert_close_rel(tensor, one[key], rtol=1e-4)
    assert any(t.abs().max() > 0 for k, t in ddp.items() if "lora_B" in k)
