"""The opsd_* lm-eval tasks, ``trl-opsd eval`` and the ``cortex`` lm-eval model, against lm-eval itself.

The end-to-end test runs the stock ``lm_eval`` CLI (a subprocess) on two tiny models, the warm-started
checkpoint and a fresh random one, then ``trl-opsd compare`` on the two sample logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.tasks import TaskManager
from servers import LoopbackServer, TinyLM
from transformers import AutoTokenizer

from harness import cli
from harness.compare import compare_main
from harness.cortex_lm import CortexLM, truncate_at
from harness.lm_eval_runner import lm_eval_argv
from harness.tasks import TASK_NAMES, include_path, task_yaml
from harness.tasks import utils as task_utils
from harness.verifiers import extract_answer, is_correct
from harness.world import arithmetic as world_arithmetic
from harness.world.tiny import build_tiny_model, build_tokenizer

SECRET = "pat-lm-eval-SECRET-77e0c1"
# Three GSM8K-format rows: calculator annotations, and one without them (steps = lines before ####).
GSM8K_ROWS = [
    {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four. "
                 "She sells the rest at $2 per egg. How much does she make every day?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
               "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3"},
    {"question": "A shop sells 400 pens a day for three days. How many pens does it sell?",
     "answer": "Each day it sells 400 pens.\nThere are 3 days.\nSo it sells 400 * 3 pens.\n#### 1,200"},
]


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def bundled_docs() -> list[dict]:
    """The documents of opsd_arith as shipped (whether or not they still match the generator)."""
    return [json.loads(line) for line in task_utils.ARITH_DATA.read_text(encoding="utf-8").splitlines()]


def read_samples(output_path: Path, task: str = "opsd_arith") -> list[dict]:
    [path] = output_path.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ registration and data


def test_tasks_register_with_lm_eval_through_the_include_path():
    printed = subprocess.run([sys.executable, "-m", "harness.tasks"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == include_path() and Path(include_path()).is_absolute()
    manager = TaskManager(include_path=printed.stdout.strip())
    assert set(TASK_NAMES) <= set(manager.all_subtasks)
    assert all(task_yaml(name).is_file() for name in TASK_NAMES)


def test_bundled_arithmetic_data_equals_the_generator_output():
    assert task_utils.ARITH_DATA.read_text(encoding="utf-8") == world_arithmetic.task_jsonl(), (
        f"{task_utils.ARITH_DATA} no longer matches harness.world.arithmetic; after a deliberate change to the world "
        'regenerate it: python -c "from harness.world.arithmetic import write_task_data; write_task_data()"'
    )
    rows = world_arithmetic.task_rows()
    assert len(rows) == world_arithmetic.TASK_NUM_PROBLEMS == len({row["question"] for row in rows})
    assert all(task_utils.solution_steps(row["solution"]) == row["difficulty"] for row in rows)


def test_opsd_arith_documents_prompt_and_generation_settings():
    task = TaskManager(include_path=include_path(), include_defaults=False).load(["opsd_arith"])["tasks"]["opsd_arith"]
    docs = list(task.eval_docs)
    assert docs == bundled_docs()
    assert task.doc_to_text(docs[0]) == docs[0]["question"]  # zero-shot: the user turn is the question
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]
    assert task.config.generation_kwargs["max_gen_toks"] == 64
    assert "<|im_end|>" in task.config.generation_kwargs["until"]


@pytest.mark.parametrize(
    ("response", "flexible", "strict"),
    [
        ("12+7=19\n19-5=14\n#### 14", 1.0, 1.0),
        ("She has 12 + 7 - 5 = 14 left. The answer is 14.", 1.0, 0.0),
        ("#### 14.00", 1.0, 1.0),
        ("12+7=19\n19-5=13\n#### 13", 0.0, 0.0),
        ("The answer is 13, not 14", 0.0, 0.0),  # "answer is" beats the last number
        ("", 0.0, 0.0),
    ],
)
def test_process_results_scores_with_the_project_verifier(response, flexible, strict):
    doc = {"question": "q", "solution": "12+7=19\n19-5=14\n#### 14", "answer": "14", "difficulty": 2}
    assert task_utils.process_results(doc, [response]) == {
        "exact_match": flexible, "exact_match_strict": strict, "difficulty": 2,
    }


def test_solution_steps_counts_annotations_else_lines():
    assert [task_utils.solution_steps(row["answer"]) for row in GSM8K_ROWS] == [2, 2, 3]
    assert task_utils.solution_steps("4+4=8\n8*2=16\n16-1=15\n#### 15") == 3


# ------------------------------------------------------------------ GSM8K from a local file


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_gsm8k_tasks_read_the_file_named_in_metadata(tmp_path):
    data = write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)
    # lm-eval merges the run's --metadata (and model args) into every task's custom_dataset call.
    metadata = {"data_file": str(data), "pretrained": "x"}
    manager = TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata)
    loaded = manager.load(["opsd_gsm8k", "opsd_gsm8k_cot"])["tasks"]
    expected = [
        {"question": GSM8K_ROWS[0]["question"], "solution": GSM8K_ROWS[0]["answer"], "answer": "18", "difficulty": 2},
        {"question": GSM8K_ROWS[1]["question"], "solution": GSM8K_ROWS[1]["answer"], "answer": "3", "difficulty": 2},
        {"question": GSM8K_ROWS[2]["question"], "solution": GSM8K_ROWS[2]["answer"], "answer": "1200", "difficulty": 3},
    ]
    plain, cot = loaded["opsd_gsm8k"], loaded["opsd_gsm8k_cot"]
    assert list(plain.eval_docs) == expected == list(cot.eval_docs)
    assert plain.doc_to_text(expected[0]) == expected[0]["question"]
    cot_prompt = cot.doc_to_text(expected[0])
    assert cot_prompt.startswith(expected[0]["question"] + "\n\n") and "step by step" in cot_prompt
    assert cot_prompt.endswith('a final line "#### N", where N is the final answer.')
    assert plain.process_results(expected[2], ["400 * 3 = 1200, so the answer is 1,200."])["exact_match"] == 1.0


def test_gsm8k_reads_the_hub_parquet_format_too(tmp_path):
    from datasets import Dataset

    Dataset.from_list(GSM8K_ROWS).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    from_parquet = task_utils.load_gsm8k(data_file=str(tmp_path / "test-00000-of-00001.parquet"))["test"]
    from_jsonl = task_utils.load_gsm8k(data_file=str(write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS)))["test"]
    assert list(from_parquet) == list(from_jsonl) and len(from_jsonl) == 3


def test_gsm8k_relative_data_file_is_refused_even_when_it_exists_in_the_cwd(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'gsm8k_test.jsonl' is a relative path.*absolute path"):
        manager = TaskManager(include_path=include_path(), include_defaults=False,
                              metadata={"data_file": "gsm8k_test.jsonl"})
        manager.load(["opsd_gsm8k"])


def test_gsm8k_file_problems_name_the_file_line_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        task_utils.load_gsm8k(data_file=str(tmp_path / "missing.jsonl"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], {"question": "q"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer' is missing"):
        task_utils.load_gsm8k(data_file=str(bad))
    no_final = write_jsonl(tmp_path / "no_final.jsonl", [{"question": "q", "answer": "2+2=4"}])
    with pytest.raises(ValueError, match=r"no_final.jsonl:1: field 'answer' has no final '#### <number>' line"):
        task_utils.load_gsm8k(data_file=str(no_final))


def test_one_file_serves_training_and_the_eval_tasks_in_either_format(tmp_path):
    """Training reads GSM8K rows (data_sources converts them); the eval tasks read training rows (plain-number
    ``answer`` + ``messages``): both directions give the same problems with the same answers."""
    from harness.recipes import data_sources

    gsm8k_file = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    from_gsm8k = list(task_utils.load_gsm8k(data_file=str(gsm8k_file))["test"])
    for with_solution in (True, False):
        training = data_sources.load_rows(data_sources.resolve_source(str(gsm8k_file), "train"),
                                          with_solution=with_solution)
        assert [row["answer"] for row in training] == ["18", "3", "1200"]  # GSM8K -> training: plain numbers
        training_file = write_jsonl(tmp_path / f"train_{with_solution}.jsonl", list(training))
        from_training = list(task_utils.load_gsm8k(data_file=str(training_file))["test"])  # training -> eval
        if with_solution:  # the worked solution rides along as the assistant turn: identical documents
            assert from_training == from_gsm8k
        else:
            assert [{**doc, "solution": "", "difficulty": 0} for doc in from_gsm8k] == from_training
    # The arithmetic world's training rows (numbers as strings, a difficulty field) read as the bundled task docs.
    problems = world_arithmetic.generate_problems(5, split="test", seed=world_arithmetic.TASK_SEED)
    world_file = write_jsonl(tmp_path / "world.jsonl", world_arithmetic.problems_to_rows(problems, with_solution=True))
    docs = list(task_utils.load_gsm8k(data_file=str(world_file))["test"])
    assert docs == [{k: row[k] for k in task_utils.DOC_FIELDS} for row in bundled_docs()[:5]]
    # A numeric JSON answer and a plain-text prompt are read too.
    numeric = write_jsonl(tmp_path / "numeric.jsonl", [{"prompt": "What is 2+2?", "answer": 4}])
    assert list(task_utils.load_gsm8k(data_file=str(numeric))["test"]) == [
        {"question": "What is 2+2?", "solution": "", "answer": "4", "difficulty": 0}]


def test_training_format_problems_name_the_line_and_field(tmp_path):
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "answer": "1"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}], "answer": 1}, two_users])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'messages' must hold exactly one user turn"):
        task_utils.load_gsm8k(data_file=str(bad))
    words = write_jsonl(tmp_path / "words.jsonl", [{"messages": [{"role": "user", "content": "q"}], "answer": "four"}])
    with pytest.raises(ValueError, match=r"words.jsonl:1: field 'answer' has no final .* not a plain number"):
        task_utils.load_gsm8k(data_file=str(words))


def test_gsm8k_without_data_file_or_hub_says_how_to_pass_a_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="openai/gsm8k.*hub unreachable.*--metadata data_file=/absolute/path"):
        task_utils.load_gsm8k(pretrained="some-model", version=1.0)


# ------------------------------------------------------------------ trl-opsd eval: the lm-eval command line


def test_eval_subcommand_passes_every_argument_to_lm_eval():
    argv = ["--model", "hf", "-h", "--tasks", "opsd_arith", "--include_path=/x", "--", "y"]
    assert cli.build_parser("eval").parse_args(["eval", *argv]).lm_eval_args == [a for a in argv if a != "--"]


def test_lm_eval_argv_adds_our_include_path_or_keeps_the_users():
    ours = include_path()
    assert lm_eval_argv(["--tasks", "opsd_arith"]) == (["--tasks", "opsd_arith", "--include_path", ours], [])
    assert lm_eval_argv(["ls", "tasks"]) == (["ls", "tasks", "--include_path", ours], [])
    same = ["--include_path", ours, "-t", "opsd_arith"]
    assert lm_eval_argv(same) == (same, [])
    arith, cot = str(task_yaml("opsd_arith")), str(task_yaml("opsd_gsm8k_cot"))
    argv, [note] = lm_eval_argv(
        ["--tasks", "opsd_arith,mine", "opsd_gsm8k_cot", "--include_path", "/my/tasks", "--limit", "5"]
    )
    assert argv == ["--tasks", f"{arith},mine", cot, "--include_path", "/my/tasks", "--limit", "5"]
    assert "single --include_path" in note and "/my/tasks" in note
    argv, _ = lm_eval_argv(["--tasks=opsd_arith", "--include=/my/tasks"])  # argparse's prefix and = forms
    assert argv == [f"--tasks={arith}", "--include=/my/tasks"]


def test_lm_eval_argv_reads_include_path_and_tasks_from_a_config_file(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("include_path: /my/tasks\ntasks: [opsd_arith, mine]\n")
    argv, [note] = lm_eval_argv(["--config", str(config)])
    assert argv == ["--config", str(config), "--tasks", f"{task_yaml('opsd_arith')},mine"]


# ------------------------------------------------------------------ the cortex model


def test_cortex_model_refuses_loglikelihood_and_needs_an_account(monkeypatch):
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    with pytest.raises(ValueError, match="account_url"):
        CortexLM(model="mistral-large2")
    lm = CortexLM(model="mistral-large2", account_url="http://127.0.0.1:9")
    for method in (lm.loglikelihood, lm.loglikelihood_rolling):
        with pytest.raises(NotImplementedError, match="no log-probabilities"):
            method([])
    assert truncate_at("12+7=19\n\n#### 19<|im_end|>", ["<|im_end|>", "\n\n"]) == "12+7=19"
    assert truncate_at("no stop here", ["\n\n"]) == "no stop here"


def test_trl_opsd_eval_scores_cortex_with_a_user_include_path(tmp_path, monkeypatch, capsys):
    """``trl-opsd eval`` registers --model cortex, keeps the user's --include_path and still finds
    opsd_arith; the adapter sends the chat to Cortex's SSE endpoint with the task's settings."""
    monkeypatch.setenv("SNOWFLAKE_PAT", SECRET)
    user_tasks = tmp_path / "my_tasks"
    user_tasks.mkdir()
    out = tmp_path / "cortex_run"
    with LoopbackServer(TinyLM(seed=1), cortex_tokens={"PROGRAMMATIC_ACCESS_TOKEN": SECRET}) as server:
        status = cli.main([
            "eval", "--model", "cortex", "--model_args", f"model=mistral-large2,account_url={server.url}",
            "--tasks", "opsd_arith", "--include_path", str(user_tasks), "--apply_chat_template",
            "--log_samples", "--output_path", str(out), "--limit", "4",
        ])
        requests = [r for r in server.log if r["path"] == "/api/v2/cortex/inference:complete"]
    assert status == 0
    assert "single --include_path" in capsys.readouterr().err
    samples = sorted(read_samples(out), key=lambda s: s["doc_id"])
    docs = bundled_docs()[:4]
    assert [s["doc"] for s in samples] == docs
    assert sorted(json.dumps(r["body"]["messages"]) for r in requests) == sorted(
        json.dumps([{"role": "user", "content": doc["question"]}]) for doc in docs
    )
    for request in requests:
        assert request["body"]["model"] == "mistral-large2"
        assert (request["body"]["max_tokens"], request["body"]["temperature"]) == (64, 0.0)
        assert request["headers"]["authorization"] == f"Bearer {SECRET}"
    for sample in samples:
        response = sample["resps"][0][0]
        assert response and sample["exact_match"] == float(is_correct(response, sample["doc"]["answer"]))
        assert "num_output_tokens" not in sample  # no tokenizer is known for a hosted model
    assert SECRET not in "".join(p.read_text() for p in out.rglob("*.json*"))


# ------------------------------------------------------------------ end to end: stock lm_eval, then compare


@pytest.mark.slow
def test_stock_lm_eval_on_two_models_then_trl_opsd_compare(warm_world, tmp_path):
    random_dir = tmp_path / "random_model"
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer, seed=1).save_pretrained(random_dir)
    tokenizer.save_pretrained(random_dir)
    runs = {"warm": (Path(warm_world.path), tmp_path / "warm"), "random": (random_dir, tmp_path / "random")}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
             "--tasks", "opsd_arith", "--include_path", include_path(), "--apply_chat_template", "--log_samples",
             "--output_path", str(out), "--limit", "60", "--device", "cpu", "--batch_size", "32"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=offline_env(),
        )
        for name, (model, out) in runs.items()
    }
    for name, process in processes.items():
        log = process.communicate()[0]
        assert process.returncode == 0, f"lm_eval on {name} failed:\n{log[-4000:]}"

    docs = bundled_docs()
    accuracy = {}
    for name, (model, out) in runs.items():
        samples = sorted(read_samples(out), key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(60))
        tokenizer = AutoTokenizer.from_pretrained(model)
        for sample in samples:
            response = sample["resps"][0][0]
            assert sample["doc"] == docs[sample["doc_id"]] and sample["difficulty"] == sample["doc"]["difficulty"]
            # The prompt is the one the project's own generation uses (harness.generation.generate_texts).
            chat = [{"role": "user", "content": sample["doc"]["question"]}]
            prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            assert sample["arguments"]["gen_args_0"]["arg_0"] == prompt
            assert sample["exact_match"] == float(is_correct(response, sample["doc"]["answer"]))
            assert sample["exact_match_strict"] == float(is_correct(response, sample["doc"]["answer"], strict=True))
            assert sample["num_output_tokens"] == len(tokenizer(response, add_special_tokens=False)["input_ids"])
        accuracy[name] = sum(s["exact_match"] for s in samples) / 60
    # The chat prompt and stop strings let a trained model write its whole solution, "#### N" line included
    # (the format is learnt long before the answers are right; an untrained model never writes it).
    warm_responses = [s["resps"][0][0] for s in read_samples(runs["warm"][1])]
    assert sum(extract_answer(r, strict=True) is not None for r in warm_responses) >= 30

    report_file = tmp_path / "report.json"
    markdown = tmp_path / "report.md"
    status = compare_main([str(runs["warm"][1]), str(runs["random"][1]), "--names", "warm,random",
                           "--json", str(report_file), "--markdown", str(markdown)])
    assert status == 0
    [section] = json.loads(report_file.read_text())["sections"]
    assert (section["task"], section["filter"], section["metric"]) == ("opsd_arith", "none", "exact_match")
    assert section["n"] == 60
    assert {run["run"]: run["accuracy"] for run in section["runs"]} == accuracy
    assert section["gaps"][0]["gap"] == pytest.approx(accuracy["random"] - accuracy["warm"])
    assert sum(bucket["n"] for bucket in section["buckets"]) == 60
    text = markdown.read_text()
    assert "n = 60" in text
    for name in ("warm", "random"):
        assert f"| {name} | {accuracy[name]:.3f} |" in text
