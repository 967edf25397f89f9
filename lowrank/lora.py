"""The LoRA layer: a frozen linear plus scaled low-rank adapters (docs/formats.md C.3, docs/equation.md).

    y = x @ W + s * (x @ A) @ B + bias,    s = lora_alpha / r  (lora_alpha / sqrt(r) with rsLoRA)

In memory the names are PEFT's: `base_layer`, `lora_A[adapter]` = Linear(in, r) (weight (r, in) = A.T),
`lora_B[adapter]` = Linear(r, out) (weight (out, r) = B.T), `lora_dropout[adapter]`, `scaling[adapter]`.
The base may be an nn.Linear (weight (out, in)) or GPT-2's Conv1D (weight (in, out)); kernels take strided
views, so neither layout is copied.
"""
import copy
import functools
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .checks import is_count, is_number
from .files import checked_name

BASE = "__base__"  # the adapter name of rows that take the base layer alone in a mixed batch


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D layout, y = x @ weight + bias with weight (in, out). Recognised by class name so
    that ours and transformers' both qualify without importing either (lowrank -> models by names only)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2


def linear_features(module: nn.Module) -> tuple:
    """(in_features, out_features) of an nn.Linear, a Conv1D or a LoraLayer; TypeError for anything else."""
    if isinstance(module, (nn.Linear, LoraLayer)):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return tuple(module.weight.shape)
    raise TypeError(f"{type(module).__name__} is not supported: LoRA wraps nn.Linear and GPT-2 Conv1D layers")


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def init_lora(lora_A: nn.Linear, lora_B: nn.Linear, init, r: int) -> None:
    """True: A kaiming-uniform(a=sqrt 5), B = 0, so a new adapter starts as the identity edit;
    "gaussian": A ~ N(0, 1/r), B = 0; False: both keep nn.Linear's init (B != 0, for tests)."""
    if init is False:
        return
    if init == "gaussian":
        nn.init.normal_(lora_A.weight, std=1 / r)
    else:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_B.weight)


class LoraLayer(nn.Module):
    """One frozen linear with any number of LoRA adapters.

    x: (..., in_features) -> (..., out_features). `active_adapters` add up; `disable_adapters` or a merged
    state runs the base alone; `row_adapters` (one name per row of x, set by PeftModel for a call) routes
    each row through its own adapter.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r, self.lora_alpha, self.use_rslora, self.scaling = {}, {}, {}, {}
        self.active_adapters: list = []
        self.merged_adapters: list = []
        self.disable_adapters = False
        self.row_adapters = None
        self._stacks = None  # (key, (A_stack, B_stack, scales)): see adapter_stacks
        self._row_index = None  # (key, index): see row_index

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, dtype=None) -> None:
        """Add an adapter: lora_A (r, in) and lora_B (out, r) on the base weight's device, in `dtype`
        (default: the base weight's). Every argument is checked before the layer changes."""
        checked_name(adapter_name, "adapter name")
        if not is_count(r):
            raise ValueError(f"r={r!r} must be an integer >= 1")
        if not is_number(lora_alpha):
            raise ValueError(f"lora_alpha={lora_alpha!r} must be a finite number")
        if not (is_number(lora_dropout) and 0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1)")
        weight = self.base_layer.weight
        factory = dict(device=weight.device, dtype=dtype or weight.dtype)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        init_lora(self.lora_A[adapter_name], self.lora_B[adapter_name], init_lora_weights, r)
        self.r[adapter_name], self.lora_alpha[adapter_name], self.use_rslora[adapter_name] = r, lora_alpha, use_rslora
        self.scaling[adapter_name] = lora_scaling(lora_alpha, r, use_rslora)

    def set_scale(self, adapter: str, scale: float) -> None:
        """scaling = scale * (lora_alpha / r, or / sqrt(r) with rsLoRA), as PEFT's set_scale. A layer
        without this adapter ignores the call. A tensor scaling (lowrank.hotswap) is written in place."""
        if not is_number(scale):
            raise ValueError(f"scale={scale!r} must be a finite number")
        if adapter not in self.scaling:
            return
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged; unmerge it before changing its scale")
        set_scaling(self, adapter, scale * lora_scaling(self.lora_alpha[adapter], self.r[adapter], self.use_rslora[adapter]))

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged; unmerge it before deleting it")
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.r, self.lora_alpha, self.use_rslora, self.scaling):
            if adapter in table:
                del table[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def enable_adapters(self, enabled: bool) -> None:
        """Disabling runs the base alone, so merged adapters come out of the weight first (as PEFT does)."""
        if not enabled:
            self.unmerge()
        self.disable_adapters = not enabled

    # -- forward --

    def forward(self, x: torch.Tensor, adapter_names=None) -> torch.Tensor:
        """adapter_names: one adapter name per row of x for a mixed batch (default: `row_adapters`)."""
        if self.disable_adapters or self.merged_adapters:
            return self.base_layer(x)
        adapter_names = self.row_adapters if adapter_names is None else adapter_names
        if adapter_names is not None:
            return mixed_batch_forward(self, x, adapter_names)
        names = [a for a in self.active_adapters if a in self.lora_A]
        if not names:
            return self.base_layer(x)
        return self.adapter_forward(x, names)

    def adapter_forward(self, x: torch.Tensor, names) -> torch.Tensor:
        """base(x) + sum_i s_i * lora_B_i(lora_A_i(dropout_i(x))) as one kernels.lora_matmul call: LoRA dropout
        runs inside it (training), fp32 adapters on a 16-bit x stay fp32, and several adapters are one
        product of rank sum(r_i): A = [A_1 | A_2 ...], B = [s_1 B_1; s_2 B_2 ...].

        Active adapters whose dropout probabilities differ (training only) cannot share one mask: the
        first probability's adapters are fused, the others are added unfused, as PEFT runs them all.
        """
        p = {n: self.dropout_p(n) for n in names}
        fused = [n for n in names if p[n] == p[names[0]]]
        A, B, scale = self.low_rank_factors(fused, x.dtype)
        y = kernels.lora_matmul(x, self.weight_kn(), A, B, scale, self.base_layer.bias, dropout_p=p[names[0]])
        for name in names:
            if name not in fused:
                y = self._add_low_rank(y, x, name)
        return y

    def dropout_p(self, name: str) -> float:
        """The adapter's LoRA dropout probability while training, else 0."""
        dropout = self.lora_dropout[name]
        return dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0

    def low_rank_factors(self, names, x_dtype: torch.dtype) -> tuple:
        """(A (in, r), B (r, out), scale) for kernels.lora_matmul: one adapter's views of lora_A.weight.T and
        lora_B.weight.T with its scaling, or several concatenated along the rank with the scalings folded
        into B and scale 1 (as is a tensor scaling, see lowrank.hotswap). The factors keep their dtype when
        lora_matmul takes it (x's, or fp32 with a 16-bit x) and are otherwise promoted with x's (exactly:
        e.g. fp16 adapters on an fp32 model)."""
        factors = [(self.lora_A[n].weight.T, self.lora_B[n].weight.T) for n in names]
        dtype = functools.reduce(torch.promote_types, [a.dtype for a, _ in factors], x_dtype)
        if dtype not in (x_dtype, torch.float32):
            dtype = x_dtype
        factors = [(a.to(dtype), b.to(dtype)) for a, b in factors]
        if len(factors) == 1:
            (a, b), scaling = factors[0], self.scaling[names[0]]
            # a tensor scaling (lowrank.hotswap) goes into B, so the compiled graph never reads its value
            return (a, b * scaling, 1.0) if isinstance(scaling, torch.Tensor) else (a, b, scaling)
        A = torch.cat([a for a, _ in factors], dim=1)
        B = torch.cat([b * self.scaling[n] for n, (_, b) in zip(names, factors)], dim=0)
        return A, B, 1.0

    def batchable(self, x: torch.Tensor, names) -> bool:
        """Whether kernels.lora_matmul_batched can run these adapters: no live dropout, x's dtype throughout."""
        if any(self.dropout_p(n) > 0 for n in names):
            return False
        return all(x.dtype == self.lora_A[n].weight.dtype == self.base_layer.weight.dtype for n in names)

    def weight_kn(self) -> torch.Tensor:
        """The base weight seen as (in, out), a view of either layout."""
        weight = self.base_layer.weight
        return weight if self.fan_in_fan_out else weight.T

    def adapter_stacks(self, names) -> tuple:
        """(A_stack (n, in, r_max), B_stack (n, r_max, out), scales (n,) fp32) of these adapters, lower
        ranks zero-padded, for kernels.lora_matmul_batched.

        Without autograd, in eager calls, the stacks are cached until a factor changes (an in-place update
        bumps its version counter), so decoding does not rebuild them every step; a compiled graph builds
        them inside the graph instead.
        """
        factors = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in names]
        cacheable = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in factors))
        if cacheable:
            key = tuple((id(a), a._version, id(b), b._version, self.scaling[n]) for n, (a, b) in zip(names, factors))
            if self._stacks is not None and self._stacks[0] == key:
                return self._stacks[1]
        r_max = max(a.shape[0] for a, _ in factors)
        A = torch.stack([F.pad(a.T, (0, r_max - a.shape[0])) for a, _ in factors])
        B = torch.stack([F.pad(b.T, (0, 0, 0, r_max - b.shape[1])) for _, b in factors])
        scales = torch.tensor([self.scaling[n] for n in names], dtype=torch.float32, device=A.device)
        if cacheable:
            self._stacks = (key, (A, B, scales))
        return A, B, scales

    def row_index(self, adapter_names, names, device) -> torch.Tensor:
        """(B,) long on `device`: each row's slot among `names` (the stacks' order), -1 for the base alone.
        Cached while the rows' names stay the same, as through every decode step of a mixed-batch generate
        (in eager calls; a compiled graph holds it as a constant)."""
        slot = {n: i for i, n in enumerate(names)}
        if torch.compiler.is_compiling():
            return torch.tensor([slot.get(n, -1) for n in adapter_names], device=device)
        key = (tuple(adapter_names), tuple(names), device)
        if self._row_index is None or self._row_index[0] != key:
            self._row_index = (key, torch.tensor([slot.get(n, -1) for n in adapter_names], device=device))
        return self._row_index[1]

    def _add_low_rank(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """y + s * lora_B(lora_A(dropout(x))) in the adapter's dtype, then y's (PEFT's unfused way)."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        low_rank = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
        return (y + low_rank * self.scaling[name]).to(y.dtype)

    # -- merging --

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s * B @ A in the base weight's layout: (out, in) for nn.Linear, (in, out) for Conv1D.
        Half-precision factors on CPU are multiplied in fp32, as PEFT does."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        delta = (B @ A) * self.scaling[adapter]
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, adapter_names=None) -> None:
        """Fold adapters (default: the active ones) into the base weight, W += delta, one rounding to
        W's dtype. Adapters already merged, or not in this layer, are skipped."""
        for name in self.active_adapters if adapter_names is None else adapter_names:
            if name in self.lora_A and name not in self.merged_adapters:
                with torch.no_grad():
                    self.base_layer.weight.add_(self.get_delta_weight(name))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W -= delta for the merged adapters, last merged first: merge's inverse within one rounding of
        W's dtype per step (|error| <= eps * (|W| + |delta|))."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.base_layer.weight.sub_(self.get_delta_weight(name))


def group_rows(x: torch.Tensor, adapter_names, known, fn) -> torch.Tensor:
    """fn(name, rows of x) for each distinct name, rows gathered along dim 0 and scattered back.

    adapter_names: one name per row of x; a name not in `known` runs as BASE.
    """
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} rows")
    groups = defaultdict(list)
    for row, name in enumerate(adapter_names):
        groups[name if name in known else BASE].append(row)
    if len(groups) == 1:
        return fn(next(iter(groups)), x)
    out = None
    for name, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        y = fn(name, x.index_select(0, index))
        if out is None:
            out = y.new_empty(x.shape[0], *y.shape[1:])
        out.index_copy_(0, index, y)
    return out


def mixed_batch_forward(layer: LoraLayer, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """Each row of x (B, ..., in) through the base plus its own adapter -> (B, ..., out).

    adapter_names: B names, BASE (or a name this layer lacks) for the base alone. One
    kernels.lora_matmul_batched call for the whole batch; live dropout or a LoRA dtype other than x's
    falls back to one kernels.lora_matmul call per adapter on its gathered rows.
    """
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} rows")
    names = [n for n in dict.fromkeys(adapter_names) if n in layer.lora_A]
    if not names:
        return layer.base_layer(x)
    if not layer.batchable(x, names):
        return group_rows(x, adapter_names, layer.lora_A,
                          lambda name, rows: layer.base_layer(rows) if name == BASE else layer.adapter_forward(rows, [name]))
    A, B, scales = layer.adapter_stacks(names)
    index = layer.row_index(adapter_names, names, x.device).view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])
    return kernels.lora_matmul_batched(x, layer.weight_kn(), A, B, scales, index, layer.base_layer.bias)


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: `original_module` stays frozen, `modules_to_save[adapter]` is a deep copy
    that trains and runs while its adapter is active (PEFT's names and behaviour)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list = []
        self.disable_adapters = False
        self.row_adapters = None

    def update(self, adapter: str) -> None:
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module)

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.modules_to_save:
            del self.modules_to_save[adapter]

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def module_for(self, adapter) -> nn.Module:
        return self.modules_to_save[adapter] if adapter in self.modules_to_save else self.original_module

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters:
            return self.original_module(x, *args, **kwargs)
        if self.row_adapters is not None:
            return group_rows(x, self.row_adapters, self.modules_to_save,
                              lambda name, rows: self.module_for(name)(rows, *args, **kwargs))
        active = next((a for a in self.active_adapters if a in self.modules_to_save), None)
        return self.module_for(active)(x, *args, **kwargs)


def base_modules(model: nn.Module):
    """(path, module) for a model's own modules, root excluded; an adapter wrapper (LoraLayer,
    ModulesToSaveWrapper) stands for the module it wraps, and its insides are skipped."""
    inside = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            inside.append(name + ".")
        yield name, module


@torch.no_grad()
def combine_adapters(layer: LoraLayer, adapters, weights, combination_type: str, rank: int) -> tuple:
    """Factors (A (rank, in), B (out, rank)) of a new adapter with scaling 1 that mixes `adapters`:

    "cat":    A = [w_i s_i A_i; ...], B = [B_i, ...] stacked along the rank: delta = sum w_i delta_i exactly.
    "linear": A = sum sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum sqrt|w_i s_i| B_i (equal ranks; PEFT's
              approximation, exact only for a single adapter).
    "svd":    the best rank-`rank` approximation of sum w_i delta_i (truncated SVD, in float64).

    Zero-padded to `rank`. Adapters this layer lacks are skipped; with none left the factors are zero.
    """
    present = [(name, w) for name, w in zip(adapters, weights) if name in layer.lora_A]
    dtype = layer.lora_A[present[0][0]].weight.dtype if present else layer.base_layer.weight.dtype
    A = torch.zeros(rank, layer.in_features, dtype=torch.float64, device=layer.base_layer.weight.device)
    B = torch.zeros(layer.out_features, rank, dtype=torch.float64, device=A.device)
    factors = [(layer.lora_A[n].weight.double(), layer.lora_B[n].weight.double(), w * layer.scaling[n]) for n, w in present]
    if not factors:
        return A.to(dtype), B.to(dtype)
    if combination_type == "cat":
        a, b = torch.cat([ws * a for a, _, ws in factors]), torch.cat([b for _, b, _ in factors], dim=1)
    elif combination_type == "linear":
        if len({a.shape[0] for a, _, _ in factors}) > 1:
            raise ValueError(f"combination_type='linear' needs equal ranks; {adapters} have ranks "
                             f"{[layer.r[n] for n, _ in present]} in this layer")
        a = sum(math.copysign(math.sqrt(abs(ws)), ws) * a for a, _, ws in factors)
        b = sum(math.sqrt(abs(ws)) * b for _, b, ws in factors)
    elif combination_type == "svd":
        U, S, Vh = torch.linalg.svd(sum(ws * (b @ a) for a, b, ws in factors), full_matrices=False)
        a, b = Vh[:rank], U[:, :rank] * S[:rank]
    else:
        raise ValueError(f"combination_type={combination_type!r} must be 'svd', 'linear' or 'cat'")
    A[: a.shape[0]], B[:, : b.shape[1]] = a, b
    return A.to(dtype), B.to(dtype)


def set_scaling(layer: LoraLayer, adapter: str, value: float) -> None:
    """layer.scaling[adapter] = value; a tensor scaling (lowrank.hotswap) keeps its storage, so that a compiled
    graph, which holds the tensor, reads the new value."""
    scaling = layer.scaling[adapter]
    if isinstance(scaling, torch.Tensor):
        with torch.no_grad():
            scaling.fill_(value)
        layer._stacks = None  # the mixed-batch cache keys on the scaling object, unchanged by fill_
    else:
        layer.scaling[adapter] = value
