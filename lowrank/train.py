"""The training loop: AdamW on the trainable parameters, warm-up then linear or cosine decay, gradient
accumulation and clipping, bf16 autocast (fp16 with loss scaling on GPU), eval loss and perplexity (accuracy for
sequence classification), checkpoints, exact resume, and DistributedDataParallel under torchrun.

The micro-batch stream is one sequence over epochs: optimizer step t consumes micro-batches
t*k .. t*k + k - 1 (k = gradient_accumulation_steps) of the stream, where epoch e is the sampler's
permutation for seed + e. So a step number alone says where the data stands, and a run resumed from a
checkpoint continues with the very batches, RNG draws and optimizer state of the uninterrupted run.

The loss of an accumulated step is the mean over all label tokens (for classification: all examples) of its
k micro-batches on all processes (each micro-batch's mean loss weighted by its share of them), so k
micro-batches of b examples on N processes give the gradient of one batch of k * N * b examples.

A checkpoint folder `checkpoint-<step>` holds the adapter in PEFT's format (or the model, for full
fine-tuning: whatever `model.save_pretrained` writes), `trainable.safetensors` (every trainable parameter by
name, what resuming reads), `trainer_state.pt` (optimizer, scheduler, grad scaler, step, history and the
settings that order the data, which a resumed run must match: tensors and numbers only, read back with
weights_only=True) and `rng_state_<rank>.pt` per process.
"""
import contextlib
import copy
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .checks import check_at_least, check_types
from .config import PromptEncoderConfig, PromptTuningConfig, is_encoder_decoder
from .data import collate, is_class_id, label_tokens
from .errors import CheckpointError, ConfigError
from .files import atomic_write, finish_interrupted_write

SCHEDULES = ("linear", "cosine", "constant")
MIXED_PRECISION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINABLE_NAME = "trainable.safetensors"
STATE_NAME = "trainer_state.pt"
LOG_NAME = "train_log.json"


@dataclass
class TrainingConfig:
    """How to train. batch_size is per process and per micro-batch; max_steps (optimizer steps), when set,
    overrides num_epochs. save_steps / eval_steps: every that many optimizer steps (None: only at the end).
    output_dir: where checkpoints and the final adapter go (None: nothing is written)."""

    output_dir: Optional[str] = None
    num_epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: Optional[str] = None
    seed: int = 0
    shuffle: bool = True
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = None
    device: Optional[Union[str, torch.device]] = None
    progress: bool = True

    def __post_init__(self):
        check_types(self)
        self.device = None if self.device is None else str(self.device)
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"TrainingConfig: device={self.device!r} is not a device torch knows "
                                  f"(cpu, cuda, cuda:N, ...)") from None
        check_at_least(self, ("batch_size", "gradient_accumulation_steps", "max_steps", "eval_steps", "save_steps"), 1)
        check_at_least(self, ("warmup_steps", "weight_decay", "seed"), 0)
        if self.seed >= 2 ** 63:
            raise ConfigError(f"TrainingConfig: seed={self.seed!r} must be below 2**63")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"TrainingConfig: {name}={getattr(self, name)!r} must be in [0, 1)")
        for name in ("num_epochs", "learning_rate", "adam_epsilon", "max_grad_norm"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:  # max_grad_norm None: no clipping
                raise ConfigError(f"TrainingConfig: {name}={getattr(self, name)!r} must be > 0")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ConfigError(f"TrainingConfig: lr_scheduler_type={self.lr_scheduler_type!r} is not one of {SCHEDULES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"TrainingConfig: mixed_precision={self.mixed_precision!r} is not one of "
                              f"{list(MIXED_PRECISION)}")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based), transformers' formulas:
    step / warmup_steps during warm-up, then constant, linear to 0 or half a cosine to 0 at total_steps."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def loss_drops_first_label(model: nn.Module) -> bool:
    """Whether the model's loss leaves out the first label column. Causal LMs predict token t + 1 from t,
    so they do; an encoder-decoder does not; nor does a causal LM behind a prepended soft prompt (prompt
    tuning, P-tuning), whose N leading -100 labels absorb the shift (docs/formats.md D.3)."""
    return not is_encoder_decoder(model) and not has_virtual_tokens(model)


def has_virtual_tokens(model: nn.Module) -> bool:
    """Whether an active adapter prepends virtual tokens (prompt tuning, P-tuning): the model then gets
    inputs_embeds, not input_ids."""
    configs = getattr(model, "peft_config", {})
    active = [configs[a] for a in getattr(model, "active_adapters", []) if a in configs]
    return any(isinstance(c, (PromptTuningConfig, PromptEncoderConfig)) for c in active)


class Trainer:
    """Trains `model` (a PeftModel, or any model whose forward(**batch) returns `.loss`) on `train_data`,
    a list of examples {"input_ids": [int], "labels": [int]} or, for a sequence classifier, {"input_ids":
    [int], "labels": int} (see lowrank.data), padded with pad_token_id (a classifier's config.pad_token_id).
    `history` gets one entry per optimizer step: {"step", "loss", "lr", "tokens_per_s"}, plus the eval
    metrics on the steps that evaluate."""

    def __init__(self, model: nn.Module, config: TrainingConfig, train_data: list, eval_data: Optional[list] = None,
                 pad_token_id: int = 0):
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id={pad_token_id!r} must be a token id >= 0")
        self.classification = check_examples(train_data, "train_data")
        if eval_data is not None and check_examples(eval_data, "eval_data") != self.classification:
            kinds = ("token-label", "classification")
            raise ValueError(f"eval_data are {kinds[not self.classification]} examples, train_data "
                             f"{kinds[self.classification]} ones")
        if self.classification:
            _check_classifier_padding(model, pad_token_id, config.batch_size)
        if config.output_dir and not hasattr(model, "save_pretrained"):
            raise ValueError(f"output_dir={config.output_dir!r}, but {type(model).__name__} has no save_pretrained")
        self.config = config
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if config.mixed_precision == "fp16" and device.type != "cuda":
            raise ValueError(f"mixed_precision='fp16' needs a CUDA device, not {device} (bf16 runs on the CPU too)")
        self.process = distributed.init_from_env(device.type)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.process.local_rank)
        self.device = device
        self.model = model.to(device)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        self.train_data, self.eval_data, self.pad_token_id = train_data, eval_data or [], pad_token_id
        self.shifted = loss_drops_first_label(model)
        self.sampler = DistributedSampler(train_data, self.process.world_size, self.process.rank,
                                          shuffle=config.shuffle, seed=config.seed)
        self.batches_per_epoch = math.ceil(len(self.sampler) / config.batch_size)
        k = config.gradient_accumulation_steps
        self.total_steps = config.max_steps or math.ceil(config.num_epochs * self.batches_per_epoch / k)
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=config.learning_rate, weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_factor, schedule=config.lr_scheduler_type, warmup_steps=config.warmup_steps,
            total_steps=self.total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.mixed_precision == "fp16")
        self.ddp = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                    if self.process.world_size > 1 else None)
        self.step = 0
        self.history: list = []

    # -- data --

    def _batch(self, examples: list) -> dict:
        return {k: v.to(self.device) for k, v in collate(examples, self.pad_token_id).items()}

    def _micro_batches(self, start: int):
        """The stream of collated micro-batches from micro-batch number `start` on (see module docstring)."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        size = self.config.batch_size
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for b in range(offset, self.batches_per_epoch):
                yield self._batch([self.train_data[i] for i in indices[b * size:(b + 1) * size]])
            epoch, offset = epoch + 1, 0

    # -- training --

    def train(self, resume_from_checkpoint=None) -> dict:
        """Train to total_steps; resume_from_checkpoint: a checkpoint folder, or "latest" for the newest in
        output_dir. Saves checkpoints and, at the end, the model to output_dir. Returns the last history
        entry (with the evaluate() metrics when there is eval data)."""
        if resume_from_checkpoint is not None:
            self.load_checkpoint(self._resolve_checkpoint(resume_from_checkpoint))
        else:
            torch.manual_seed(self.config.seed + self.process.rank)
        stream = self._micro_batches(self.step * self.config.gradient_accumulation_steps)
        # disable=None: a bar on a terminal only, so that logs redirected to a file get no stream of redraws
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=None if self.config.progress and self.process.is_main else True)
        while self.step < self.total_steps:
            start = time.perf_counter()
            loss, tokens = self._optimizer_step([next(stream) for _ in range(self.config.gradient_accumulation_steps)])
            entry = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                     "tokens_per_s": tokens / (time.perf_counter() - start)}
            self.scheduler.step()
            self.step += 1
            entry["step"] = self.step
            if self.eval_data and (self._every(self.config.eval_steps) or self.step == self.total_steps):
                entry.update(self.evaluate())
            self.history.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            if self.config.output_dir and self._every(self.config.save_steps) and self.step < self.total_steps:
                self.save_checkpoint(Path(self.config.output_dir) / f"checkpoint-{self.step}")
        bar.close()
        if self.config.output_dir:
            self.save_model(self.config.output_dir)
        return self.history[-1] if self.history else {}

    def _every(self, n: Optional[int]) -> bool:
        return n is not None and self.step % n == 0

    def _autocast(self):
        dtype = MIXED_PRECISION[self.config.mixed_precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _optimizer_step(self, batches: list) -> tuple:
        """One AdamW step on k micro-batches -> (mean loss over all label tokens, input tokens per process
        summed over processes)."""
        counts = [label_tokens(b["labels"], self.shifted) for b in batches]
        (total,) = distributed.all_sum([sum(counts)], self.device)
        model = self.ddp or self.model
        model.train()
        loss_sum = 0.0
        for i, (batch, n) in enumerate(zip(batches, counts)):
            last = i == len(batches) - 1
            with (contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()), self._autocast():
                out = model(**batch)
                # DDP averages gradients over processes; the world_size factor turns that into a sum
                weight = n * self.process.world_size / max(total, 1)
                loss = out.loss * weight if n else out.logits.sum() * 0.0
            self.scaler.scale(loss).backward()
            loss_sum += out.loss.item() * n if n else 0.0
        if self.config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        loss_sum, tokens = distributed.all_sum([loss_sum, tokens], self.device)
        return loss_sum / max(total, 1), tokens

    @torch.no_grad()
    def evaluate(self, eval_data: Optional[list] = None) -> dict:
        """{"eval_loss": mean loss over every label token of eval_data (default: the trainer's), "perplexity":
        exp(eval_loss)}; for classification examples {"eval_loss": mean loss over the examples, "accuracy":
        the share whose argmax logit is their class}. Each process takes every world_size-th example."""
        data = (self.eval_data if eval_data is None else eval_data)[self.process.rank::self.process.world_size]
        self.model.eval()
        loss_sum, count, correct = 0.0, 0, 0
        for i in range(0, len(data), self.config.batch_size):
            batch = self._batch(data[i:i + self.config.batch_size])
            n = label_tokens(batch["labels"], self.shifted)
            if n:
                with self._autocast():
                    out = self.model(**batch)
                loss_sum += out.loss.item() * n
                correct += correct_predictions(out.logits, batch["labels"]) if self.classification else 0
                count += n
        loss_sum, count, correct = distributed.all_sum([loss_sum, count, correct], self.device)
        if not count:
            raise ValueError("eval data has no label tokens")
        loss = loss_sum / count
        if self.classification:
            return {"eval_loss": loss, "accuracy": correct / count}
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    # -- files --

    def save_model(self, folder) -> None:
        """The model's own files (a PeftModel writes its adapters) and train_log.json, from rank 0."""
        if self.process.is_main:
            folder = Path(folder)
            self.model.save_pretrained(folder)
            log = json.dumps({"config": asdict(self.config), "history": self.history}, indent=1) + "\n"
            atomic_write(folder / LOG_NAME, lambda tmp: Path(tmp).write_text(log))
        distributed.barrier()

    def save_checkpoint(self, folder) -> None:
        """Everything resuming needs (see module docstring), written into `.<name>.partial` beside `folder` and
        renamed into place once complete: a killed save leaves no `checkpoint-<step>` that mixes two runs (an
        earlier run's folder of that name is replaced only by a whole new one)."""
        folder = Path(folder)
        partial, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
        if self.process.is_main:
            for leftover in (partial, old):
                shutil.rmtree(leftover, ignore_errors=True)
            partial.mkdir(parents=True)
            self.model.save_pretrained(partial)
            tensors = {n: p.detach().to("cpu").contiguous() for n, p in self.params.items()}
            atomic_write(partial / TRAINABLE_NAME, lambda tmp: save_file(tensors, tmp))
            state = {"step": self.step, "data_order": self._data_order(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "history": self.history}
            atomic_write(partial / STATE_NAME, lambda tmp: torch.save(state, tmp))
        distributed.barrier()
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        atomic_write(partial / f"rng_state_{self.process.rank}.pt", lambda tmp: torch.save(rng, tmp))
        distributed.barrier()
        if self.process.is_main:
            if folder.exists():
                folder.rename(old)
            partial.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _resolve_checkpoint(self, path) -> Path:
        if not isinstance(path, (str, Path)):
            raise TypeError(f"resume_from_checkpoint={path!r} must be a checkpoint folder or 'latest'")
        if path != "latest":
            return Path(path)
        if not self.config.output_dir:
            raise ValueError("resume_from_checkpoint='latest' needs output_dir")
        steps = {int(m.group(1)): p for p in Path(self.config.output_dir).glob("checkpoint-*")
                 if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
        complete = [steps[s] for s in sorted(steps) if all(f.is_file() for f in self._checkpoint_files(steps[s]))]
        if not complete:
            raise FileNotFoundError(f"{self.config.output_dir}: no complete checkpoint-<step> folder to resume from")
        return complete[-1]

    def _data_order(self) -> dict:
        """What fixes which examples each step sees: a resumed run must agree on all of it."""
        c = self.config
        return {"examples": len(self.train_data), "batch_size": c.batch_size, "seed": c.seed, "shuffle": c.shuffle,
                "gradient_accumulation_steps": c.gradient_accumulation_steps, "world_size": self.process.world_size}

    def _checkpoint_files(self, folder: Path) -> list:
        return [folder / TRAINABLE_NAME, folder / STATE_NAME, folder / f"rng_state_{self.process.rank}.pt"]

    def load_checkpoint(self, folder) -> None:
        """Restore what save_checkpoint wrote. Every file is read and checked before anything changes."""
        folder = Path(folder)
        files = self._checkpoint_files(folder)
        if folder.is_dir():
            finish_interrupted_write(folder)
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file}: not found; {folder} is not a complete checkpoint")
        try:
            tensors = load_file(files[0])
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise CheckpointError(f"{files[0]}: not a readable safetensors file (truncated?): {e}") from None
        problems = sorted(set(tensors) ^ set(self.params))
        problems += [n for n in set(tensors) & set(self.params) if tensors[n].shape != self.params[n].shape
                     or not tensors[n].is_floating_point()]
        if problems:
            raise CheckpointError(f"{files[0]}: does not match the model's trainable parameters (names, shapes, "
                                  f"float dtype): {problems[:5]}")
        state = _read_state(files[1], ("step", "data_order", "optimizer", "scheduler", "scaler", "history"))
        rng = _read_state(files[2], ("cpu", "cuda"))
        order = self._data_order()
        if not isinstance(state["step"], int) or not isinstance(state["data_order"], dict) \
                or not isinstance(state["history"], list):
            raise CheckpointError(f"{files[1]}: step, data_order or history is not what save_checkpoint writes")
        if set(state["data_order"]) != set(order):
            raise CheckpointError(f"{files[1]}: data_order has keys {sorted(state['data_order'])}, expected "
                                  f"{sorted(order)}")
        if not 0 <= state["step"] <= self.total_steps:
            raise CheckpointError(f"{files[1]}: step {state['step']} is outside this run's 0..{self.total_steps} steps")
        if not isinstance(rng["cpu"], torch.Tensor) or rng["cpu"].dtype != torch.uint8 \
                or rng["cpu"].shape != torch.get_rng_state().shape:
            raise CheckpointError(f"{files[2]}: 'cpu' is not a CPU generator state")
        changed = {k: (v, order[k]) for k, v in state["data_order"].items() if v != order[k]}
        if changed:
            raise CheckpointError(f"{files[1]}: the run differs from the checkpoint's in what orders the data, so it "
                             f"cannot continue it exactly: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        self._load_states(files[1], state)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])
        self.step, self.history = state["step"], state["history"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)


    def _load_states(self, file: Path, state: dict) -> None:
        """Optimizer, scheduler and grad-scaler state from `state`, all or none: a part that does not load (or
        an optimizer moment of the wrong shape) puts back what they held and raises CheckpointError."""
        parts = {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
        not_dicts = [k for k in parts if not isinstance(state[k], dict)]
        if not_dicts:
            raise CheckpointError(f"{file}: {not_dicts} must be state dicts")
        saved = {k: copy.deepcopy(part.state_dict()) for k, part in parts.items()}
        failing = None
        try:
            for failing, part in parts.items():
                part.load_state_dict(state[failing])
            failing = "optimizer"
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    for name, t in self.optimizer.state.get(p, {}).items():
                        if isinstance(t, torch.Tensor) and t.dim() and t.shape != p.shape:
                            raise ValueError(f"optimizer state {name!r} has shape {tuple(t.shape)}, its parameter "
                                             f"{tuple(p.shape)}")
        except Exception as e:  # torch's loaders raise KeyError, TypeError, ValueError by what is wrong
            for key, part in parts.items():
                part.load_state_dict(saved[key])
            raise CheckpointError(f"{file}: the {failing} state does not load: {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]}") from None


def check_examples(examples, name: str) -> bool:
    """examples: a non-empty list of lowrank.data's examples, all {"input_ids": [ids], "labels": [ids]} or
    all {"input_ids": [ids], "labels": class id >= 0}; True for the second kind (classification). ValueError
    naming the first example that is not."""
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError(f"{name} must be a non-empty list of examples, got "
                         f"{type(examples).__name__ if not isinstance(examples, (list, tuple)) else 'an empty one'}")
    first = examples[0].get("labels") if isinstance(examples[0], dict) else None
    classification = is_class_id(first)
    for i, example in enumerate(examples):
        for key in ("input_ids", "labels"):
            ids = example.get(key) if isinstance(example, dict) else None
            if key == "labels" and classification:
                if not is_class_id(ids) or ids < 0:
                    raise ValueError(f"{name}[{i}]['labels'] must be a class id >= 0, as {name}[0]'s is, got "
                                     f"{ids!r}")
            elif not isinstance(ids, (list, tuple)) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{name}[{i}][{key!r}] must be a non-empty list of token ids, got "
                                 f"{type(ids).__name__ if ids is not None else 'nothing'}")
    return classification


def _check_classifier_padding(model: nn.Module, pad_token_id: int, batch_size: int) -> None:
    """A classifier reads each row at its last token that is not config.pad_token_id: padding with another
    id, or behind virtual tokens (embeddings carry no pad id: it reads the last column), would read a pad."""
    expected = getattr(getattr(model, "config", None), "pad_token_id", None)
    if expected is not None and expected != pad_token_id:
        raise ValueError(f"pad_token_id={pad_token_id}, but the classifier reads each row's last token that is "
                         f"not config.pad_token_id={expected}; pass pad_token_id={expected}")
    if batch_size > 1 and has_virtual_tokens(model):
        raise ValueError(f"batch_size={batch_size}: behind a soft prompt (prompt tuning, P-tuning) the classifier "
                         f"gets embeddings and reads every row's last column (as transformers does), a pad "
                         f"token in a padded batch; use batch_size=1, or LoRA or prefix tuning")


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """How many rows of logits (B, num_labels) have their largest logit at their class id in labels (B,)."""
    return int((logits.argmax(-1) == labels).sum())


def _read_state(file: Path, keys) -> dict:
    """A torch.save'd dict of tensors and numbers, read with weights_only=True (nothing is unpickled but
    those), holding `keys`; CheckpointError naming the file when it is truncated or not such a dict."""
    try:
        state = torch.load(file, weights_only=True)
    except Exception as e:  # a truncated zip, or an object weights_only refuses
        raise CheckpointError(f"{file}: not a readable training state (truncated or not written by lowrank): "
                              f"{' '.join(str(e).split())[:200]}") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: missing {missing}")
    return state


def train(model: nn.Module, train_data: list, config: Optional[TrainingConfig] = None, eval_data=None,
          pad_token_id: int = 0, resume_from_checkpoint=None) -> Trainer:
    """Build a Trainer and train; returns it (its `history`, `evaluate()`, the trained `model`)."""
    trainer = Trainer(model, config or TrainingConfig(), train_data, eval_data, pad_token_id)
    trainer.train(resume_from_checkpoint)
    return trainer
