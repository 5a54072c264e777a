"""``log_completions``: OPSD training on the warm-started world model logs its completions at the first, every
logging and the last step, with the self-teacher's privileged prompt, to the console and completions.jsonl."""

import json

import pytest
from datasets import Dataset

from harness.world.arithmetic import generate_problems, problems_to_rows
from trl_opsd import OPSDConfig, OPSDTrainer, completion_log
from trl_opsd.completion_log import COMPLETIONS_FILE, CompletionLog, CompletionRecord


def _train(warm_world, tmp_path, **overrides):
    model, tokenizer = warm_world.load()
    rows = problems_to_rows(generate_problems(16, "train", seed=3))
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=2,
                  max_new_tokens=24, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                  learning_rate=1e-3, seed=0)
    values.update(overrides)
    trainer = OPSDTrainer(model=model, args=OPSDConfig(**values), train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    trainer.train()
    return rows


def test_completions_are_logged_at_first_logging_and_last_steps_with_the_teachers_view(warm_world, tmp_path,
                                                                                       capsys, monkeypatch):
    monkeypatch.setattr(completion_log, "is_rich_available", lambda: False)  # the plain console format
    rows = _train(warm_world, tmp_path, log_completions=True, num_completions_to_print=2)
    records = [json.loads(line) for line in (tmp_path / COMPLETIONS_FILE).read_text().splitlines()]
    # Step 1 (first), 2 (logging_steps=2) and 3 (last, not a logging step): each the 4 rows of its window.
    assert [r["step"] for r in records] == [1] * 4 + [2] * 4 + [3] * 4
    questions = {row["messages"][0]["content"]: row["answer"] for row in rows}
    for record in records:
        assert record["source"] == "student" and isinstance(record["completion"], str)
        [question] = [q for q in questions if q in record["prompt"]]
        # The self-teacher's view: the same question with the gold answer as privileged context.
        assert question in record["teacher_prompt"]
        assert f"The final answer is {questions[question]}." in record["teacher_prompt"]
        assert "The final answer is" not in record["prompt"]
    assert any(record["completion"].strip() for record in records)
    assert {r["prompt"] for r in records if r["step"] == 1} != {r["prompt"] for r in records if r["step"] == 3}
    out = capsys.readouterr().out
    for step in (1, 2, 3):
        assert f"=== completions at step {step} (2 of 4) ===" in out
    assert out.count("teacher:    ") == 6 and out.count("completion: ") == 6


def test_nothing_is_logged_without_log_completions(warm_world, tmp_path, capsys):
    _train(warm_world, tmp_path, max_steps=1)
    assert not (tmp_path / COMPLETIONS_FILE).exists() and "=== completions" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="num_completions_to_print must be at least 1"):
        OPSDConfig(output_dir=str(tmp_path), num_completions_to_print=0, report_to="none", use_cpu=True)


def test_rich_table_is_used_when_rich_is_installed(tmp_path, capsys):
    pytest.importorskip("rich", reason="rich is not installed: the plain console format is used (tested above)")
    log = CompletionLog(str(tmp_path), num_to_print=None)
    log.update([CompletionRecord("What is 2+3?", "5", "What is 2+3?\n\nThe final answer is 5.", "student")])
    log.write(7)
    log.write(7)  # once per step
    out = capsys.readouterr().out
    assert "Step 7" in out and "teacher prompt" in out and out.count("What is 2+3?") >= 1
    assert len((tmp_path / COMPLETIONS_FILE).read_text().splitlines()) == 1
