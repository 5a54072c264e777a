"""Routed multi-teacher OPD: a row's ``teacher`` field reaches the scoring, so each row's loss uses its own teacher."""

import math

import pytest
import torch
from datasets import Dataset

from harness.arithmetic import generate_problems
from harness.tiny_models import build_tiny_model
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.objective import token_terms
from trl_opsd.teachers.base import RowScores, Teacher, TopKScores
from trl_opsd.teachers.routing import TeacherRouter


class _PeakedTeacher(Teacher):
    """Puts 0.9 on one token at every position (and 0.05 on another): two of them with different tokens disagree."""

    capabilities = frozenset({"topk", "sampled"})

    def __init__(self, name, token, other):
        super().__init__(name)
        self.token, self.other = token, other

    def score_topk(self, prompt_ids, completion_ids, k):
        ids, logprobs = [self.token, self.other][:k], [math.log(0.9), math.log(0.05)][:k]
        rows = [RowScores(topk_ids=[ids] * len(c), topk_logprobs=[logprobs] * len(c),
                          sampled_logprobs=[math.log(0.05)] * len(c), mask=[True] * len(c)) for c in completion_ids]
        return TopKScores.from_rows(rows, k)


def _rows(routes):
    problems = generate_problems(len(routes), "train")
    return [{"prompt": p.to_row()["messages"], "completion": [{"role": "assistant", "content": p.solution}],
             "teacher": route} for p, route in zip(problems, routes)]


def _trainer(tokenizer, tmp_path, teacher, rows):
    args = OPSDConfig(output_dir=str(tmp_path), divergence="topk", teacher_top_k=2, privileged_from=None,
                      beta=0.0, max_new_tokens=8, report_to="none", use_cpu=True, bf16=False)
    return OPSDTrainer(model=build_tiny_model(tokenizer), teacher_model=teacher, args=args,
                       processing_class=tokenizer, train_dataset=Dataset.from_list(rows))


def _router():
    return TeacherRouter({"a": _PeakedTeacher("a", 5, 6), "b": _PeakedTeacher("b", 7, 8)})


def test_each_row_is_scored_and_trained_against_its_own_teacher(tiny_tokenizer, tmp_path):
    routes = ["a", "b", "a", "b"]
    rows = _rows(routes)
    router = _router()
    trainer = _trainer(tiny_tokenizer, tmp_path, router, rows)
    trainer.model.train()
    inputs = trainer._attach_completions(trainer.data_collator(rows), "dataset")
    assert inputs["teacher_routes"] == routes
    student, scores = trainer.completion_signals(trainer.model, inputs, dense=True)
    mask = inputs["completion_mask"].bool()
    routed = token_terms(trainer.divergence, student, scores, inputs["completions"], mask).per_token_loss

    # The same loss with every row scored by one teacher alone: each row matches its own teacher, not the other.
    length = inputs["completions"].shape[1]
    for name in ("a", "b"):
        alone = router.teachers[name].score_topk([[0]] * len(rows), [[0] * length] * len(rows), 2)
        single = token_terms(trainer.divergence, student, alone, inputs["completions"], mask).per_token_loss
        for row, route in enumerate(routes):
            same = torch.allclose(routed[row][mask[row]], single[row][mask[row]])
            assert same == (route == name), (row, route, name)
    assert router.metrics()["a/rows_scored"] == 2 and router.metrics()["b/rows_scored"] == 2

    loss = trainer.compute_loss(trainer.model, inputs)  # the trainer's own step routes the same way
    loss.backward()
    assert torch.isfinite(loss) and router.metrics()["a/rows_scored"] == 4


def test_a_route_naming_no_configured_teacher_is_refused_with_row_and_value(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset: row 2: teacher 'c' is not configured"):
        _trainer(tiny_tokenizer, tmp_path, _router(), _rows(["a", "b", "c", "a"]))


def test_routes_with_a_single_teacher_are_refused(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"row 1: teacher 'b' routes the row to a named teacher"):
        _trainer(tiny_tokenizer, tmp_path, _PeakedTeacher("a", 5, 6), _rows([None, "b"]))


def test_a_blend_is_a_teacher_whose_loss_is_the_weighted_sum_of_per_teacher_losses(tiny_tokenizer, tmp_path):
    from trl_opsd.teachers.routing import TeacherBlend

    a, b = _PeakedTeacher("a", 5, 6), _PeakedTeacher("b", 7, 8)
    blend = TeacherBlend({"a": a, "b": b}, {"a": 3.0, "b": 1.0})
    rows = _rows([None, None, None])
    trainer = _trainer(tiny_tokenizer, tmp_path, blend, rows)
    inputs = trainer._attach_completions(trainer.data_collator(rows), "dataset")
    student, scores = trainer.completion_signals(trainer.model, inputs, dense=True)
    mask, completions = inputs["completion_mask"].bool(), inputs["completions"]
    blended = token_terms(trainer.divergence, student, scores, completions, mask)
    per_teacher = [token_terms(trainer.divergence, student, part.scores, completions, mask) for part in scores]
    assert [part.name for part in scores] == ["a", "b"]
    expected = 0.75 * per_teacher[0].per_token_loss + 0.25 * per_teacher[1].per_token_loss
    torch.testing.assert_close(blended.per_token_loss, expected)
    assert not torch.allclose(per_teacher[0].per_token_loss[mask], per_teacher[1].per_token_loss[mask])
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss)
