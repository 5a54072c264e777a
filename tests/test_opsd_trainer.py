"""OPSDTrainer: drop-in for GKDTrainer, alignment of teacher and student views, self-teachers, bookkeeping."""

import math

import pytest
import torch
from datasets import Dataset
from trl.experimental.gkd import GKDConfig, GKDTrainer

from harness.world.arithmetic import generate_problems, hinted_messages, problems_to_rows
from harness.world.tiny import build_tiny_model
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.collator import OPSDCollator
from trl_opsd.forward import completion_logits


def _config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, max_new_tokens=12, report_to="none",
        use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", learning_rate=1e-3,
    )
    values.update(overrides)
    return OPSDConfig(**values)


def _rows(n=8, with_solution=False, seed=0):
    return problems_to_rows(generate_problems(n, "train", seed=seed), with_solution=with_solution)


def _attach_dataset_completions(trainer, rows):
    batch = trainer.data_collator(rows)
    return trainer._attach_completions(batch, "dataset")


def _unpadded_completion_log_probs(model, prompt_ids, completion_ids):
    """Log-softmax over the vocabulary at each completion position, one row at a time, no padding at all."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_equals_gkd_generalized_jsd_with_an_external_teacher(tiny_tokenizer, tmp_path, beta):
    student, teacher = build_tiny_model(tiny_tokenizer, seed=1), build_tiny_model(tiny_tokenizer, seed=2)
    rows = _rows(4, with_solution=True)
    trainer = OPSDTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, beta=beta, privileged_from=None),
        train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
    )
    inputs = _attach_dataset_completions(trainer, rows)
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, inputs)

    # Reference: unpadded forward passes per row, stacked on a common width, masked with -100 labels.
    collator = trainer.data_collator
    views = [collator.row_views(row, i) for i, row in enumerate(rows)]
    width = max(len(v.completion_ids) for v in views)
    vocab = len(tiny_tokenizer)
    s_logits, t_logits = torch.zeros(len(rows), width, vocab), torch.zeros(len(rows), width, vocab)
    labels = torch.full((len(rows), width), -100)
    for i, v in enumerate(views):
        n = len(v.completion_ids)
        s_logits[i, :n] = _unpadded_completion_log_probs(student, v.prompt_ids, v.completion_ids)
        t_logits[i, :n] = _unpadded_completion_log_probs(teacher, v.teacher_prompt_ids, v.completion_ids)
        labels[i, :n] = torch.tensor(v.completion_ids)
    reference = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_teacher_and_student_are_aligned_by_completion_position(tiny_tokenizer, tmp_path):
    """Different prompt lengths in one batch (the hint makes teacher prompts longer) must not shift anything."""
    model = build_tiny_model(tiny_tokenizer, seed=3)
    rows = _rows(6, with_solution=True, seed=5)
    trainer = OPSDTrainer(model=model, args=_config(tmp_path), train_dataset=Dataset.from_list(rows),
                          processing_class=tiny_tokenizer)
    inputs = _attach_dataset_completions(trainer, rows)
    assert len({len(v) for v in [r["messages"][0]["content"] for r in rows]}) > 1  # prompts really differ
    assert inputs["teacher_prompts"].shape[1] > inputs["prompts"].shape[1]

    num = inputs["completions"].shape[1]
    ids = torch.cat([inputs["teacher_prompts"], inputs["completions"]], 1)
    mask = torch.cat([inputs["teacher_prompt_attention_mask"], inputs["completion_mask"]], 1)
    batched = torch.log_softmax(trainer.teacher.completion_logits(model, ids, mask, num), -1)
    for i, row in enumerate(rows):
        view = trainer.data_collator.row_views(row, i)
        expected = _unpadded_completion_log_probs(model, view.teacher_prompt_ids, view.completion_ids)
        torch.testing.assert_close(batched[i, : len(view.completion_ids)], expected, atol=1e-5, rtol=1e-5)
        # the teacher prompt really is the hinted chat
        problem_answer = row["answer"]
        assert tiny_tokenizer.decode(view.teacher_prompt_ids).count(f"The final answer is {problem_answer}.") == 1
        ids_s = torch.cat([inputs["prompts"], inputs["completions"]], 1)
        mask_s = torch.cat([inputs["prompt_attention_mask"], inputs["completion_mask"]], 1)
        student = torch.log_softmax(completion_logits(model, ids_s, mask_s, num), -1)
        expected_s = _unpadded_completion_log_probs(model, view.prompt_ids, view.completion_ids)
        torch.testing.assert_close(student[i, : len(view.completion_ids)], expected_s, atol=1e-5, rtol=1e-5)


def test_gkd_script_runs_unchanged_with_opsd_trainer_swapped_in(tiny_tokenizer, tmp_path):
    def gkd_script(trainer_class):
        student, teacher = build_tiny_model(tiny_tokenizer, seed=1), build_tiny_model(tiny_tokenizer, seed=2)
        args = GKDConfig(
            output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=2, max_steps=3,
            max_new_tokens=8, lmbda=0.5, beta=0.5, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        )
        trainer = trainer_class(model=student, teacher_model=teacher, args=args, processing_class=tiny_tokenizer,
                                train_dataset=Dataset.from_list(_rows(6, with_solution=True)))
        return trainer.train().training_loss

    for trainer_class in (GKDTrainer, OPSDTrainer):
        loss = gkd_script(trainer_class)
        assert math.isfinite(loss) and loss > 0


def test_peft_self_teacher_adds_no_parameters_and_stays_the_base_model(tiny_tokenizer, tmp_path):
    from peft import LoraConfig

    model = build_tiny_model(tiny_tokenizer, seed=4)
    base_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    base_reference = build_tiny_model(tiny_tokenizer, seed=4)
    rows = _rows(8)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = OPSDTrainer(model=model, args=_config(tmp_path, max_steps=2, learning_rate=1e-2),
                          train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
                          peft_config=peft_config)
    lora_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert trainer.teacher_model is None
    assert sum(p.numel() for p in trainer.model.parameters()) == base_params + lora_params

    def teacher_matches_base():
        inputs = _attach_dataset_completions(trainer, _rows(3, with_solution=True))
        ids = torch.cat([inputs["teacher_prompts"], inputs["completions"]], 1)
        mask = torch.cat([inputs["teacher_prompt_attention_mask"], inputs["completion_mask"]], 1)
        num = inputs["completions"].shape[1]
        from trl_opsd.forward import completion_logits

        teacher = trainer.teacher.completion_logits(trainer.model, ids, mask, num)
        torch.testing.assert_close(teacher, completion_logits(base_reference, ids, mask, num), atol=1e-5, rtol=1e-5)
        student = completion_logits(trainer.model, ids, mask, num)
        return (student - teacher).abs().max().item()

    assert teacher_matches_base() > 1e-4  # the randomly initialised adapter makes the student differ
    trainer.train()
    assert teacher_matches_base() > 1e-4
    lora_after = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_after and all(p.requires_grad for p in lora_after.values())


def test_frozen_self_teacher_without_peft_is_a_frozen_copy(tiny_tokenizer, tmp_path):
    model = build_tiny_model(tiny_tokenizer, seed=6)
    trainer = OPSDTrainer(model=model, args=_config(tmp_path, learning_rate=1e-2),
                          train_dataset=Dataset.from_list(_rows(8)), processing_class=tiny_tokenizer)
    before = {k: v.clone() for k, v in trainer.teacher_model.state_dict().items()}
    trainer.train()
    after = trainer.teacher_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(before[k], trainer.model.state_dict()[k]) for k in before)
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())


@pytest.mark.parametrize("self_teacher", ["frozen", "ema"])
def test_self_teacher_outputs_do_not_follow_the_students_weights(tiny_tokenizer, tmp_path, self_teacher):
    """Regression: SFTTrainer patches ``model.forward`` with a closure over the student, and a deep copy kept
    that closure, so the "frozen" teacher computed with the student's weights (its own weights untouched)."""
    trainer = OPSDTrainer(model=build_tiny_model(tiny_tokenizer, seed=6),
                          args=_config(tmp_path, self_teacher=self_teacher),
                          train_dataset=Dataset.from_list(_rows(8)), processing_class=tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer("Mia has 12 apples.\n#### 14")["input_ids"]])
    mask = torch.ones_like(ids)

    def teacher_logits():
        return trainer.teacher.completion_logits(trainer.model, ids, mask, ids.shape[1] - 1)

    before = teacher_logits()
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(0.05)
    assert torch.equal(teacher_logits(), before)
    assert not torch.allclose(completion_logits(trainer.model, ids, mask, ids.shape[1] - 1), before)


def test_ema_self_teacher_moves_toward_the_student(tiny_tokenizer, tmp_path):
    model = build_tiny_model(tiny_tokenizer, seed=6)
    trainer = OPSDTrainer(model=model, args=_config(tmp_path, learning_rate=1e-2, self_teacher="ema",
                                                    teacher_ema_decay=0.5),
                          train_dataset=Dataset.from_list(_rows(8)), processing_class=tiny_tokenizer)
    initial = trainer.teacher_model.model.embed_tokens.weight.clone()
    trainer.train()
    teacher_now = trainer.teacher_model.model.embed_tokens.weight
    student_now = trainer.model.model.embed_tokens.weight
    assert not torch.equal(initial, teacher_now)
    assert (teacher_now - student_now).norm() < (initial - student_now).norm()


def test_loss_is_normalised_by_generated_tokens_over_the_accumulation_window(tiny_tokenizer, tmp_path):
    """Two micro-batches with the window's token count give the gradient of one batch holding both."""
    student, teacher = build_tiny_model(tiny_tokenizer, seed=1), build_tiny_model(tiny_tokenizer, seed=2)
    rows = _rows(4, with_solution=True, seed=9)
    trainer = OPSDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path, privileged_from=None),
                          train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    first, second = _attach_dataset_completions(trainer, rows[:1]), _attach_dataset_completions(trainer, rows[1:])
    assert first["completion_mask"].sum() != second["completion_mask"].sum()
    window = first["completion_mask"].sum() + second["completion_mask"].sum()
    trainer.model.zero_grad()
    for micro in (first, second):
        trainer.compute_loss(trainer.model, micro, num_items_in_batch=window).backward()
    accumulated = trainer.model.lm_head.weight.grad.clone()
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, _attach_dataset_completions(trainer, rows)).backward()
    torch.testing.assert_close(accumulated, trainer.model.lm_head.weight.grad, atol=1e-6, rtol=1e-4)


def test_on_policy_coin_is_one_decision_per_step_shared_by_all_ranks(tiny_tokenizer, tmp_path):
    args = _config(tmp_path, lmbda=0.3, seq_kd=False)
    trainers = [OPSDTrainer(model=build_tiny_model(tiny_tokenizer), args=args, processing_class=tiny_tokenizer,
                            train_dataset=Dataset.from_list(_rows(4, with_solution=True))) for _ in range(2)]
    decisions = []
    for step in range(400):
        for trainer in trainers:
            trainer.state.global_step = step
        sources = {trainer._completion_source() for trainer in trainers}
        assert len(sources) == 1  # "two ranks" agree without communicating
        decisions.append(sources.pop() == "student")
    assert 0.22 < sum(decisions) / len(decisions) < 0.38


def test_dataset_steps_without_completions_fail_with_a_clear_message(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset: row 0: has no completion .*trailing assistant turn"):
        OPSDTrainer(model=build_tiny_model(tiny_tokenizer), args=_config(tmp_path, lmbda=0.0),
                    processing_class=tiny_tokenizer, train_dataset=Dataset.from_list(_rows(4)))
    trainer = OPSDTrainer(model=build_tiny_model(tiny_tokenizer), args=_config(tmp_path, lmbda=0.0),
                          processing_class=tiny_tokenizer, train_dataset=Dataset.from_list(_rows(4, True)))
    with pytest.raises(ValueError, match="trailing assistant turn"):  # a batch from elsewhere: refused at the step
        trainer._attach_completions(trainer.data_collator(_rows(2)), "dataset")


def test_nonfinite_loss_names_the_step_and_the_statistic(tiny_tokenizer, tmp_path):
    student, teacher = build_tiny_model(tiny_tokenizer, seed=1), build_tiny_model(tiny_tokenizer, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight[5] = float("nan")
    rows = _rows(2, with_solution=True)
    trainer = OPSDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path),
                          train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    inputs = _attach_dataset_completions(trainer, rows)
    with pytest.raises(FloatingPointError, match=r"step 0: teacher logits"):
        trainer.compute_loss(trainer.model, inputs)
    trainer.args.nonfinite_loss = "skip"
    assert trainer.compute_loss(trainer.model, inputs).item() == 0.0


def test_tokenizer_mismatch_is_detected_on_ids(tiny_tokenizer, tmp_path):
    from harness.world.tiny import build_tokenizer

    other = build_tokenizer(vocab_size=400)
    with pytest.raises(ValueError, match="tokenizer is not the student's"):
        OPSDTrainer(model=build_tiny_model(tiny_tokenizer), teacher_model=build_tiny_model(tiny_tokenizer, seed=2),
                    teacher_processing_class=other, args=_config(tmp_path), processing_class=tiny_tokenizer,
                    train_dataset=Dataset.from_list(_rows(2)))


def test_bad_rows_fail_before_training_with_row_and_field(tiny_tokenizer, tmp_path):
    rows = _rows(3)
    rows[2] = {"messages": [], "answer": "3"}
    with pytest.raises(ValueError, match=r"train_dataset: row 2: field 'messages'"):
        OPSDTrainer(model=build_tiny_model(tiny_tokenizer), args=_config(tmp_path), processing_class=tiny_tokenizer,
                    train_dataset=Dataset.from_list(rows))


def test_teacher_prompts_are_cut_from_the_left_but_never_silently_into_the_privileged_context(tiny_tokenizer):
    row = _rows(1)[0]
    full = OPSDCollator(tiny_tokenizer).row_views(row, 0)
    shared = next(i for i, (t, s) in enumerate(zip(full.teacher_prompt_ids, full.prompt_ids)) if t != s)
    privileged = len(full.teacher_prompt_ids) - shared  # the tail the student's prompt does not have
    context = f"The final answer is {row['answer']}."
    kept = OPSDCollator(tiny_tokenizer, max_teacher_prompt_length=privileged + 1)([row])
    assert kept["num_truncated_teacher_prompts"].item() == 1
    assert context in tiny_tokenizer.decode(kept["teacher_prompts"][0])
    with pytest.raises(ValueError, match=r"row 0: the teacher prompt has .* tokens, over "
                                         r"max_teacher_prompt_length=\d+; .* would cut the privileged context"):
        OPSDCollator(tiny_tokenizer, max_teacher_prompt_length=privileged - 1)([row])
    lenient = OPSDCollator(tiny_tokenizer, max_teacher_prompt_length=privileged - 1, privileged_truncation="truncate_left")
    batch = lenient([row])
    assert batch["num_truncated_teacher_prompts"].item() == 1
    assert batch["teacher_prompt_attention_mask"].sum().item() == privileged - 1


def test_teacher_messages_win_over_privileged_context_and_answer(tiny_tokenizer):
    problem = generate_problems(1, "train")[0]
    row = problem.to_row()
    row["privileged_context"] = "ignored"
    row["teacher_messages"] = [{"role": "system", "content": "Be exact."}] + hinted_messages(problem)
    views = OPSDCollator(tiny_tokenizer).row_views(row, 0)
    text = tiny_tokenizer.decode(views.teacher_prompt_ids)
    assert "Be exact." in text and "ignored" not in text
    assert tiny_tokenizer.decode(views.prompt_ids).count("final answer") == 0
