"""The contract TRL's GKD tests check, run against ``GKDTrainer`` and ``OPSDTrainer`` alike.

A user swaps ``GKDTrainer`` for ``OPSDTrainer`` and changes nothing else: the same ``GKDConfig``, datasets,
tokenizer (``pad_token = eos_token``), teacher given as a path or a model, collator, ``compute_metrics``.
Each test is parametrised over both trainers (see conftest), so a divergence fails as one half of a pair.
"""

import os

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDatasetDict
from trl.experimental.utils import DataCollatorForChatML

from conftest import chat, gkd_args, on_device


def _diverged(teacher):
    """The teacher, made far from the student so divergences are well above rounding."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    return teacher


# -- construction -------------------------------------------------------------------------------------------
def test_teacher_given_as_a_path(trainer_class, model_dirs, tokenizer, conversations, tmp_path, teacher):
    trainer = trainer_class(model=model_dirs["student"], teacher_model=model_dirs["teacher"],
                            args=gkd_args(tmp_path), train_dataset=conversations, processing_class=tokenizer)
    loaded = trainer.accelerator.unwrap_model(trainer.teacher_model)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not any(p.requires_grad for p in loaded.parameters()) or trainer_class.__name__ == "GKDTrainer"


def test_teacher_given_as_a_model(trainer_class, student, teacher, tokenizer, conversations, tmp_path):
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path),
                            train_dataset=conversations, processing_class=tokenizer)
    assert trainer.accelerator.unwrap_model(trainer.teacher_model) is teacher


def _eval_dataset(kind: str, rows: list[dict]):
    if kind == "none":
        return None
    split = Dataset.from_list(rows)
    if "iterable" in kind:
        split = split.to_iterable_dataset()
    if kind in ("dataset", "iterable_dataset"):
        return split
    if kind in ("dataset_dict", "iterable_dataset_dict"):
        return (IterableDatasetDict if "iterable" in kind else DatasetDict)({"data1": split, "data2": split})
    return {"data1": split, "data2": split}  # dict_of_dataset, dict_of_iterable_dataset


EVAL_DATASET_KINDS = ["dataset", "iterable_dataset", "dataset_dict", "iterable_dataset_dict", "dict_of_dataset",
                      "dict_of_iterable_dataset", "none"]


@pytest.mark.parametrize("kind", EVAL_DATASET_KINDS)
def test_every_eval_dataset_shape_is_accepted(trainer_class, kind, model_dirs, tokenizer, conversations, tmp_path):
    eval_dataset = _eval_dataset(kind, list(conversations))
    trainer = trainer_class(model=model_dirs["student"], teacher_model=model_dirs["teacher"],
                            args=gkd_args(tmp_path), train_dataset=conversations, eval_dataset=eval_dataset,
                            processing_class=tokenizer)
    if kind == "none":
        assert trainer.eval_dataset is None
    elif "dict" in kind:
        assert set(trainer.eval_dataset) == {"data1", "data2"}


def test_generation_config_follows_the_gkd_config(trainer_class, student, teacher, tokenizer, conversations, tmp_path):
    args = gkd_args(tmp_path, max_new_tokens=7, temperature=0.7)
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=conversations,
                            processing_class=tokenizer)
    config = trainer.generation_config
    assert config.pad_token_id == tokenizer.eos_token_id
    assert config.eos_token_id == student.generation_config.eos_token_id
    assert (config.max_new_tokens, config.temperature, config.top_k, config.top_p) == (7, 0.7, 0, 1.0)
    assert config.do_sample


def test_the_users_config_object_is_the_trainers(trainer_class, student, teacher, tokenizer, conversations, tmp_path):
    args = gkd_args(tmp_path)
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=conversations,
                            processing_class=tokenizer)
    assert trainer.args is args
    args.logging_steps = 7  # a later edit of the user's object is what the trainer reads
    assert trainer.args.logging_steps == 7
    assert (trainer.args.lmbda, trainer.args.beta, trainer.args.temperature) == (0.5, 0.5, 0.9)  # GKD's defaults


# -- training, evaluation, checkpoints ----------------------------------------------------------------------
def test_trains_evaluates_and_saves_checkpoints(trainer_class, model_dirs, tokenizer, conversations, tmp_path):
    args = gkd_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=2,
                    dataloader_drop_last=True)
    trainer = trainer_class(model=model_dirs["student"], teacher_model=model_dirs["teacher"], args=args,
                            train_dataset=conversations, eval_dataset=conversations, processing_class=tokenizer)
    trainer.train()
    history = trainer.state.log_history
    assert history[-1]["train_loss"] is not None and np.isfinite(history[-1]["train_loss"])
    assert np.isfinite([entry["eval_loss"] for entry in history if "eval_loss" in entry]).all()
    assert "model.safetensors" in os.listdir(tmp_path / "checkpoint-2")


def test_evaluate_calls_compute_metrics_with_logits_and_labels(trainer_class, student, teacher, tokenizer,
                                                               conversations, tmp_path):
    seen = []

    def token_accuracy(prediction):
        seen.append(prediction)
        logits, labels = prediction.predictions, prediction.label_ids
        predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
        keep = target != -100
        return {"token_accuracy": float((predicted[keep] == target[keep]).mean())}

    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path), train_dataset=conversations,
                            eval_dataset=conversations, processing_class=tokenizer, compute_metrics=token_accuracy)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_token_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    (prediction,) = seen
    logits, labels = prediction.predictions, prediction.label_ids
    assert logits.ndim == 3 and logits.shape[:2] == labels.shape and logits.shape[2] == student.config.vocab_size
    assert len(labels) == len(conversations)
    for row, labelled in zip(conversations, labels):
        # Evaluation scores the dataset's completions: every row's labels hold its assistant turn.
        text = tokenizer.decode(labelled[labelled != -100])
        assert text.startswith(row["messages"][-1]["content"] + "<|im_end|>")


def test_compute_loss_can_return_the_model_outputs(trainer_class, student, teacher, tokenizer, conversations,
                                                   tmp_path):
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path), train_dataset=conversations,
                            processing_class=tokenizer)
    batch = on_device(trainer, trainer.data_collator(list(conversations)[:2]))
    trainer.model.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        plain = trainer.compute_loss(trainer.model, batch)
    assert outputs.logits.shape == (*batch["input_ids"].shape, student.config.vocab_size)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)


def test_loss_is_normalised_by_num_items_in_batch(trainer_class, student, teacher, tokenizer, conversations,
                                                  tmp_path):
    trainer = trainer_class(model=student, teacher_model=_diverged(teacher), args=gkd_args(tmp_path),
                            train_dataset=conversations, processing_class=tokenizer)
    batch = on_device(trainer, trainer.data_collator(list(conversations)[:2]))
    num_labelled = (batch["labels"] != -100).sum()
    trainer.model.eval()
    with torch.no_grad():
        local_mean = trainer.compute_loss(trainer.model, batch)
        over_labelled = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_labelled)
        over_twice = trainer.compute_loss(trainer.model, batch, num_items_in_batch=2 * num_labelled)
    assert local_mean > 1e-3
    torch.testing.assert_close(over_labelled, local_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(over_twice, local_mean / 2, rtol=1e-4, atol=1e-6)


def test_every_completion_token_counts_with_variable_length_prompts(trainer_class, student, teacher, tokenizer,
                                                                    tmp_path):
    rows = [chat("Hi", "Hello there, how are you?"),
            chat("Please explain in detail the theory of general relativity", "OK")]
    trainer = trainer_class(model=student, teacher_model=_diverged(teacher), args=gkd_args(tmp_path),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = on_device(trainer, trainer.data_collator(rows))
    prompt_lengths = batch["prompt_attention_mask"].sum(1)
    assert prompt_lengths[0] < prompt_lengths[1]
    num_labelled = (batch["labels"] != -100).sum()
    trainer.model.eval()
    with torch.no_grad():
        local_mean = trainer.compute_loss(trainer.model, batch)
        over_labelled = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_labelled)
    torch.testing.assert_close(over_labelled, local_mean, rtol=1e-4, atol=1e-6)


def test_batches_carry_gkds_sequence_layout(trainer_class, student, teacher, tokenizer, tmp_path):
    """``input_ids`` / ``attention_mask`` / ``labels`` as GKD's collator lays them out: each row's prompt + completion
    left-padded as a whole, so every row ends at the last column and shorter prompts start their labels earlier."""
    rows = [chat("Hi", "Hello there, how are you?"), chat("Please explain general relativity in detail.", "OK")]
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape
    assert (batch["attention_mask"][:, -1] == 1).all()
    first_labelled = [int((row != -100).nonzero()[0]) for row in batch["labels"]]
    assert first_labelled[0] < batch["prompts"].shape[1] and first_labelled[0] != first_labelled[1]
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        assert tokenizer.decode(labels[labels != -100]).startswith(row["messages"][-1]["content"] + "<|im_end|>")
        assert (ids[labels != -100] == labels[labels != -100]).all()


# -- lengths ------------------------------------------------------------------------------------------------
def _labelled_text(tokenizer, batch, row: int) -> str:
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != -100])


def test_prompts_over_512_tokens_are_kept_whole_within_max_length(trainer_class, student, teacher, tokenizer,
                                                                   tmp_path):
    long_question = "Summarise this: " + " ".join(f"fact {i} is true." for i in range(90))
    rows = [chat(long_question, "All facts are true."), chat("Hi", "Hello.")]
    full_prompt = tokenizer.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    assert 512 < len(full_prompt) < 1024
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator(rows)
    kept = batch["prompts"][0][batch["prompt_attention_mask"][0].bool()].tolist()
    assert kept == list(full_prompt)


def test_max_length_cuts_the_oldest_prompt_tokens_and_keeps_the_completion(trainer_class, student, teacher,
                                                                           tokenizer, tmp_path):
    answer = " ".join(f"step {i}." for i in range(12))  # longer than max_new_tokens: dataset completions stay whole
    rows = [chat("Question: " + " ".join(f"word{i}" for i in range(80)), answer), chat("Hi", "Hello.")]
    full_prompt = tokenizer.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args(tmp_path, max_length=96),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = trainer.data_collator(rows)
    assert _labelled_text(tokenizer, batch, 0).startswith(answer + "<|im_end|>")
    num_completion = int((batch["labels"][0] != -100).sum())
    assert num_completion > trainer.args.max_new_tokens
    kept = batch["prompts"][0][batch["prompt_attention_mask"][0].bool()].tolist()
    assert len(kept) + num_completion == 96
    assert kept == list(full_prompt[-len(kept):])


# -- GKD's own collator ------------------------------------------------------------------------------------
def test_gkds_collator_passed_explicitly_trains_and_evaluates(trainer_class, student, teacher, tokenizer,
                                                              conversations, tmp_path):
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=128)
    args = gkd_args(tmp_path, lmbda=0.0)  # dataset completions: the path GKD's collator feeds
    trainer = trainer_class(model=student, teacher_model=_diverged(teacher), args=args, data_collator=collator,
                            train_dataset=conversations, eval_dataset=conversations, processing_class=tokenizer)
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert np.isfinite(trainer.evaluate()["eval_loss"])
