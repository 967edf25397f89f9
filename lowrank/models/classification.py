"""Sequence classification on a decoder: a `score` head on each row's last real token, and transformers'
loss for its problem_type (docs/formats.md A.6)."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import DecoderModel
from .inputs import check_inputs, values_checked
from .outputs import ModelOutput

def last_token_index(input_ids, pad_token_id, batch: int, length: int):
    """(B,) index of each row's last token that is not pad_token_id (left or right padding alike), as
    transformers finds it; -1 (the last column) for inputs_embeds, or for one row without a pad token id."""
    if pad_token_id is None:
        if batch != 1:
            raise ValueError("pad_token_id is None in the model config: the last real token of a batch of "
                             f"{batch} rows cannot be found; set config.pad_token_id")
        return torch.full((1,), length - 1)
    if input_ids is None:
        if not torch.compiler.is_compiling():  # a warning would break the graph; eager calls give it
            warnings.warn("inputs_embeds carry no pad tokens: the score is read at the last column of every row, "
                          "as transformers does", stacklevel=3)
        return torch.full((batch,), length - 1)
    columns = torch.arange(length, device=input_ids.device)
    return (columns * (input_ids != pad_token_id)).argmax(-1)


def problem_type_of(config, labels) -> str:
    """config.problem_type, or transformers' choice from num_labels and the labels' dtype."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def check_labels(labels, config, batch: int) -> None:
    """labels fit the problem type: (B,) integer class ids in [0, num_labels) for single-label
    classification, B * num_labels floats for regression and multi-label (multi-hot) classification."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    kind, n = problem_type_of(config, labels), config.num_labels
    if kind == "single_label_classification":
        if labels.dtype not in (torch.long, torch.int) or labels.dim() != 1 or labels.numel() != batch:
            raise ValueError(f"labels for single-label classification: ({batch},) integer class ids, got shape "
                             f"{tuple(labels.shape)} of {labels.dtype}")
        bad = (labels < 0) | (labels >= n)
        if values_checked() and bool(bad.any()):
            raise ValueError(f"labels hold {int(labels[bad][0])}, outside the {n} labels [0, {n})")
    elif not labels.is_floating_point():
        raise ValueError(f"labels for {kind} must be floats ({batch}, {n}), got {labels.dtype}")
    elif labels.numel() != batch * n or labels.dim() > 2:
        raise ValueError(f"labels for {kind} have shape {tuple(labels.shape)}, expected ({batch}, {n})")


def classification_loss(logits, labels, config):
    """logits (B, L), labels checked by check_labels -> MSE (regression), cross-entropy (single label) or
    BCE with logits (multi-label), each a mean, as transformers computes them."""
    kind = problem_type_of(config, labels)
    if kind == "single_label_classification":
        return F.cross_entropy(logits.float(), labels.long())
    labels = labels.float().reshape(logits.shape)
    if kind == "regression":
        return F.mse_loss(logits.float(), labels)
    return F.binary_cross_entropy_with_logits(logits.float(), labels)


class SequenceClassifier(DecoderModel):
    """The `score` head, nn.Linear(hidden, num_labels, bias=False), on the last real token of each row."""

    head_names = ("score",)

    def build_head(self, config) -> None:
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, token_type_ids=None) -> ModelOutput:
        """input_ids (B, T) or inputs_embeds (B, T, C); labels (B,) class ids, or (B, num_labels) floats
        (see classification_loss); the rest as DecoderModel.hidden_states (past_key_values: a learned
        prefix). Returns logits (B, num_labels) at each row's last real token (last_token_index), and loss."""
        c = self.config
        B, T = check_inputs(input_ids, inputs_embeds, c.vocab_size, c.hidden_size)
        if labels is not None:
            check_labels(labels, c, B)
        last = last_token_index(input_ids, c.pad_token_id, B, T)
        x, _ = self.hidden_states(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                  False, token_type_ids)
        logits = self.score(x[torch.arange(B, device=x.device), last.to(x.device)])
        loss = classification_loss(logits, labels, c) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)
