"""The `lowrank` command (also `python -m lowrank`): finetune, generate, merge, info.

    lowrank finetune MODEL_DIR DATA_FILE --output-dir OUT [--method lora --r 8 ...] [training options]
    lowrank finetune MODEL_DIR DATA_FILE --output-dir OUT --task seq-cls [--text-column text --label-column label]
    lowrank generate MODEL_DIR --prompt TEXT [--adapter DIR ...] [--compile]
    lowrank merge MODEL_DIR ADAPTER_DIR OUTPUT_DIR
    lowrank info PATH

A PEFT method is one entry of METHODS: the config class's name in `lowrank` and the options that fill its
fields. `--task seq-cls` trains a sequence classifier: the model's `score` head over the training file's
classes (lowrank.data.class_labels), evaluated by accuracy. Bad arguments exit with argparse's usage error
(code 2); any other error exits with one line on stderr naming the problem (code 1), never a traceback
(LOWRANK_TRACEBACK=1 shows it, for a bug report).
"""
import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from . import models

from . import config as peft_configs
from . import data, io
from .config import CLASSIFIER_HEADS, is_encoder_decoder
from .peft_model import PeftModel, get_peft_model
from .train import MIXED_PRECISION, SCHEDULES, Trainer, TrainingConfig


def _names(text: str):
    """"q,v" -> ["q", "v"]; "all-linear" and regexes (anything with regex characters) stay one string."""
    return text if text == "all-linear" or any(c in text for c in "*|()[]\\^$") else text.split(",")


@dataclass(frozen=True)
class Option:
    """One command-line option that sets one config field; type bool makes a flag."""

    flag: str
    field: str
    type: Callable = str
    help: str = ""

    def add_to(self, parser, default=None) -> None:
        if self.type is bool:
            parser.add_argument(self.flag, dest=self.field, action="store_true", default=default, help=self.help)
        else:
            parser.add_argument(self.flag, dest=self.field, type=self.type, default=default, help=self.help)


VIRTUAL_TOKENS = Option("--num-virtual-tokens", "num_virtual_tokens", int, "soft-prompt length N (default 8)")
ENCODER_HIDDEN = Option("--encoder-hidden-size", "encoder_hidden_size", int, "width of the prompt encoder")

# method name -> (config class in lowrank, options filling its fields; unset options keep the class's defaults)
METHODS = {
    "lora": ("LoraConfig", (
        Option("--r", "r", int, "LoRA rank (default 8)"),
        Option("--lora-alpha", "lora_alpha", float, "scaling numerator: scale = alpha / r (default 8)"),
        Option("--lora-dropout", "lora_dropout", float, "dropout on the LoRA input (default 0)"),
        Option("--target-modules", "target_modules", _names,
               "comma-separated module names, a regex, or all-linear (default: the model type's)"),
        Option("--use-rslora", "use_rslora", bool, "scale = alpha / sqrt(r)"),
    )),
    "prompt": ("PromptTuningConfig", (VIRTUAL_TOKENS,)),
    "prefix": ("PrefixTuningConfig", (VIRTUAL_TOKENS,
                                       Option("--prefix-projection", "prefix_projection", bool,
                                              "train the prefix through an MLP"), ENCODER_HIDDEN)),
    "ptuning": ("PromptEncoderConfig", (VIRTUAL_TOKENS, ENCODER_HIDDEN)),
}
METHOD_DEFAULTS = {"num_virtual_tokens": 8}
TASKS = ("lm", "seq-cls")

TRAINING = (
    Option("--epochs", "num_epochs", float, "passes over the data (default 1)"),
    Option("--max-steps", "max_steps", int, "optimizer steps; overrides --epochs"),
    Option("--batch-size", "batch_size", int, "examples per micro-batch and process (default 8)"),
    Option("--grad-accum", "gradient_accumulation_steps", int, "micro-batches per optimizer step (default 1)"),
    Option("--lr", "learning_rate", float, "peak learning rate (default 1e-3)"),
    Option("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0)"),
    Option("--scheduler", "lr_scheduler_type", str, f"one of {', '.join(SCHEDULES)} (default linear)"),
    Option("--warmup-steps", "warmup_steps", int, "linear warm-up steps (default 0)"),
    Option("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (default 1)"),
    Option("--mixed-precision", "mixed_precision", str, f"{' or '.join(k for k in MIXED_PRECISION if k)} autocast (fp16 on GPU only)"),
    Option("--seed", "seed", int, "seed of the adapter init, shuffling and dropout (default 0)"),
    Option("--save-steps", "save_steps", int, "checkpoint every N steps"),
    Option("--eval-steps", "eval_steps", int, "evaluate every N steps (with --eval-data)"),
    Option("--device", "device", str, "cpu, cuda or cuda:N (default: cuda if available)"),
)


def _load_model_and_tokenizer(model_dir, tokenizer_dir=None, device=None, classes=None):
    """The model (with classes: its sequence classifier over them, see classifier_config) and tokenizer."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    if classes is not None and models.read_config(Path(model_dir)).get("is_encoder_decoder"):
        raise ValueError(f"--task seq-cls: {model_dir} is an encoder-decoder model (T5), which has no sequence "
                         f"classification head; train it with --task lm, the label as --target-column")
    head = {} if classes is None else {"task_type": "SEQ_CLS", "num_labels": len(classes)}
    model = models.from_pretrained(model_dir, device=device, **head)
    tokenizer = models.load_tokenizer(tokenizer_dir or model_dir)
    n_tokens, vocab = tokenizer.tokenizer.get_vocab_size(), model.config.vocab_size
    if n_tokens > vocab:
        raise ValueError(f"{Path(tokenizer_dir or model_dir) / 'tokenizer.json'}: {n_tokens} tokens, more than "
                         f"the model's vocab_size={vocab}")
    if classes is not None:
        model.config = classifier_config(model.config, classes, tokenizer)
    return model, tokenizer


def classifier_config(config, classes, tokenizer):
    """The model config with the class names as id2label / label2id and a pad_token_id (the classifier reads
    each row at its last token that is not pad): the config's own, else the tokenizer's pad token, else the
    eos token, as transformers users set it (said on stderr); ValueError if there is none of them."""
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("--task seq-cls pads batches, but the model config, the tokenizer and its eos set no "
                             "pad token; set pad_token_id in config.json")
        print(f"lowrank finetune: neither the model nor the tokenizer sets a pad token; padding with the eos "
              f"token (id {pad}), as transformers users do", file=sys.stderr)
    return replace(config, pad_token_id=pad, extra={**config.extra, **data.label_maps(classes)})


def method_config(args):
    """The PEFT config that --method and its options describe (task_type unset); ValueError naming any
    option of another method."""
    class_name, options = METHODS[args.method]
    mine = {o.field for o in options}
    foreign = [o.flag for _, (_, opts) in METHODS.items() for o in opts
               if o.field not in mine and getattr(args, o.field) is not None]
    if foreign:
        flags = sorted(set(foreign))
        verb = "does" if len(flags) == 1 else "do"
        raise ValueError(f"{', '.join(flags)} {verb} not apply to --method {args.method}")
    fields = {o.field: getattr(args, o.field) for o in options if getattr(args, o.field) is not None}
    defaults = {k: v for k, v in METHOD_DEFAULTS.items() if k in mine}
    return getattr(peft_configs, class_name)(**{**defaults, **fields})


def max_length(args, model, config) -> int:
    """Tokens an example may have: --max-length, by default all a GPT-2 holds (n_positions, less the
    virtual tokens of a soft prompt, which take positions too) or 512 for T5; ValueError if it cannot fit."""
    positions = getattr(model, "max_positions", None)
    if positions is None:
        return args.max_length or 512
    virtual = getattr(config, "num_virtual_tokens", 0)
    if virtual >= positions:
        raise ValueError(f"--num-virtual-tokens {virtual} leaves no room for a token: the model holds "
                         f"n_positions={positions} positions")
    if args.max_length is not None and args.max_length > positions - virtual:
        raise ValueError(f"--max-length {args.max_length} does not fit: the model holds n_positions={positions} "
                         f"tokens, {virtual} of them virtual")
    return args.max_length or positions - virtual


def load_examples(path, model, tokenizer, args, max_length: int, classes=None) -> list:
    """Examples of a data file for the task and the model's kind: classification over `classes` (the
    training file's) when given, else seq2seq for T5 and causal LM otherwise."""
    common = dict(max_length=max_length, truncation=args.truncation)
    if classes is not None:
        return data.classification_examples(path, tokenizer, text_column=args.text_column or "text",
                                            label_column=args.label_column, labels=classes, **common)
    if is_encoder_decoder(model):
        return data.seq2seq_examples(path, tokenizer, source_column=args.source_column,
                                     target_column=args.target_column, **common)
    return data.causal_lm_examples(path, tokenizer, prompt_column=args.prompt_column,
                                   completion_column=args.completion_column, text_column=args.text_column, **common)


def check_output_dir(args) -> None:
    """A fresh run (no --resume) may not write over an adapter or checkpoints already in --output-dir unless
    --overwrite says so: ValueError naming what is there."""
    out = Path(args.output_dir)
    found = [p.name for p in (out / io.CONFIG_NAME, *sorted(out.glob("checkpoint-*"))) if p.exists()]
    if found and args.resume is None and not args.overwrite:
        raise ValueError(f"{out} already holds {', '.join(found)} from an earlier run; pass --overwrite to "
                         f"replace it, or --resume to continue it")


def finetune(args) -> None:
    check_output_dir(args)
    training = TrainingConfig(output_dir=str(args.output_dir), progress=not args.no_progress,
                              **{o.field: getattr(args, o.field) for o in TRAINING if getattr(args, o.field) is not None})
    config = method_config(args)
    classes = data.class_labels(args.data, args.label_column) if args.task == "seq-cls" else None
    model, tokenizer = _load_model_and_tokenizer(args.model, args.tokenizer, training.device, classes)
    length = max_length(args, model, config)
    train_data = load_examples(args.data, model, tokenizer, args, length, classes)
    eval_data = load_examples(args.eval_data, model, tokenizer, args, length, classes) if args.eval_data else None
    task_type = "SEQ_CLS" if classes is not None else "SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM"
    config = replace(config, task_type=task_type)
    torch.manual_seed(training.seed)
    peft = get_peft_model(model, config)
    pad_token_id = model.config.pad_token_id if classes is not None else tokenizer.pad_token_id or 0
    trainer = Trainer(peft, training, train_data, eval_data, pad_token_id=pad_token_id)
    if trainer.process.is_main:
        peft.print_trainable_parameters()
        if classes is not None:
            print("classes:", " ".join(f"{i}={name}" for i, name in enumerate(classes)))
    last = trainer.train(resume_from_checkpoint=args.resume)
    if trainer.process.is_main:
        print(" ".join(f"{k}={v:.4g}" for k, v in last.items()), f"-> {args.output_dir}")


def generate(args) -> None:
    """One generation per --adapter, each on the plain base model (LoRA and soft prompts cannot share one
    model), or one without adapters. Everything is generated before anything is printed, so a bad adapter
    prints nothing else. A model with a position limit generates at most what still fits (said on stderr)."""
    model, tokenizer = _load_model_and_tokenizer(args.model, args.tokenizer, args.device)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in tokenizer([args.prompt]).items()}
    if batch["input_ids"].numel() == 0:
        raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens")
    settings = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.compile:
        settings.update(cache_implementation="static", compile=True)
    texts = []
    for folder in args.adapter or [None]:
        peft = model if folder is None else PeftModel.from_pretrained(model, folder)
        virtual = 0 if folder is None else getattr(peft.peft_config["default"], "num_virtual_tokens", None) or 0
        new = _new_tokens_that_fit(model, batch["input_ids"].shape[1] + virtual, args.max_new_tokens)
        out = peft.generate(**batch, max_new_tokens=new, **settings)
        text = tokenizer.decode(out[0, peft.generation_prefix(batch["input_ids"]).shape[1]:])
        texts.append(f"[{folder}] {text}" if folder is not None else text)
        if folder is not None:
            model = peft.unload()
    print("\n".join(texts))


def _new_tokens_that_fit(model, used: int, wanted: int) -> int:
    positions = getattr(model, "max_positions", None)
    if positions is None or used + wanted <= positions:
        return wanted
    if used >= positions:
        raise ValueError(f"the prompt takes {used} of the model's {positions} positions: no room for a new token")
    print(f"lowrank generate: --max-new-tokens {wanted} capped at {positions - used}: the model holds "
          f"{positions} positions, the prompt takes {used}", file=sys.stderr)
    return positions - used


def merge(args) -> None:
    config = io.read_adapter(args.adapter)[0]
    if config.peft_type != "LORA":
        raise ValueError(f"{Path(args.adapter) / io.CONFIG_NAME}: peft_type={config.peft_type!r}; only LoRA "
                         f"adapters are weights that merge into the model")
    model = models.from_pretrained(args.model)
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    merged.save_pretrained(args.output_dir)
    tokenizer = Path(args.model) / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copy(tokenizer, Path(args.output_dir) / "tokenizer.json")
    print(f"merged {args.adapter} into {args.model} -> {args.output_dir}")


def _tensor_shapes(file: Path) -> dict:
    """{key: (shape, dtype)} of a safetensors file, or of every shard a model.safetensors.index.json names."""
    if file.name == models.INDEX_NAME:
        return {k: v for shard in sorted(models.shard_keys(file)) for k, v in _tensor_shapes(shard).items()}
    try:
        with safe_open(file, framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own exception type for a damaged file
        raise ValueError(f"{file}: not a readable safetensors file: {e}") from None


def info(args) -> None:
    """Print the config and the tensor count of an adapter or model folder; everything is read first, so a
    bad file prints nothing but the error."""
    path = Path(args.path)
    if (path / io.CONFIG_NAME).is_file():
        config_file, weights = path / io.CONFIG_NAME, path / io.WEIGHTS_NAME
        config = io.read_adapter_config(config_file)
        title, fields = f"adapter: {config.peft_type} ({type(config).__name__})", config.to_dict()
    elif (path / models.CONFIG_NAME).is_file():
        fields = models.read_config(path)
        weights = path / models.WEIGHTS_NAME
        if not weights.is_file() and (path / models.INDEX_NAME).is_file():
            weights = path / models.INDEX_NAME
        architectures = fields.get("architectures", [])
        names = architectures if isinstance(architectures, list) else [architectures]
        title = f"model: {fields.get('model_type')} ({', '.join(str(a) for a in names)})"
    else:
        raise FileNotFoundError(f"{path}: neither {io.CONFIG_NAME} (an adapter) nor config.json (a model)")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found")
    shapes = _tensor_shapes(weights)
    count = sum(torch.Size(shape).numel() for shape, _ in shapes.values())
    dtypes = sorted({dtype for _, dtype in shapes.values()})
    print(title)
    print(json.dumps(fields, indent=2, sort_keys=True))
    print(f"{weights.name}: {len(shapes)} tensors, {count:,d} parameters ({', '.join(dtypes)})")
    head = classifier_head(fields, shapes)
    if head:
        print(head)


def classifier_head(fields: dict, shapes: dict) -> str:
    """"head: score.weight [2, 32], 2 labels: bad, good" for a model (or adapter) file holding a
    classification head (CLASSIFIER_HEADS), with config.json's id2label names; "" for one without."""
    tensors = [f"{k} {list(shape)}" for k, (shape, _) in sorted(shapes.items())
               if set(k.split(".")) & set(CLASSIFIER_HEADS)]
    if not tensors:
        return ""
    names = fields.get("id2label")
    labels = f", {len(names)} labels: {', '.join(map(str, names.values()))}" if isinstance(names, dict) else ""
    return f"head: {', '.join(tensors)}{labels}"


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description="Parameter-efficient fine-tuning of GPT-2 and T5.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("finetune", help="train an adapter on a data file", description=(
        "Train an adapter. Causal LMs (GPT-2) read prompt/completion columns (loss on the completion) or a "
        "text column (.txt: one example per line); T5 reads source/target columns. --task seq-cls trains a "
        "classifier on text/label columns: the training file's distinct labels, sorted, are the classes."))
    p.add_argument("model", type=Path, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("data", type=Path, help=".jsonl, .csv or .txt training data")
    p.add_argument("--output-dir", type=Path, required=True, help="where the adapter and checkpoints go")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: the model folder)")
    p.add_argument("--eval-data", type=Path, help="evaluation data, same format")
    p.add_argument("--method", choices=sorted(METHODS), default="lora")
    p.add_argument("--task", choices=TASKS, default="lm", help=(
        "lm (default): learn the text, as a causal LM (GPT-2) or seq2seq (T5) by the model; seq-cls: a "
        "decoder's score head on its last token over the labels of --label-column (T5 classifies as lm, "
        "generating the label's text)"))
    group = p.add_argument_group("method options (the methods each applies to in brackets)")
    applies = {}
    for name, (_, options) in METHODS.items():
        for o in options:
            applies.setdefault(o, []).append(name)
    for o, names in applies.items():
        replace(o, help=f"{o.help} [{', '.join(names)}]").add_to(group)
    group = p.add_argument_group("data")
    group.add_argument("--max-length", type=positive_int, help="tokens per example (default: what the model holds: n_positions less any virtual tokens, or 512)")
    group.add_argument("--truncation", choices=data.TRUNCATION, default="refuse", help="for over-long examples")
    for flag, default in (("--prompt-column", "prompt"), ("--completion-column", "completion"),
                          ("--source-column", "source"), ("--target-column", "target"), ("--label-column", "label")):
        group.add_argument(flag, default=default, help=f"column name (default {default})")
    group.add_argument("--text-column", help="column of texts learned whole (lm; default: prompt/completion, or "
                                             "text for .txt) or classified (seq-cls; default text)")
    group = p.add_argument_group("training")
    for o in TRAINING:
        o.add_to(group)
    group.add_argument("--resume", help="a checkpoint folder, or 'latest' in --output-dir")
    group.add_argument("--overwrite", action="store_true", help="replace an adapter or checkpoints already in --output-dir")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=finetune)

    p = commands.add_parser("generate", help="generate text, with or without adapters")
    p.add_argument("model", type=Path, help="checkpoint folder")
    p.add_argument("--prompt", required=True, help="text to continue (T5: the input text)")
    p.add_argument("--adapter", type=Path, action="append", default=[],
                   help="adapter folder; repeat to compare several (one generation each)")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: the model folder)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="with --do-sample (default 1)")
    p.add_argument("--top-k", type=positive_int, help="with --do-sample: sample from the k most likely tokens")
    p.add_argument("--top-p", type=probability, help="with --do-sample: sample from the smallest set holding mass p")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="decode on a static KV cache with a compiled step (torch.compile; CUDA graphs on CUDA)")
    p.set_defaults(run=generate)

    p = commands.add_parser("merge", help="fold a LoRA adapter into the weights: a plain checkpoint")
    p.add_argument("model", type=Path, help="checkpoint folder")
    p.add_argument("adapter", type=Path, help="LoRA adapter folder")
    p.add_argument("output_dir", type=Path, help="folder for the merged checkpoint (transformers loads it)")
    p.set_defaults(run=merge)

    p = commands.add_parser("info", help="a checkpoint's or an adapter's config and parameter count")
    p.add_argument("path", type=Path, help="model or adapter folder")
    p.set_defaults(run=info)
    return parser


def main(argv=None) -> int:
    """Run one command; returns the exit code (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"lowrank {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line naming the problem, not a traceback (LOWRANK_TRACEBACK=1 shows it)
        if os.environ.get("LOWRANK_TRACEBACK") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        kind = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
        print(f"lowrank {args.command}: error: {kind}{message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m lowrank.cli (torchrun -m lowrank.cli), beside python -m lowrank
    sys.exit(main())
