"""OPSDTrainer's chunked loss (hidden states + LM head, no full logits) against its dense loss, the reference."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaForCausalLM
from trl.experimental.gkd import GKDTrainer

from harness.world.arithmetic import generate_problems, problems_to_rows
from harness.world.tiny import build_tiny_model
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.teachers.base import RowScores, Teacher, TopKScores

ROWS = problems_to_rows(generate_problems(4, "train", seed=3), with_solution=True)


def _model(tokenizer, seed: int) -> LlamaForCausalLM:
    """A tiny Llama whose matrices are drawn with std 0.2 instead of 0.02, so that its predictions depend on the
    context: a self-teacher with the answer in its prompt then diverges by ~0.4 nats per token (~1e-4 at the
    default init), and a 1e-5 tolerance on losses and gradients is a real test."""
    model = build_tiny_model(tokenizer, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def _args(tmp_path, chunked: bool, **overrides):
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, max_new_tokens=12, report_to="none",
        use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", learning_rate=1e-3,
        chunked_loss=chunked, loss_chunk_size=7,  # several chunks per batch, the last one partial
    )
    values.update(overrides)
    return OPSDConfig(**values)


class _ScoringTeacher(Teacher):
    """A remote-style teacher (top-k / sampled-token log-probs only), answered by an in-process model."""

    capabilities = frozenset({"topk", "sampled"})

    def __init__(self, model):
        super().__init__("in-memory")
        self.model = model.eval()

    @torch.no_grad()
    def score_topk(self, prompt_ids, completion_ids, k):
        rows = []
        for prompt, completion in zip(prompt_ids, completion_ids):
            logits = self.model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            log_probs = torch.log_softmax(logits, dim=-1)
            top = log_probs.topk(k, dim=-1) if k else None
            rows.append(RowScores(
                topk_ids=top.indices.tolist() if k else [[] for _ in completion],
                topk_logprobs=top.values.tolist() if k else [[] for _ in completion],
                sampled_logprobs=log_probs.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist(),
                mask=[True] * len(completion),
            ))
        return TopKScores.from_rows(rows, k)


def _trainer(tokenizer, tmp_path, teacher_kind: str, chunked: bool, student=None, **config):
    """The same student and teacher on every call: ``teacher_kind`` self / live / external / remote / peft."""
    student = student if student is not None else _model(tokenizer, seed=1)
    teacher = {"external": lambda: _model(tokenizer, seed=2),
               "remote": lambda: _ScoringTeacher(_model(tokenizer, seed=2))}.get(teacher_kind, lambda: None)()
    peft_config = None
    if teacher_kind == "peft":
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        torch.manual_seed(0)  # the random adapter initialisation
    if teacher_kind == "live":
        config.setdefault("self_teacher", "live")
    # Self-teachers see the answer as privileged context; other teachers see the student's prompt.
    config.setdefault("privileged_from", "answer" if teacher is None else None)
    return OPSDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path / str(chunked), chunked, **config),
                       train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer, peft_config=peft_config)


def _step(trainer, rows=ROWS):
    """(loss, parameter gradients, logged metrics) of one micro-batch of dataset completions."""
    trainer.model.train()
    return _loss_step(trainer, trainer._attach_completions(trainer.data_collator(rows), "dataset"))


def _loss_step(trainer, inputs):
    """(loss, parameter gradients, logged metrics) of ``trainer.compute_loss`` on prepared ``inputs``."""
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _assert_same_step(dense, chunked):
    (dense_loss, dense_grads, dense_metrics), (chunked_loss, chunked_grads, chunked_metrics) = dense, chunked
    torch.testing.assert_close(chunked_loss, dense_loss, atol=1e-5, rtol=1e-5)
    assert dense_grads.keys() == chunked_grads.keys() and dense_grads
    for name, grad in dense_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert dense_metrics.keys() == chunked_metrics.keys()
    for name, value in dense_metrics.items():
        assert math.isclose(chunked_metrics[name], value, rel_tol=1e-5, abs_tol=1e-5), (name, value)


def _median_divergence(tokenizer, tmp_path, teacher_kind, beta):
    """A cap that clips about half of the tokens: the dense path's median divergence."""
    _, _, metrics = _step(_trainer(tokenizer, tmp_path / "cap", teacher_kind, chunked=False, beta=beta))
    return metrics["kl_p50"]


@pytest.mark.parametrize("clip_mode", [None, "clamp", "scale"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_kind", ["self", "external", "peft"])
def test_chunked_loss_gradients_and_metrics_equal_the_dense_path(tiny_tokenizer, tmp_path, teacher_kind, beta,
                                                                 clip_mode):
    clip = {}
    if clip_mode is not None:
        clip = {"kl_clip": _median_divergence(tiny_tokenizer, tmp_path, teacher_kind, beta), "kl_clip_mode": clip_mode}
    dense = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=False, beta=beta, **clip)
    chunked = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=True, beta=beta, **clip)
    assert dense._dense_loss_reason == "chunked_loss=False" and chunked._dense_loss_reason is None
    chunked_step = _step(chunked)
    assert chunked._dense_loss_reason is None  # the head check passed: this really was the chunked path
    _assert_same_step(_step(dense), chunked_step)
    if clip_mode is not None:
        assert 0.0 < chunked_step[2]["clipped_fraction"] < 1.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_kind", ["self", "external"])
def test_chunked_pointwise_clip_equals_the_dense_path(tiny_tokenizer, tmp_path, teacher_kind, beta):
    clip = {"kl_clip": 0.01, "kl_clip_mode": "pointwise"}
    dense = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=False, beta=beta, **clip)
    chunked = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=True, beta=beta, **clip)
    chunked_step = _step(chunked)
    assert chunked._dense_loss_reason is None
    _assert_same_step(_step(dense), chunked_step)
    metrics = chunked_step[2]
    assert 0.0 < metrics["clipped_fraction"] < 1.0 and metrics["clipped_mass"] > 0
    # kl_mean logs the unclipped divergence; the loss is the clipped one, below it.
    assert chunked_step[0] < metrics["kl_mean"]


@pytest.mark.parametrize("teacher_kind", ["external", "remote"])
def test_chunked_topk_pointwise_clip_equals_the_dense_path(tiny_tokenizer, tmp_path, teacher_kind):
    config = {"divergence": "topk", "beta": 0.0, "teacher_top_k": 5, "kl_clip": 0.01, "kl_clip_mode": "pointwise"}
    dense = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=False, **config)
    chunked = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=True, **config)
    chunked_step = _step(chunked)
    _assert_same_step(_step(dense), chunked_step)
    assert 0.0 < chunked_step[2]["clipped_fraction"] < 1.0


@pytest.mark.parametrize("divergence", ["topk", "sampled"])
@pytest.mark.parametrize("teacher_kind", ["external", "remote", "live"])
def test_chunked_topk_and_sampled_losses_equal_the_dense_path(tiny_tokenizer, tmp_path, teacher_kind, divergence):
    config = {"divergence": divergence, "beta": 0.0, "teacher_top_k": 5}
    if divergence == "topk":
        config["kl_clip"] = 0.05
    dense = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=False, **config)
    chunked = _trainer(tiny_tokenizer, tmp_path, teacher_kind, chunked=True, **config)
    _assert_same_step(_step(dense), _step(chunked))


def test_the_chunked_path_never_builds_logits(tiny_tokenizer, tmp_path, monkeypatch):
    trainer = _trainer(tiny_tokenizer, tmp_path, "external", chunked=True)

    def dense_views(*args, **kwargs):
        raise AssertionError("completion_views (full logits) was called")

    monkeypatch.setattr(trainer, "completion_views", dense_views)
    loss, grads, _ = _step(trainer)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_dense_reference_still_equals_gkd(tiny_tokenizer, tmp_path, beta):
    """GKDTrainer.generalized_jsd_loss on materialised logits == our dense path == our chunked path."""
    trainers = [_trainer(tiny_tokenizer, tmp_path, "external", chunked=c, beta=beta) for c in (False, True)]
    inputs = trainers[0]._attach_completions(trainers[0].data_collator(ROWS), "dataset")
    with torch.no_grad():
        dense, chunked = (trainer.compute_loss(trainer.model, inputs) for trainer in trainers)
        student_logits, teacher_logits = trainers[0].completion_views(trainers[0].model, inputs)
    labels = inputs["completions"].masked_fill(~inputs["completion_mask"].bool(), -100)
    reference = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta)
    torch.testing.assert_close(dense, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)


def test_training_with_gradient_checkpointing_logs_the_same_losses(tiny_tokenizer, tmp_path):
    """On-policy steps end to end (sampling, checkpointed forward, backward, update) through both paths."""
    histories = []
    for chunked in (False, True):
        trainer = _trainer(tiny_tokenizer, tmp_path, "self", chunked=chunked, gradient_checkpointing=True,
                           kl_clip=0.1, kl_clip_mode="scale")
        trainer.train()
        histories.append([(log["loss"], log["kl_mean"]) for log in trainer.state.log_history if "loss" in log])
    assert len(histories[0]) == 2
    for dense, chunked in zip(*histories):
        assert dense == pytest.approx(chunked, rel=1e-4, abs=1e-6)


class _ScaledLogitsLlama(LlamaForCausalLM):
    """Logits scaled after the head, with nothing in the config saying so (like Cohere's logit_scale)."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits * 0.5
        return outputs


def test_hidden_logit_post_processing_is_caught_and_falls_back_to_dense(tiny_tokenizer, tmp_path):
    def scaled_student():
        base = _model(tiny_tokenizer, seed=1)
        model = _ScaledLogitsLlama(base.config)
        model.load_state_dict(base.state_dict())
        return model

    chunked = _trainer(tiny_tokenizer, tmp_path, "external", chunked=True, student=scaled_student())
    assert chunked._dense_loss_reason is None  # the config looks plain
    result = _step(chunked)
    assert "not its LM head" in chunked._dense_loss_reason
    dense = _trainer(tiny_tokenizer, tmp_path, "external", chunked=False, student=scaled_student())
    _assert_same_step(_step(dense), result)


def test_soft_capped_logits_use_the_dense_path(tiny_tokenizer, tmp_path):
    capped = _model(tiny_tokenizer, seed=1)
    capped.config.final_logit_softcapping = 30.0
    trainer = _trainer(tiny_tokenizer, tmp_path, "external", chunked=True, student=capped)
    assert "soft-capped" in trainer._dense_loss_reason
    loss, _, _ = _step(trainer)
    assert torch.isfinite(loss)


def test_loss_chunk_size_is_validated(tmp_path):
    with pytest.raises(ValueError, match="loss_chunk_size must be a positive"):
        _args(tmp_path, chunked=True, loss_chunk_size=0)
