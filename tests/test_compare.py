"""harness.compare on sample logs written the way lm-eval 0.4.13 writes them.

Each sample dict is built with the keys and hashes of ``lm_eval/evaluator.py`` (the ``log_samples``
block of ``evaluate``) and written to disk by lm-eval's own
``EvaluationTracker.save_results_samples``, so the files have the real on-disk schema
(``samples_<task>_<date_id>.jsonl`` under ``<output_path>/<model_name_sanitized>/``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness import compare, stats

TASK = "opsd_arith"
N_DOCS = 60
DATE_ID = "2026-01-02T03-04-05.678901"


def make_docs(n: int = N_DOCS, changed: dict[int, str] | None = None) -> list[dict]:
    """Arithmetic-world-like documents; ``changed`` swaps the question of some doc_ids."""
    docs = []
    for i in range(n):
        steps = 1 + i % 6
        question = (changed or {}).get(i, f"Ann has {i} apples and does {steps} things. How many?")
        docs.append({"question": question, "answer": str(i + steps), "difficulty": steps})
    return docs


def lm_eval_sample(
    doc_id: int, doc: dict, response: str, filter_name: str, metrics: dict, prompt_prefix: str = ""
) -> dict:
    """One sample exactly as lm-eval's evaluator assembles it before saving."""
    from lm_eval.utils import handle_non_serializable, hash_string

    prompt = f"{prompt_prefix}Question: {doc['question']}\nAnswer:"
    target = doc["answer"]
    arguments = [(prompt, {"until": ["\n\n"], "max_gen_toks": 64, "do_sample": False})]
    example = {
        "doc_id": doc_id,
        "doc": doc,
        "target": target,
        "arguments": arguments,
        "resps": [[response]],
        "filtered_resps": [response.split()[-1]],
        "filter": filter_name,
        "metrics": list(metrics.keys()),
        "doc_hash": hash_string(json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False)),
        "prompt_hash": hash_string(arguments[0][0]),
        "target_hash": hash_string(str(target)),
    }
    example.update(metrics)
    return example


def write_run(
    root: Path,
    correct: dict[str, np.ndarray],
    docs: list[dict] | None = None,
    log_tokens: bool = True,
    log_difficulty: bool = True,
    extra_metrics: dict[str, list] | None = None,
    prompt_prefix: str = "",
    task: str = TASK,
    model: str = "model",
    date_id: str = DATE_ID,
) -> Path:
    """Write one run's sample log with lm-eval's writer; ``correct`` maps filter -> 0/1 per doc."""
    from lm_eval.loggers.evaluation_tracker import EvaluationTracker

    docs = docs if docs is not None else make_docs()
    samples = []
    for filter_name, outcome in correct.items():
        for doc_id, (doc, ok) in enumerate(zip(docs, outcome)):
            if ok is None:
                continue
            words = 3 + doc_id % 5
            answer = doc["answer"] if ok else "-1"
            response = " ".join(["step"] * words + [answer])
            metrics = {name: values[doc_id] for name, values in (extra_metrics or {}).items()}
            metrics["exact_match"] = float(ok)
            if log_tokens:
                metrics["num_output_tokens"] = float(2 * (words + 1))
            if log_difficulty:
                metrics["difficulty"] = float(doc["difficulty"])
            samples.append(lm_eval_sample(doc_id, doc, response, filter_name, metrics, prompt_prefix))
    tracker = EvaluationTracker(output_path=str(root))
    tracker.general_config_tracker.model_name_sanitized = model
    tracker.date_id = date_id
    tracker.save_results_samples(task_name=task, samples=samples)
    return root


def outcomes(seed: int, p: float, n: int = N_DOCS) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(int)


@pytest.fixture
def three_runs(tmp_path):
    base = outcomes(0, 0.35)
    better = np.where(outcomes(1, 0.5) == 1, 1, base)  # flips some wrong answers to right
    worse = np.where(outcomes(2, 0.2) == 1, 0, base)
    flexible = [np.maximum(x, outcomes(3, 0.1)) for x in (base, better, worse)]
    paths = []
    for name, strict, flex in zip(("base", "opsd", "worse"), (base, better, worse), flexible):
        paths.append(write_run(tmp_path / name, {"strict-match": strict, "flexible-extract": flex}))
    return paths, {"strict-match": (base, better, worse), "flexible-extract": tuple(flexible)}


def test_written_files_have_lm_eval_layout(three_runs):
    paths, _ = three_runs
    files = list(paths[0].rglob("*.jsonl"))
    assert [f.name for f in files] == [f"samples_{TASK}_{DATE_ID}.jsonl"]
    assert files[0].parent.name == "model"
    first = json.loads(files[0].read_text().splitlines()[0])
    # lm-eval's writer flattens arguments and stringifies resps.
    assert first["arguments"]["gen_args_0"]["arg_0"].startswith("Question:")
    assert compare.task_of(files[0]) == TASK


def test_two_runs_match_harness_stats(three_runs):
    paths, truth = three_runs
    settings = compare.Settings(n_resamples=2000, seed=5)
    report = compare.compare(paths[:2], ["base", "opsd"], settings=settings)
    sections = [(s["task"], s["filter"]) for s in report["sections"]]
    assert sections == [(TASK, "strict-match"), (TASK, "flexible-extract")]
    section = report["sections"][0]
    base, better, _ = truth["strict-match"]
    assert section["metric"] == "exact_match" and section["n"] == N_DOCS
    for row, y in zip(section["runs"], (base, better)):
        assert row["correct"] == y.sum()
        assert row["ci"] == list(stats.wilson_interval(int(y.sum()), N_DOCS))
    gap = section["gaps"][0]
    expected = stats.paired_bootstrap(base, better, 2000, 0.95, 5)
    assert gap["gap"] == pytest.approx(better.mean() - base.mean(), abs=1e-15)
    assert gap["ci"] == [expected.ci_low, expected.ci_high]
    test = stats.mcnemar_test(base, better)
    assert (gap["b01"], gap["b10"], gap["mcnemar_p"]) == (test.b01, test.b10, test.pvalue)
    assert gap["b01"] > 0 and gap["b10"] == 0
    mde = stats.minimum_detectable_difference(N_DOCS, base.mean(), paired=True, discordant_rate=test.b01 / N_DOCS)
    assert gap["mde"] == mde
    # Output tokens per correct answer: sum of logged num_output_tokens over all docs / #correct.
    tokens = np.array([2 * (3 + i % 5 + 1) for i in range(N_DOCS)])
    assert section["runs"][0]["tokens_per_correct"] == pytest.approx(tokens.sum() / base.sum())
    assert section["runs"][0]["tokens_source"] == "num_output_tokens"
    # Buckets: difficulty 1..6 with default edges (2, 4).
    difficulty = np.array([1 + i % 6 for i in range(N_DOCS)])
    ref_acc = stats.bucket_accuracy(better, difficulty)
    ref_gap = stats.bucket_paired_gap(base, better, difficulty, n_resamples=2000, seed=5)
    assert [b["bucket"] for b in section["buckets"]] == ["easy", "medium", "hard"]
    for bucket, acc, g in zip(section["buckets"], ref_acc, ref_gap):
        assert bucket["n"] == acc.n == 20
        assert bucket["runs"][1]["ci"] == [acc.ci_low, acc.ci_high]
        assert bucket["gaps"][0]["ci"] == [g.gap.ci_low, g.gap.ci_high]
        assert bucket["gaps"][0]["mcnemar_p"] == g.mcnemar.pvalue


def test_cli_three_runs_writes_json_markdown_and_plot(three_runs, tmp_path, capsys):
    paths, truth = three_runs
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    argv = [str(p) for p in paths] + ["--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)]
    assert compare.compare_main(argv + ["--n-resamples", "1000"]) == 0
    printed = capsys.readouterr().out
    assert printed == out_md.read_text()
    report = json.loads(out_json.read_text())
    assert [r["name"] for r in report["runs"]] == ["base", "opsd", "worse"]
    strict = report["sections"][0]
    assert [g["run"] for g in strict["gaps"]] == ["opsd", "worse"]
    base, _, worse = truth["strict-match"]
    assert strict["gaps"][1]["gap"] == pytest.approx(worse.mean() - base.mean())
    assert strict["gaps"][1]["gap"] < 0
    # "worse" only loses a handful of documents: the report warns that its bootstrap CI is too narrow.
    discordant = int(np.sum(base != worse))
    assert 0 < discordant < compare.FEW_DISCORDANT
    assert f"worse: only {discordant} discordant documents" in printed
    assert not any(note.startswith("opsd: only") for note in strict["notes"])
    assert f"## {TASK} · filter `strict-match` · exact_match · n = {N_DOCS}" in printed
    assert "| worse |" in printed and "| hard |" in printed
    image = pytest.importorskip("matplotlib.image").imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 100


def test_names_option_and_explicit_files(three_runs, capsys):
    paths, _ = three_runs
    files = [str(next(p.rglob("samples_*.jsonl"))) for p in paths[:2]]
    assert compare.compare_main(files + ["--names", "A,B", "--n-resamples", "200"]) == 0
    assert "gap vs A" in capsys.readouterr().out


def test_refuses_different_doc_hash_naming_the_doc(tmp_path, capsys):
    y = outcomes(0, 0.5)
    a = write_run(tmp_path / "a", {"none": y})
    b = write_run(tmp_path / "b", {"none": y}, docs=make_docs(changed={17: "A different question?"}))
    assert compare.compare_main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "doc_id 17" in err and "doc_hash" in err


def test_refuses_mismatched_document_sets(tmp_path, capsys):
    y = outcomes(0, 0.5)
    partial = [None if i in (3, 9, 40) else v for i, v in enumerate(y)]
    a = write_run(tmp_path / "a", {"none": y})
    b = write_run(tmp_path / "b", {"none": partial})
    assert compare.compare_main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "3 doc(s) only in run 'a'" in err and "0 only in run 'b'" in err and "3, 9, 40" in err


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    a = write_run(tmp_path / "a", {"none": outcomes(0, 0.5)})
    assert compare.compare_main([str(a), str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert compare.compare_main([str(a), str(tmp_path / "empty")]) == 2
    assert "--log_samples" in capsys.readouterr().err
    assert compare.compare_main([str(a), str(a), "--json", str(tmp_path / "no" / "dir.json")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    write_run(tmp_path / "other", {"none": outcomes(0, 0.5)}, task="other_task")
    assert compare.compare_main([str(a), str(tmp_path / "other")]) == 2
    assert "share no task" in capsys.readouterr().err


def test_two_logs_of_one_task_in_a_run_are_ambiguous(tmp_path, capsys):
    y = outcomes(0, 0.5)
    write_run(tmp_path / "a", {"none": y})
    write_run(tmp_path / "a", {"none": y}, date_id="2026-02-02T00-00-00.000000")
    b = write_run(tmp_path / "b", {"none": y})
    assert compare.compare_main([str(tmp_path / "a"), str(b)]) == 2
    assert "two sample logs for task 'opsd_arith'" in capsys.readouterr().err


def test_metric_choice_and_non_binary_metric(tmp_path, capsys):
    y = outcomes(0, 0.5)
    f1 = {"f1": [0.5 + 0.01 * i for i in range(N_DOCS)]}
    a = write_run(tmp_path / "a", {"none": y}, extra_metrics=f1)
    b = write_run(tmp_path / "b", {"none": outcomes(1, 0.5)}, extra_metrics=f1)
    # f1 comes first in the sample's metrics but is not 0/1: exact_match is chosen.
    report = compare.compare([a, b], ["a", "b"], settings=compare.Settings(n_resamples=100))
    assert report["sections"][0]["metric"] == "exact_match"
    assert compare.compare_main([str(a), str(b), "--metric", "f1"]) == 2
    assert "not binary (value 0.5 at doc_id 0" in capsys.readouterr().err
    assert compare.compare_main([str(a), str(b), "--metric", "acc"]) == 2
    err = capsys.readouterr().err
    assert "no metric 'acc'" in err and "exact_match" in err


def test_token_fallback_prompt_notes_and_no_difficulty(tmp_path):
    y = outcomes(0, 0.5)
    a = write_run(tmp_path / "a", {"none": y}, log_tokens=False, log_difficulty=False)
    b = write_run(tmp_path / "b", {"none": y}, log_difficulty=False, prompt_prefix="<|user|>")
    section = compare.compare([a, b], ["a", "b"], settings=compare.Settings(n_resamples=100))["sections"][0]
    # Fallback: whitespace words of the raw response "step ... step <answer>" = (3 + i % 5) + 1.
    words = sum(3 + i % 5 + 1 for i in range(N_DOCS))
    assert section["runs"][0]["tokens_source"] == "whitespace words of resps"
    assert section["runs"][0]["tokens_per_correct"] == pytest.approx(words / y.sum())
    assert section["runs"][1]["tokens_source"] == "num_output_tokens"
    notes = " ".join(section["notes"])
    assert "a: output tokens are whitespace words of resps" in notes
    assert f"prompts differ (expected across chat templates or few-shot settings) on {N_DOCS} of {N_DOCS}" in notes
    assert "no difficulty buckets" in notes and section["buckets"] == []
    # Identical outcomes: zero gap, no discordance, so no MDE.
    gap = section["gaps"][0]
    assert (gap["gap"], gap["ci"], gap["mcnemar_p"], gap["mde"]) == (0.0, [0.0, 0.0], 1.0, None)


def test_bucket_options(three_runs, capsys):
    paths, _ = three_runs
    argv = [str(p) for p in paths[:2]] + ["--n-resamples", "100"]
    assert compare.compare_main(argv + ["--bucket-edges", "3"]) == 2
    assert "--bucket-names" in capsys.readouterr().err
    assert compare.compare_main(argv + ["--bucket-edges", "3", "--bucket-names", "short,long"]) == 0
    assert "| long | > 3 | 30 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "task"),
    [
        (f"samples_opsd_gsm8k_cot_{DATE_ID}.jsonl", "opsd_gsm8k_cot"),
        ("samples_opsd_arith.jsonl", "opsd_arith"),
    ],
)
def test_task_of(name, task):
    assert compare.task_of(Path(name)) == task


def write_multiple_choice_run(root: Path, acc: np.ndarray) -> Path:
    """A log-likelihood (multiple-choice) run as lm-eval logs it: one request per choice, resps
    are [log-prob, is-greedy] pairs and the metrics are acc / acc_norm."""
    from lm_eval.loggers.evaluation_tracker import EvaluationTracker
    from lm_eval.utils import hash_string

    samples = []
    for doc_id, ok in enumerate(acc):
        doc = {"question": f"Is {doc_id} even?", "choices": ["yes", "no"], "label": doc_id % 2}
        prompt = f"Question: {doc['question']}\nAnswer:"
        samples.append(
            {
                "doc_id": doc_id,
                "doc": doc,
                "target": doc["label"],
                "arguments": [(prompt, f" {c}") for c in doc["choices"]],
                "resps": [[(-1.5, False)], [(-0.2, True)]],
                "filtered_resps": [(-1.5, False), (-0.2, True)],
                "filter": "none",
                "metrics": ["acc", "acc_norm"],
                "doc_hash": hash_string(json.dumps(doc, indent=2, ensure_ascii=False)),
                "prompt_hash": hash_string(prompt),
                "target_hash": hash_string(str(doc["label"])),
                "acc": float(ok),
                "acc_norm": float(ok),
            }
        )
    tracker = EvaluationTracker(output_path=str(root))
    tracker.general_config_tracker.model_name_sanitized = "model"
    tracker.date_id = DATE_ID
    tracker.save_results_samples(task_name="opsd_mc", samples=samples)
    return root


def test_multiple_choice_logs_use_acc_and_have_no_token_counts(tmp_path, capsys):
    a = write_multiple_choice_run(tmp_path / "a", outcomes(0, 0.5, 40))
    b = write_multiple_choice_run(tmp_path / "b", outcomes(1, 0.7, 40))
    section = compare.compare([a, b], ["a", "b"], settings=compare.Settings(n_resamples=100))["sections"][0]
    assert section["metric"] == "acc"
    assert section["runs"][0]["tokens_per_correct"] is None
    assert section["runs"][0]["tokens_source"] == "unavailable (responses are not generated text)"
    assert compare.compare_main([str(a), str(b), "--n-resamples", "100"]) == 0
    assert "· acc · n = 40" in capsys.readouterr().out
