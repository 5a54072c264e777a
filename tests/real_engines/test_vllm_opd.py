"""OPD with a real vLLM server as the teacher: a fresh student learns toward the served arithmetic world.

Like tests/test_opd_remote.py (same yardstick: held-out KL(teacher || student) on completions sampled once
from the initial student), but the teacher's top-20 log-probs come from vLLM itself.
"""

from __future__ import annotations

import pytest
from datasets import Dataset
from real_reference import load_model
from test_opd_remote import held_out_divergence  # the same yardstick: at beta 0, KL(teacher || student)

from harness.generation import generate_texts
from harness.world.arithmetic import generate_problems, problems_to_rows
from harness.world.tiny import build_tiny_model
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.teachers import OpenAICompatTeacher

pytestmark = pytest.mark.slow  # starts a vLLM server and trains for a minute


def test_opd_with_the_real_server_as_teacher_lowers_held_out_kl(vllm_world, tmp_path):
    teacher_model, tokenizer = load_model(vllm_world.model)  # the served weights, for the yardstick only
    student = build_tiny_model(tokenizer, seed=1)
    chats = [p.to_row()["messages"] for p in generate_problems(16, "validation")]
    held_out = list(zip(chats, generate_texts(student, tokenizer, chats, max_new_tokens=12, temperature=1.0, seed=0)))
    before = held_out_divergence(student, teacher_model, tokenizer, held_out, beta=0.0)

    remote = OpenAICompatTeacher(vllm_world.base_url, vllm_world.model, student_tokenizer=tokenizer, server="vllm",
                                 cache=tmp_path / "teacher.sqlite", timeout_s=120.0)
    args = OPSDConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, max_new_tokens=12, learning_rate=3e-3,
        lr_scheduler_type="constant", report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        logging_steps=4, privileged_from=None, beta=0.0, divergence="topk", teacher_top_k=20,
    )
    trainer = OPSDTrainer(model=student, teacher_model=remote, args=args,
                          train_dataset=Dataset.from_list(problems_to_rows(generate_problems(96, "train"))),
                          processing_class=tokenizer)
    trainer.train()
    metrics = remote.metrics()
    assert metrics["requests"] >= 12 * 8 and metrics["failures"] == 0  # every rollout was scored by vLLM
    after = held_out_divergence(trainer.model, teacher_model, tokenizer, held_out, beta=0.0)
    assert after < 0.8 * before, f"held-out KL(teacher || student) {before:.3f} -> {after:.3f}"
    logged = [row for row in trainer.state.log_history if "kl_mean" in row]
    assert logged and logged[-1]["teacher_requests"] > 0
    remote.close()


def test_a_student_whose_tokenizer_differs_from_the_servers_is_stopped_at_the_first_step(vllm_world, tmp_path):
    """The teacher's text probe runs on the first batch: training stops before any update on wrong ids."""
    from harness.world.tiny import build_tokenizer
    from trl_opsd.teachers import TokenizerMismatchError

    _, served_tokenizer = load_model(vllm_world.model)
    tokenizer = build_tokenizer(vocab_size=300)  # fewer BPE merges: the same text, other ids
    tokenizer.chat_template = served_tokenizer.chat_template
    student = build_tiny_model(tokenizer, seed=1)
    remote = OpenAICompatTeacher(vllm_world.base_url, vllm_world.model, student_tokenizer=tokenizer, timeout_s=120.0)
    args = OPSDConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, max_new_tokens=8, report_to="none",
        use_cpu=True, bf16=False, save_strategy="no", privileged_from=None, beta=0.0, divergence="topk",
        teacher_top_k=5,
    )
    trainer = OPSDTrainer(model=student, teacher_model=remote, args=args,
                          train_dataset=Dataset.from_list(problems_to_rows(generate_problems(4, "train"))),
                          processing_class=tokenizer)
    with pytest.raises(TokenizerMismatchError, match="does not tokenize like the student tokenizer"):
        trainer.train()
    assert trainer.state.global_step == 0 and remote.metrics()["requests"] == 1
    remote.close()
