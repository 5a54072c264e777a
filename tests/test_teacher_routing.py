"""Multi-teacher routing by the ``teacher`` field, and weighted blending of top-k teachers."""

from __future__ import annotations

import pytest
import torch

from trl_opsd.losses import sparse_topk_divergence
from trl_opsd.teachers import (
    Generation,
    RowScores,
    Teacher,
    TeacherBlend,
    TeacherCapabilityError,
    TeacherRouter,
    TopKScores,
)

VOCAB = 12


class TableTeacher(Teacher):
    """A deterministic in-memory teacher: a fixed random distribution per prefix."""

    def __init__(self, name: str, seed: int, capabilities=("topk", "sampled", "generate"), max_top_k=None):
        super().__init__(name, max_top_k=max_top_k)
        self.seed = seed
        self.capabilities = frozenset(capabilities)
        self.calls = 0

    def logprobs(self, prefix) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + hash(tuple(prefix)) % 1_000_003)
        return torch.log_softmax(2 * torch.randn(VOCAB, generator=gen), -1)

    def score_topk(self, prompt_ids, completion_ids, k):
        self.require("topk" if k else "sampled", top_k=k)
        self.calls += 1
        rows = []
        for prompt, completion in zip(prompt_ids, completion_ids):
            row = RowScores([], [], [], [])
            for t, token in enumerate(completion):
                lp = self.logprobs([*prompt, *completion[:t]])
                top = lp.topk(k)
                row.topk_ids.append(top.indices.tolist())
                row.topk_logprobs.append(top.values.tolist())
                row.sampled_logprobs.append(float(lp[token]))
                row.mask.append(True)
            rows.append(row)
        return TopKScores.from_rows(rows, k)

    def generate(self, chats, *, max_tokens, temperature, n=1):
        return [Generation(text=f"{self.name}:{c[0]['content']}:{s}", model=self.name, chat_index=i, sample_index=s)
                for i, c in enumerate(chats) for s in range(n)]


PROMPTS = [[1, 2], [3], [4, 5, 6], [7]]
COMPLETIONS = [[8, 9, 10], [11], [1, 2, 3, 4], [5, 6]]


def test_rows_go_to_their_teacher_and_come_back_aligned():
    a, b = TableTeacher("a", 1), TableTeacher("b", 2)
    router = TeacherRouter({"a": a, "b": b}, default="a")
    routes = ["b", None, "a", "b"]
    merged = router.score_topk(PROMPTS, COMPLETIONS, 3, routes=routes)
    assert merged.topk_ids.shape == (4, 4, 3)
    for row, name in enumerate(["b", "a", "a", "b"]):
        alone = {"a": a, "b": b}[name].score_topk([PROMPTS[row]], [COMPLETIONS[row]], 3)
        t = len(COMPLETIONS[row])
        assert torch.equal(merged.topk_ids[row, :t], alone.topk_ids[0, :t])
        assert torch.equal(merged.topk_logprobs[row, :t], alone.topk_logprobs[0, :t])
        assert torch.equal(merged.sampled_logprobs[row, :t], alone.sampled_logprobs[0, :t])
        assert merged.mask[row, :t].all() and not merged.mask[row, t:].any()
        assert (merged.topk_ids[row, t:] == -1).all()


def test_scores_pad_to_the_trainers_length():
    scores = TableTeacher("a", 1).score_topk(PROMPTS[:2], COMPLETIONS[:2], 3)
    padded = scores.pad_to(6)
    assert padded.topk_ids.shape == (2, 6, 3) and padded.mask.shape == (2, 6)
    assert torch.equal(padded.topk_logprobs[:, :3], scores.topk_logprobs)
    assert (padded.topk_ids[:, 3:] == -1).all() and not padded.mask[:, 3:].any()
    assert torch.isinf(padded.topk_logprobs[:, 3:]).all() and (padded.sampled_logprobs[:, 3:] == 0).all()
    with pytest.raises(ValueError, match="cannot pad"):
        scores.pad_to(2)


def test_bad_routes_name_the_row():
    router = TeacherRouter({"a": TableTeacher("a", 1)})
    with pytest.raises(ValueError, match="row 1: teacher 'z' is not configured; known: \\['a'\\]"):
        router.score_topk(PROMPTS[:2], COMPLETIONS[:2], 2, routes=["a", "z"])
    with pytest.raises(ValueError, match="row 0: no 'teacher' field and the router has no default"):
        router.score_topk(PROMPTS[:1], COMPLETIONS[:1], 2, routes=[None])


def test_router_can_only_what_every_teacher_can():
    generate_only = TableTeacher("judge", 3, capabilities=("generate",))
    router = TeacherRouter({"a": TableTeacher("a", 1, max_top_k=5), "judge": generate_only})
    assert router.capabilities == frozenset({"generate"}) and router.max_top_k == 5
    with pytest.raises(TeacherCapabilityError, match="'judge' cannot provide 'topk'"):
        router.require("topk", top_k=2)
    with pytest.raises(TeacherCapabilityError, match="top_k=6 exceeds the provider cap of 5"):
        TeacherRouter({"a": TableTeacher("a", 1, max_top_k=5)}).require("topk", top_k=6)


def test_generation_is_routed_and_kept_in_chat_major_order():
    router = TeacherRouter({"a": TableTeacher("a", 1), "b": TableTeacher("b", 2)})
    chats = [[{"role": "user", "content": str(i)}] for i in range(3)]
    gens = router.generate(chats, max_tokens=4, temperature=1.0, n=2, routes=["b", "a", "b"])
    assert [g.text for g in gens] == ["b:0:0", "b:0:1", "a:1:0", "a:1:1", "b:2:0", "b:2:1"]
    assert [(g.chat_index, g.sample_index) for g in gens] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def dense_log_probs(scores: TopKScores) -> torch.Tensor:
    """``[B, T, V]`` teacher log-probs from full-vocabulary scores (K = V); padded positions all ``-inf``."""
    b, t, _ = scores.topk_ids.shape
    values = scores.topk_logprobs.masked_fill(~scores.topk_valid, float("-inf"))
    return torch.full((b, t, VOCAB), float("-inf")).scatter(-1, scores.topk_ids.clamp(min=0), values)


def dense_forward_kl(scores: TopKScores, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T || q) summed over positions, from full-vocabulary scores (K = V)."""
    teacher = dense_log_probs(scores)
    log_q = torch.log_softmax(student_logits, -1)
    return (teacher.exp() * (teacher - log_q)).sum(-1)[scores.mask].sum()


def test_blend_weights_normalise_and_the_blend_distills_the_mixture():
    a, b = TableTeacher("a", 1), TableTeacher("b", 2)
    blend = TeacherBlend({"a": a, "b": b}, {"a": 3.0, "b": 1.0})
    assert blend.weights == {"a": 0.75, "b": 0.25}
    blended = blend.score_topk(PROMPTS, COMPLETIONS, VOCAB)
    assert [(w.name, w.weight) for w in blended] == [("a", 0.75), ("b", 0.25)]

    student = torch.randn(4, 4, VOCAB, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = TeacherBlend.loss(lambda s: dense_forward_kl(s, student), blended)
    (grad_blend,) = torch.autograd.grad(loss, student)

    # The same gradient as forward KL to the mixture pbar = 0.75 p_a + 0.25 p_b (module docstring identity).
    pbar = 0.75 * dense_log_probs(blended[0].scores).exp() + 0.25 * dense_log_probs(blended[1].scores).exp()
    mask = blended[0].scores.mask
    log_q = torch.log_softmax(student, -1)
    mixture_kl = (torch.xlogy(pbar, pbar) - pbar * log_q).sum(-1)[mask].sum()
    (grad_mixture,) = torch.autograd.grad(mixture_kl, student)
    torch.testing.assert_close(grad_blend, grad_mixture, atol=1e-6, rtol=1e-5)
    assert loss.item() >= mixture_kl.item()  # the teachers' JS divergence is the (constant) gap


def test_blended_sparse_loss_is_a_lower_bound_tight_at_full_vocabulary():
    blend = TeacherBlend({"a": TableTeacher("a", 1), "b": TableTeacher("b", 2)}, {"a": 1.0, "b": 1.0})
    student = torch.randn(4, 4, VOCAB, generator=torch.Generator().manual_seed(1))

    def sparse(scores):
        per_token = sparse_topk_divergence(student, scores.topk_ids, scores.topk_logprobs)
        return per_token[scores.mask].sum()

    values = [TeacherBlend.loss(sparse, blend.score_topk(PROMPTS, COMPLETIONS, k)).item() for k in (1, 3, 6, VOCAB)]
    dense = TeacherBlend.loss(lambda s: dense_forward_kl(s, student), blend.score_topk(PROMPTS, COMPLETIONS, VOCAB))
    assert all(x <= y + 1e-6 for x, y in zip(values, values[1:]))
    assert values[-1] == pytest.approx(dense.item(), rel=1e-5)


def test_blend_refuses_bad_weights_and_missing_capabilities():
    with pytest.raises(ValueError, match="must name exactly"):
        TeacherBlend({"a": TableTeacher("a", 1)}, {"b": 1.0})
    with pytest.raises(ValueError, match="positive"):
        TeacherBlend({"a": TableTeacher("a", 1)}, {"a": 0.0})
    blend = TeacherBlend({"a": TableTeacher("a", 1), "j": TableTeacher("j", 2, capabilities=("generate",))},
                         {"a": 1.0, "j": 1.0})
    with pytest.raises(TeacherCapabilityError, match="'j' cannot provide 'topk'"):
        blend.require("topk", top_k=3)
