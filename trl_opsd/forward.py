"""Model forwards restricted to the completion: its logits, or its final hidden states and the LM head.

Every batch is laid out as ``[left-padded prompt | right-padded completion]`` (``trl_opsd.collator``), so the
completion is the last ``T`` columns for every row and position ``t`` of a result predicts completion token ``t``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class HeadInputs(NamedTuple):
    """What the chunked loss takes instead of logits: final hidden states and the LM head that projects them."""

    hidden: torch.Tensor  # [B, T, H]: position t's projection predicts completion token t
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int):
    """Logits predicting each of the last ``completion_len`` tokens of ``input_ids``: shape [B, T, V].

    Logits at column j predict token j + 1, so the completion (the last T columns) is predicted by
    columns -T-1 .. -2. Only those T + 1 columns are projected to the vocabulary (``logits_to_keep``).
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=completion_len + 1,
        use_cache=False,
    )
    return outputs.logits[:, :-1, :]


def plain_output_head(module: nn.Module) -> nn.Linear | None:
    """The LM head if, as far as the config tells, logits are just ``head(last hidden state)``; else None.

    None for soft-capped logits and for heads that are not a plain ``nn.Linear`` (a PEFT adapter on the head, a
    quantised head), whose ``weight`` alone does not give the logits.
    """
    config = getattr(module, "config", None)
    if config is None or getattr(config.get_text_config(), "final_logit_softcapping", None) is not None:
        return None
    get_head = getattr(module, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return head if type(head) is nn.Linear else None


@torch.no_grad()
def _head_reproduces_logits(head: nn.Linear, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``head(hidden)`` equals the model's own ``logits``: catches logit scales the config hides."""
    recomputed = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    logits = logits.float()
    # A few ulps of the head's dtype relative to the largest logit: matmuls of other shapes round differently.
    largest = logits.abs().nan_to_num(nan=0.0, posinf=0.0).max().clamp(min=1.0)
    tolerance = 8 * torch.finfo(head.weight.dtype).eps * largest.item()
    return bool(torch.isclose(recomputed, logits, rtol=0.0, atol=tolerance, equal_nan=True).all())


def completion_head_inputs(
    model: nn.Module, head: nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    completion_len: int,
) -> HeadInputs | None:
    """The final hidden states predicting each of the last ``completion_len`` tokens, unprojected.

    Runs the model's own forward (so DDP, PEFT and gradient checkpointing see a normal call) with only the last
    position projected; that one logit row checks the head. None when the model's logits are not ``head(hidden)``.
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=1,
        output_hidden_states=True,
        use_cache=False,
    )
    final_hidden = outputs.hidden_states[-1].to(head.weight.device)
    if not _head_reproduces_logits(head, final_hidden[:, -1], outputs.logits[:, -1]):
        return None
    return HeadInputs(final_hidden[:, -completion_len - 1 : -1], head.weight, head.bias)


def unpadded_rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's token ids without its padding, as lists (what remote teachers and vLLM take)."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def completion_positions(sequence_logits: torch.Tensor, inputs) -> torch.Tensor:
    """The [B, T, V] logits predicting each completion token, from logits over GKD's layout of ``inputs``.

    GKD's layout ends every row at the last column: completion token t of a row with n completion tokens sits at
    column width - n + t and is predicted by the column before it (positions past n are masked in the loss).
    """
    width = sequence_logits.shape[1]
    lengths = inputs["completion_mask"].sum(1, keepdim=True)
    positions = torch.arange(inputs["completions"].shape[1], device=lengths.device)
    columns = (width - lengths + positions - 1).clamp(max=width - 1)
    return sequence_logits.gather(1, columns[..., None].expand(-1, -1, sequence_logits.shape[-1]))
