"""Several teachers in one run: per-row routing, and weighted blending for top-k losses.

Routing (:class:`TeacherRouter`): each row names its teacher in the dataset's ``teacher`` field
(DESIGN.md, "Dataset contract"); rows without one go to ``default``. Scores come back as one batch,
aligned exactly as if a single teacher had scored it.

Blending (:class:`TeacherBlend`): every row is scored by every teacher and the loss is the WEIGHTED SUM
OF PER-TEACHER LOSSES, ``sum_i w_i * loss(p_i, q)`` with weights normalised to sum to 1. Why not a mixture
distribution on the union of the teachers' top-k sets:

- For the dense forward KL the two agree up to a constant. With ``pbar = sum_i w_i p_i``,
  ``sum_i w_i KL(p_i || q) = KL(pbar || q) + sum_i w_i KL(p_i || pbar)``, and the last term (the teachers'
  generalised Jensen-Shannon divergence) does not depend on the student: same gradient as distilling
  from the mixture.
- With top-k teachers the mixture cannot be built honestly. Teacher ``j`` reports nothing for tokens in
  another teacher's top-k set but outside its own; their mass sits somewhere in ``j``'s tail. Writing 0
  there and moving the rest to a tail bucket gives a distribution that is not the coarse-graining of
  ``pbar`` on any partition, so its sparse KL is neither exact nor a bound. Each per-teacher sparse KL
  (top-K plus tail bucket) IS the exact KL between coarse-grainings, hence a lower bound of
  ``KL(p_i || q)`` that is tight at K = V; the weighted sum inherits both properties.
- For reverse KL or JSD the weighted sum is not a mixture target at all: ``sum_i w_i KL(q || p_i)`` is
  minimised by ``q`` proportional to ``prod_i p_i ** w_i`` (a geometric mixture). That is what blending a
  reverse-KL loss means here, and the logged value should be read that way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Generation, Teacher, TeacherCapabilityError, TopKScores


class TeacherRouter(Teacher):
    """Routes rows to named teachers. It can do what EVERY routed teacher can (any row may go anywhere)."""

    def __init__(self, teachers: Mapping[str, Teacher], *, default: str | None = None, name: str = "router") -> None:
        if not teachers:
            raise ValueError("TeacherRouter needs at least one teacher")
        if default is not None and default not in teachers:
            raise ValueError(f"default teacher {default!r} is not one of {sorted(teachers)}")
        caps = [t.max_top_k for t in teachers.values() if t.max_top_k is not None]
        super().__init__(name, max_top_k=min(caps) if caps else None)
        self.teachers = dict(teachers)
        self.default = default
        self.capabilities = frozenset.intersection(*(frozenset(t.capabilities) for t in teachers.values()))
        self.rows_scored: Counter[str] = Counter()  # rows each teacher has scored (metrics "<name>/rows_scored")

    def __repr__(self) -> str:
        return f"TeacherRouter(teachers={sorted(self.teachers)}, default={self.default!r})"

    def require(self, capability: str, *, top_k: int | None = None) -> None:
        for teacher in self.teachers.values():
            teacher.require(capability, top_k=top_k)  # each error names the teacher that cannot

    def route(self, routes: Sequence[str | None] | None, n_rows: int) -> dict[str, list[int]]:
        """Row indices per teacher name; an unknown or missing route is an error naming the row."""
        routes = [None] * n_rows if routes is None else list(routes)
        if len(routes) != n_rows:
            raise ValueError(f"{len(routes)} routes for {n_rows} rows")
        groups: dict[str, list[int]] = {}
        for row, key in enumerate(routes):
            name = self.default if key is None else key
            if name is None:
                raise ValueError(f"row {row}: no 'teacher' field and the router has no default teacher")
            if name not in self.teachers:
                raise ValueError(f"row {row}: teacher {name!r} is not configured; known: {sorted(self.teachers)}")
            groups.setdefault(name, []).append(row)
        return groups

    def score_topk(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], k: int,
        *, routes: Sequence[str | None] | None = None,
    ) -> TopKScores:
        groups = self.route(routes, len(prompt_ids))
        parts = {
            name: self.teachers[name].score_topk([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], k)
            for name, rows in groups.items()
        }
        self.rows_scored.update({name: len(rows) for name, rows in groups.items()})
        t_max = max((p.mask.shape[1] for p in parts.values()), default=0)
        b = len(prompt_ids)
        merged = TopKScores(
            topk_ids=torch.full((b, t_max, k), -1, dtype=torch.long),
            topk_logprobs=torch.full((b, t_max, k), float("-inf")),
            sampled_logprobs=torch.zeros((b, t_max)),
            mask=torch.zeros((b, t_max), dtype=torch.bool),
        )
        for name, rows in groups.items():
            part, t = parts[name], parts[name].mask.shape[1]
            index = torch.tensor(rows, dtype=torch.long)
            merged.topk_ids[index, :t] = part.topk_ids
            merged.topk_logprobs[index, :t] = part.topk_logprobs
            merged.sampled_logprobs[index, :t] = part.sampled_logprobs
            merged.mask[index, :t] = part.mask
        return merged

    def generate(
        self, chats: Sequence[Sequence[dict[str, Any]]], *, max_tokens: int, temperature: float, n: int = 1,
        routes: Sequence[str | None] | None = None,
    ) -> list[Generation]:
        groups = self.route(routes, len(chats))
        out: list[Generation | None] = [None] * (len(chats) * n)
        for name, rows in groups.items():
            gens = self.teachers[name].generate(
                [chats[i] for i in rows], max_tokens=max_tokens, temperature=temperature, n=n
            )
            for gen in gens:
                gen.chat_index = rows[gen.chat_index]
                out[gen.chat_index * n + gen.sample_index] = gen
        return out  # type: ignore[return-value]

    def metrics(self) -> dict[str, float]:
        counts = {f"{name}/rows_scored": float(self.rows_scored[name]) for name in self.teachers}
        own = {f"{name}/{key}": value for name, t in self.teachers.items() for key, value in t.metrics().items()}
        return counts | own

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()


def check_dataset_routes(teacher: Teacher | None, dataset, name: str) -> None:
    """Refuse, before training, a dataset row whose ``teacher`` field the trainer's teacher cannot honour: a route
    that names no teacher of a :class:`TeacherRouter`, or any route when there is a single teacher (or none)."""
    if not hasattr(dataset, "__len__") or "teacher" not in (getattr(dataset, "column_names", None) or ()):
        return  # no dataset, a streaming one (its rows are checked when scored), or no routes
    routes = list(dataset["teacher"])
    if isinstance(teacher, TeacherRouter):
        try:
            teacher.route(routes, len(routes))
        except ValueError as error:
            raise ValueError(f"{name}: {error} (the row's 'teacher' field)") from None
        return
    for row, route in enumerate(routes):
        if route is not None:
            raise ValueError(
                f"{name}: row {row}: teacher {route!r} routes the row to a named teacher, but the trainer's teacher "
                f"is {teacher!r}; pass a TeacherRouter naming every teacher, or drop the 'teacher' column"
            )


@dataclass
class WeightedScores:
    name: str
    weight: float
    scores: TopKScores


class BlendedScores(list):
    """Every teacher's scores of the same rows with its weight: a list of :class:`WeightedScores`, moved and padded
    together. :func:`trl_opsd.objective.token_terms` turns it into ``sum_i w_i * terms(scores_i)``."""

    def to(self, device) -> BlendedScores:
        return BlendedScores(WeightedScores(p.name, p.weight, p.scores.to(device)) for p in self)

    def pad_to(self, length: int) -> BlendedScores:
        return BlendedScores(WeightedScores(p.name, p.weight, p.scores.pad_to(length)) for p in self)


class TeacherBlend(Teacher):
    """Every row scored by every teacher; the loss is ``sum_i w_i * loss(scores_i)`` (see the module doc).

    A :class:`Teacher` for the top-k and sampled-token losses: :meth:`score_topk` returns :class:`BlendedScores`,
    which the trainer's objective weighs term by term.
    """

    def __init__(self, teachers: Mapping[str, Teacher], weights: Mapping[str, float], *, name: str = "blend") -> None:
        if set(teachers) != set(weights):
            raise ValueError(f"weights {sorted(weights)} must name exactly the teachers {sorted(teachers)}")
        if any(w <= 0 for w in weights.values()):
            raise ValueError(f"blend weights must be positive, got {dict(weights)}")
        caps = [t.max_top_k for t in teachers.values() if t.max_top_k is not None]
        super().__init__(name, max_top_k=min(caps) if caps else None)
        total = sum(weights.values())
        self.teachers = dict(teachers)
        self.weights = {name: w / total for name, w in weights.items()}
        shared = frozenset.intersection(*(frozenset(t.capabilities) for t in self.teachers.values()))
        self.capabilities = shared & {"topk", "sampled"}

    def __repr__(self) -> str:
        return f"TeacherBlend(weights={self.weights})"

    def require(self, capability: str, *, top_k: int | None = None) -> None:
        if capability not in ("topk", "sampled"):
            raise TeacherCapabilityError(f"{self!r} blends scores for top-k/sampled losses, not {capability!r}")
        for teacher in self.teachers.values():
            teacher.require(capability, top_k=top_k)

    def score_topk(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], k: int
    ) -> BlendedScores:
        return BlendedScores(
            WeightedScores(name, self.weights[name], teacher.score_topk(prompt_ids, completion_ids, k))
            for name, teacher in self.teachers.items()
        )

    @staticmethod
    def loss(loss_fn: Callable[[TopKScores], torch.Tensor], blended: Sequence[WeightedScores]) -> torch.Tensor:
        """``sum_i w_i * loss_fn(scores_i)``: the blended objective."""
        terms = [ws.weight * loss_fn(ws.scores) for ws in blended]
        return sum(terms[1:], terms[0])

    def metrics(self) -> dict[str, float]:
        return {f"{name}/{key}": value for name, t in self.teachers.items() for key, value in t.metrics().items()}

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()
