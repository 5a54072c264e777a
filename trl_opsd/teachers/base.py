"""The teacher protocol: what a teacher can provide, and the shapes it returns.

A teacher declares a set of capabilities and implements the methods behind them:

| capability | method | meaning |
|---|---|---|
| ``"dense"`` | (the in-process/self teacher's own method) | full-vocabulary logits for the completion |
| ``"topk"`` | :meth:`Teacher.score_topk` with ``k >= 1`` | the teacher's K most likely tokens and their log-probs |
| ``"sampled"`` | :meth:`Teacher.score_topk` with ``k = 0`` | the log-prob of each actual completion token |
| ``"generate"`` | :meth:`Teacher.generate` | text for chats (RS-SFT, judging) |

Scoring is always of FIXED completion tokens under the teacher's OWN prompt: row ``b`` is the token
sequence ``prompt_ids[b] + completion_ids[b]`` and position ``t`` of the result is the teacher's
distribution for ``completion_ids[b][t]`` given ``prompt_ids[b] + completion_ids[b][:t]``. Results are
aligned by completion position, never by prompt length (DESIGN.md, "Data flow of one training step").

A loss asks for what it needs once, at construction, with :meth:`Teacher.require`; a teacher that cannot
provide it raises :class:`TeacherCapabilityError` naming itself, what it can do, and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

CAPABILITIES = frozenset({"dense", "topk", "sampled", "generate"})


class TeacherError(RuntimeError):
    """Base class of every error a teacher raises on purpose."""


class TeacherCapabilityError(TeacherError, ValueError):
    """The teacher cannot provide what was asked (raised at construction time by ``require``)."""


@dataclass
class TopKScores:
    """Teacher log-probs on completion positions, right-padded to the longest completion in the batch.

    - ``topk_ids`` ``[B, T, K]`` long: the teacher's top-K token ids at each position, most likely first;
      ``-1`` where there is no entry (padding, or a vocabulary smaller than K).
    - ``topk_logprobs`` ``[B, T, K]`` float32: their log-probs; ``-inf`` where ``topk_ids == -1``
      (probability 0, so the tail bucket ``1 - sum(exp(topk_logprobs))`` stays right).
    - ``sampled_logprobs`` ``[B, T]`` float32: log-prob of the actual completion token; 0.0 where masked.
    - ``mask`` ``[B, T]`` bool: True on real completion positions the teacher scored.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    sampled_logprobs: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        b, t, k = self.topk_ids.shape
        if self.topk_logprobs.shape != (b, t, k):
            raise ValueError(f"topk_logprobs shape {tuple(self.topk_logprobs.shape)} != topk_ids {(b, t, k)}")
        if self.sampled_logprobs.shape != (b, t) or self.mask.shape != (b, t):
            raise ValueError("sampled_logprobs and mask must be [B, T] like topk_ids' first two dims")

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    @property
    def topk_valid(self) -> torch.Tensor:
        """``[B, T, K]`` bool: True where ``topk_ids`` holds a real token."""
        return self.topk_ids >= 0

    def to(self, device: torch.device | str) -> TopKScores:
        return TopKScores(
            topk_ids=self.topk_ids.to(device),
            topk_logprobs=self.topk_logprobs.to(device),
            sampled_logprobs=self.sampled_logprobs.to(device),
            mask=self.mask.to(device),
        )

    def pad_to(self, length: int) -> TopKScores:
        """Right-pad the position axis to ``length`` (e.g. the trainer's padded completion length)."""
        extra = length - self.mask.shape[1]
        if extra < 0:
            raise ValueError(f"cannot pad {self.mask.shape[1]} positions down to {length}")
        return TopKScores(
            topk_ids=torch.nn.functional.pad(self.topk_ids, (0, 0, 0, extra), value=-1),
            topk_logprobs=torch.nn.functional.pad(self.topk_logprobs, (0, 0, 0, extra), value=float("-inf")),
            sampled_logprobs=torch.nn.functional.pad(self.sampled_logprobs, (0, extra), value=0.0),
            mask=torch.nn.functional.pad(self.mask, (0, extra), value=False),
        )

    @classmethod
    def from_rows(cls, rows: Sequence[RowScores], k: int) -> TopKScores:
        """Stack per-row scores into tensors padded to the longest row."""
        t_max = max([len(r.sampled_logprobs) for r in rows], default=0)
        b = len(rows)
        topk_ids = torch.full((b, t_max, k), -1, dtype=torch.long)
        topk_logprobs = torch.full((b, t_max, k), float("-inf"), dtype=torch.float32)
        sampled = torch.zeros((b, t_max), dtype=torch.float32)
        mask = torch.zeros((b, t_max), dtype=torch.bool)
        for i, row in enumerate(rows):
            n = len(row.sampled_logprobs)
            if n == 0:
                continue
            if k:  # one tensor per row: positions with fewer than k entries are padded in Python first
                topk_ids[i, :n] = torch.tensor([ids[:k] + [-1] * (k - len(ids[:k])) for ids in row.topk_ids])
                topk_logprobs[i, :n] = torch.tensor(
                    [lps[:k] + [float("-inf")] * (k - len(lps[:k])) for lps in row.topk_logprobs]
                )
            sampled[i, :n] = torch.tensor(row.sampled_logprobs, dtype=torch.float32)
            mask[i, :n] = torch.tensor(row.mask, dtype=torch.bool)
        return cls(topk_ids=topk_ids, topk_logprobs=topk_logprobs, sampled_logprobs=sampled, mask=mask)


@dataclass
class RowScores:
    """One row's scores before padding: lists indexed by completion position."""

    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    sampled_logprobs: list[float]
    mask: list[bool]


@dataclass
class Generation:
    """One generated text. ``generate`` returns these chat-major: chat ``i``'s samples are at
    ``[i * n, (i + 1) * n)``."""

    text: str
    model: str
    usage: dict[str, Any] = field(default_factory=dict)
    chat_index: int = 0
    sample_index: int = 0


class Teacher:
    """Base class of every teacher. Subclasses set ``capabilities`` and implement what they declare.

    ``capabilities`` may be set per instance (one class can serve several server kinds).
    ``max_top_k`` is the largest K the backend can return per position (``None``: no cap, e.g. a
    dense in-process model). ``capability_notes`` maps a capability the backend lacks to the reason,
    which ``require`` puts in its error.
    """

    capabilities: frozenset[str] = frozenset()
    capability_notes: Mapping[str, str] = MappingProxyType({})
    # What an in-process loss can read from the teacher, answered by each teacher class: full-vocabulary logits
    # (``completion_logits``), and the final hidden states and LM head instead of logits (``completion_head_inputs``,
    # for the chunked loss). A teacher with neither scores completions through ``score_topk``.
    gives_dense_logits: bool = False
    gives_hidden_states: bool = False

    def __init__(self, name: str, *, max_top_k: int | None = None) -> None:
        self.name = name
        self.max_top_k = max_top_k

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, capabilities={sorted(self.capabilities)})"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str, *, top_k: int | None = None) -> None:
        """Raise :class:`TeacherCapabilityError` unless this teacher can provide ``capability``
        (and, for ``"topk"``, ``top_k`` log-probs per position)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown teacher capability {capability!r}; known: {sorted(CAPABILITIES)}")
        who = f"{type(self).__name__} {self.name!r}"
        if capability not in self.capabilities:
            note = self.capability_notes.get(capability)
            raise TeacherCapabilityError(
                f"{who} cannot provide {capability!r}"
                + (f": {note}" if note else "")
                + f". It can: {', '.join(sorted(self.capabilities)) or 'nothing'}."
            )
        if top_k is not None:
            if top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {top_k}")
            if self.max_top_k is not None and top_k > self.max_top_k:
                raise TeacherCapabilityError(
                    f"{who}: top_k={top_k} exceeds the provider cap of {self.max_top_k} log-probs per "
                    "position. Lower top_k, or raise max_top_k if your server allows more "
                    "(vLLM: --max-logprobs)."
                )

    def score_topk(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], k: int
    ) -> TopKScores:
        """Top-``k`` teacher log-probs on each completion position (``k = 0``: sampled-token only)."""
        self.require("topk" if k > 0 else "sampled", top_k=k)
        raise NotImplementedError(f"{type(self).__name__} declares scoring but does not implement it")

    def generate(
        self, chats: Sequence[Sequence[dict[str, Any]]], *, max_tokens: int, temperature: float, n: int = 1
    ) -> list[Generation]:
        """``n`` generations per chat, chat-major."""
        self.require("generate")
        raise NotImplementedError(f"{type(self).__name__} declares generation but does not implement it")

    def metrics(self) -> dict[str, float]:
        """Counters for logging (remote teachers: requests, retries, cache hits, failures)."""
        return {}

    def close(self) -> None:
        """Release connections and threads."""


def check_scoring_inputs(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> None:
    """Shared argument checks; errors name the row."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            # The first position of a sequence has no conditional distribution (vLLM returns null there).
            raise ValueError(f"row {i}: empty teacher prompt; the first completion token could not be scored")
