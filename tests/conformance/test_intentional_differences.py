"""Where ``OPSDTrainer`` differs from ``GKDTrainer`` on purpose, pinned for both (README: "What differs from GKD").

Each test states what each trainer does, so a change on either side (ours, or GKD's in a new TRL) fails here and
the README's list is revisited. Differences pinned elsewhere are listed in the README with their test.
"""

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2ForCausalLM

from conftest import chat, gkd_args
from trl_opsd import OPSDConfig, OPSDTrainer


def _is_opsd(trainer_class) -> bool:
    return issubclass(trainer_class, OPSDTrainer)


def test_without_a_teacher_opsd_distils_from_a_frozen_copy_of_the_student(trainer_class, student, tokenizer,
                                                                          conversations, tmp_path):
    """GKD needs a teacher; OPSD's default teacher is the initial policy (it sees privileged context)."""
    conversations = conversations.add_column("answer", ["fine", "OK", "4", "Blue"])
    if not _is_opsd(trainer_class):
        with pytest.raises((TypeError, AttributeError, ValueError)):
            trainer_class(model=student, args=gkd_args(tmp_path), train_dataset=conversations,
                          processing_class=tokenizer)
        return
    trainer = trainer_class(model=student, args=gkd_args(tmp_path), train_dataset=conversations,
                            processing_class=tokenizer)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert isinstance(teacher, Qwen2ForCausalLM) and teacher is not trainer.model
    assert not any(p.requires_grad for p in teacher.parameters())


def test_completions_end_at_the_end_of_turn_token(trainer_class, student, teacher, tokenizer, conversations, tmp_path):
    """The chat template's newline after ``<|im_end|>`` is trained by GKD; OPSD stops at EOS, where generation stops,
    so dataset and on-policy completions end alike."""
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path),
                            train_dataset=conversations, processing_class=tokenizer)
    batch = trainer.data_collator([chat("Hi", "Hello.")])
    labels = batch["labels"][0]
    expected = "Hello.<|im_end|>" if _is_opsd(trainer_class) else "Hello.<|im_end|>\n"
    assert tokenizer.decode(labels[labels != -100]) == expected


def test_rollouts_keep_the_kv_cache_under_gradient_checkpointing(trainer_class, student, teacher, tokenizer,
                                                                 conversations, tmp_path):
    """GKD turns the KV cache off when gradient checkpointing is on; TRL's generation context already disables
    checkpointing while generating, so OPSD keeps the cache (much faster rollouts, the same samples)."""
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path, gradient_checkpointing=True),
                            train_dataset=conversations, processing_class=tokenizer)
    assert trainer.generation_config.use_cache is _is_opsd(trainer_class)


def test_evaluation_without_metrics_gathers_no_logits(trainer_class, student, teacher, tokenizer, conversations,
                                                      tmp_path):
    """With no ``compute_metrics`` nothing reads predictions, yet GKD gathers [rows, sequence, vocab] logits over the
    whole evaluation set; OPSD returns none (with ``compute_metrics`` both return them, see the contract tests)."""
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path), train_dataset=conversations,
                            processing_class=tokenizer)
    output = trainer.predict(conversations)
    assert torch.isfinite(torch.tensor(output.metrics["test_loss"]))
    assert (output.predictions is None) is _is_opsd(trainer_class)


def test_a_gkd_config_is_adopted_as_an_opsd_config_in_place(trainer_class, student, teacher, tokenizer,
                                                            conversations, tmp_path):
    """``trainer.args`` is the user's object for both; OPSD adds its own knobs to it (at their defaults)."""
    args = gkd_args(tmp_path)
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=conversations,
                            processing_class=tokenizer)
    assert trainer.args is args
    assert isinstance(args, OPSDConfig) is _is_opsd(trainer_class)
    if _is_opsd(trainer_class):
        assert (args.self_teacher, args.divergence, args.max_prompt_length) == ("frozen", "full", None)


def test_opsd_config_defaults_are_on_policy_reverse_kl(tmp_path):
    """Only with an ``OPSDConfig`` (or no config): GKD's values are kept whenever a ``GKDConfig`` is passed."""
    config = OPSDConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert (config.lmbda, config.beta, config.temperature) == (1.0, 1.0, 1.0)
    assert (gkd_args(tmp_path).lmbda, gkd_args(tmp_path).beta, gkd_args(tmp_path).temperature) == (0.5, 0.5, 0.9)


# -- OPSD's own bookkeeping of lengths (GKD has no privileged context and logs no truncation) ------------------
def test_prompts_cut_by_max_length_are_counted_and_logged(tokenizer, student, teacher, tmp_path):
    rows = [chat("Question: " + " ".join(f"word{i}" for i in range(80)), "A fairly long answer, kept whole."),
            chat("Hi", "Hello.")]
    trainer = OPSDTrainer(model=student, teacher_model=teacher, args=gkd_args(tmp_path, max_length=64, lmbda=0.0),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator(rows)
    assert batch["num_truncated_prompts"].item() == 1
    assert batch["completion_mask"][0].sum() > trainer.args.max_new_tokens  # dataset completions are not cut there
    trainer.train()
    assert trainer.state.log_history[0]["truncated_prompts"] == 1.0


def test_privileged_context_is_never_cut_silently(tokenizer, student, tmp_path):
    """A long prompt is cut from the left like any other; only a cut into the privileged context itself is refused,
    and the message says so."""
    long_question = "Question: " + " ".join(f"word{i}" for i in range(80))
    row = {**chat(long_question, "42"), "privileged_context": "The answer is 42. " * 20}
    args = gkd_args(tmp_path, max_length=80)
    with pytest.raises(ValueError, match=r"train_dataset: row 0: .* would cut the privileged context"):
        OPSDTrainer(model=student, args=args, train_dataset=Dataset.from_list([row]), processing_class=tokenizer)
    row["privileged_context"] = "The answer is 42."
    trainer = OPSDTrainer(model=student, args=args, train_dataset=Dataset.from_list([row]), processing_class=tokenizer)
    batch = trainer.data_collator([row])
    assert "The answer is 42." in tokenizer.decode(batch["teacher_prompts"][0])
    assert batch["num_truncated_prompts"].item() == 1 and batch["num_truncated_teacher_prompts"].item() == 1
