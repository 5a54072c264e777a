"""UnifiedTrainer's chunked loss (hidden states + LM head, no full logits) against its dense loss, the reference."""

import logging

import pytest
import torch
from datasets import Dataset
from test_trainer_chunked import _assert_same_step, _loss_step, _model
from test_unified import _rows, column_reward

from trl_opsd.unified import UnifiedConfig, UnifiedTrainer

SCORES = [1.0, 0.0, 3.0, 1.0]  # per row: advantages of both signs and rejections under reward_filter


def _trainer(tokenizer, tmp_path, chunked: bool, **knobs):
    """The same student (and external teacher, when the knobs need one) on every call."""
    args = UnifiedConfig(
        output_dir=str(tmp_path / str(chunked)), per_device_train_batch_size=4, max_steps=1, max_new_tokens=12,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        chunked_loss=chunked, loss_chunk_size=7,  # several chunks per batch, the last one partial
        **knobs,
    )
    teacher = _model(tokenizer, seed=2) if args.teacher_kind == "external" else None
    needs_rewards = args.reward_weight > 0 or args.reward_filter
    return UnifiedTrainer(model=_model(tokenizer, seed=1), teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_list(_rows(4, score=SCORES)), processing_class=tokenizer,
                          reward_funcs=[column_reward] if needs_rewards else None)


def _step(trainer):
    """(loss, parameter gradients, logged metrics) of one scored micro-batch of dataset completions."""
    trainer.model.train()
    inputs = trainer._score(trainer._attach_completions(trainer.data_collator(_rows(4, score=SCORES)), "dataset"))
    return _loss_step(trainer, inputs)


def _clip_at_the_median(tokenizer, tmp_path, knobs):
    """A cap that clips about half of the tokens: the dense path's median divergence."""
    _, _, metrics = _step(_trainer(tokenizer, tmp_path / "cap", chunked=False, **knobs))
    return metrics["kl_p50"]


SETTINGS = {
    "distill_beta0": dict(preset="opd", reward_weight=0.0, beta=0.0),
    "distill_beta0.5_loss_temperature": dict(preset="opd", reward_weight=0.0, beta=0.5, loss_temperature=1.5),
    "distill_beta1_self": dict(preset="opsd", reward_weight=0.0, beta=1.0),
    "distill_clamp": dict(preset="opd", reward_weight=0.0, beta=0.5, kl_clip_mode="clamp"),
    "rl_outcome": dict(preset="rl_outcome"),
    "rl_outcome_sampling_temperature": dict(preset="rl_outcome", temperature=0.7),
    "opd_mixed": dict(preset="opd", beta=0.5, temperature=0.8, loss_temperature=1.3),
    "opsd_mixed_scale": dict(preset="opsd", beta=1.0, kl_clip_mode="scale"),
    "sft_rs_filter": dict(preset="sft_rs", beta=0.0),
    "opd_mixed_filter": dict(preset="opd", reward_filter=True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_chunked_loss_gradients_and_metrics_equal_the_dense_path(tiny_tokenizer, tmp_path, setting):
    knobs = dict(SETTINGS[setting])
    if "kl_clip_mode" in knobs:
        knobs["kl_clip"] = _clip_at_the_median(tiny_tokenizer, tmp_path, knobs)
    dense = _trainer(tiny_tokenizer, tmp_path, chunked=False, **knobs)
    chunked = _trainer(tiny_tokenizer, tmp_path, chunked=True, **knobs)
    assert dense._dense_loss_reason == "chunked_loss=False" and chunked._dense_loss_reason is None

    def dense_views(*args, **kwargs):
        raise AssertionError("completion_views (full logits) was called")

    chunked.completion_views = dense_views
    chunked_step = _step(chunked)
    assert chunked._dense_loss_reason is None  # the head check passed: this really was the chunked path
    dense_step = _step(dense)
    _assert_same_step(dense_step, chunked_step)
    metrics = chunked_step[2]
    assert ("reward_term" in metrics) == (chunked.args.reward_weight > 0)
    assert ("distillation_term" in metrics) == (chunked.args.distillation_weight > 0)
    if chunked.args.distillation_weight > 0:
        assert metrics["distillation_term"] > 1e-3 and any(name.startswith("geometry/") for name in metrics)
    if chunked.args.reward_weight > 0:
        assert abs(metrics["reward_term"]) > 1e-3
    if "kl_clip_mode" in knobs:
        assert 0.0 < metrics["clipped_fraction"] < 1.0


def test_hinton_kd_falls_back_to_the_dense_loss_and_says_so(tiny_tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trl_opsd.trainer"):
        trainer = _trainer(tiny_tokenizer, tmp_path, chunked=True, preset="kd")
    assert "hinton" in trainer._dense_loss_reason
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chunked_loss: using the dense")]
    assert messages == [f"chunked_loss: using the dense loss, because {trainer._dense_loss_reason}"]
    _assert_same_step(_step(_trainer(tiny_tokenizer, tmp_path, chunked=False, preset="kd")), _step(trainer))


@pytest.mark.parametrize("reward_weight", [0.0, 1.0])
@pytest.mark.parametrize("divergence", ["topk", "sampled"])
@pytest.mark.parametrize("teacher_kind", ["remote", "external"])
def test_topk_and_sampled_distillation_run_in_the_unified_trainer_as_in_opsd(tiny_tokenizer, tmp_path, teacher_kind,
                                                                             divergence, reward_weight):
    """One objective: with reward_weight=0 the unified loss is OPSDTrainer's (remote teachers included), dense and
    chunked; with the reward term on, dense and chunked still agree."""
    from test_trainer_chunked import _ScoringTeacher

    from trl_opsd import OPSDConfig, OPSDTrainer

    def teacher():
        model = _model(tiny_tokenizer, seed=2)
        return _ScoringTeacher(model) if teacher_kind == "remote" else model

    knobs = dict(divergence=divergence, beta=0.0, teacher_top_k=5, kl_clip=0.05 if divergence == "topk" else None)
    common = dict(per_device_train_batch_size=4, max_steps=1, max_new_tokens=12, report_to="none", use_cpu=True,
                  bf16=False, save_strategy="no", loss_chunk_size=7, **knobs)
    rows = _rows(4, score=SCORES)
    steps = []
    for chunked in (False, True):
        args = UnifiedConfig(output_dir=str(tmp_path / str(chunked)), preset="opd", reward_weight=reward_weight,
                             chunked_loss=chunked, **common)
        trainer = UnifiedTrainer(model=_model(tiny_tokenizer, seed=1), teacher_model=teacher(), args=args,
                                 train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
                                 reward_funcs=[column_reward] if reward_weight else None)
        steps.append(_step(trainer))
    _assert_same_step(*steps)
    assert ("reward_term" in steps[1][2]) == (reward_weight > 0) and steps[1][2]["distillation_term"] != 0.0
    if reward_weight:
        return
    opsd = OPSDTrainer(model=_model(tiny_tokenizer, seed=1), teacher_model=teacher(), processing_class=tiny_tokenizer,
                       args=OPSDConfig(output_dir=str(tmp_path / "opsd"), privileged_from=None, **common),
                       train_dataset=Dataset.from_list(rows))
    opsd.model.train()
    loss, grads, _ = _loss_step(opsd, opsd._attach_completions(opsd.data_collator(rows), "dataset"))
    torch.testing.assert_close(steps[0][0], loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(steps[0][1][name], grad, atol=1e-6, rtol=1e-6, msg=name)
