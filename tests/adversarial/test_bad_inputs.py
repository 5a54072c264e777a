"""Bad inputs, one table per place they enter: each is refused early, by name, before a model loads or a file
is written.

Each case is (input, expected error type, regex the message must match: the config key, the row and field, the
file and line, or the flag). Trainer cases pass the student as a path that must never be loaded (loading it fails
the test), recipe dry runs run with weights and network blocked, and every case checks its output folder is empty.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
from datasets import Dataset

from harness import compare, rs_sft
from harness.recipes import common, data_sources
from harness.recipes import opd as opd_recipe
from harness.recipes import opsd as opsd_recipe
from harness.recipes import rs_sft as rs_sft_recipe
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.collator import OPSDCollator, RowError
from trl_opsd.unified import UnifiedConfig, UnifiedTrainer

REPO = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")
USER = {"role": "user", "content": "Mia has 3 apples and buys 4. How many now?"}
ASSISTANT = {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}
GOOD = {"messages": [USER], "answer": "7"}


def assert_nothing_written(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), f"{folder} was written: {list(folder.iterdir())}"


def _config_kwargs(tmp_path, **overrides):
    return dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", **overrides)


# ---------------------------------------------------------------------------------------------------------------
# 1. config values: OPSDConfig / UnifiedConfig __post_init__
# ---------------------------------------------------------------------------------------------------------------
CONFIG_CASES = [
    # float knobs: NaN, infinity, out of range
    (dict(kl_clip=NAN), r"kl_clip=nan is not a finite number"),
    (dict(kl_clip=INF), r"kl_clip=inf is not a finite number.*None to turn it off"),
    (dict(kl_clip=-1.0), r"kl_clip must be positive"),
    (dict(kl_clip=0.0), r"kl_clip must be positive"),
    (dict(loss_temperature=NAN), r"loss_temperature=nan is not a finite number"),
    (dict(loss_temperature=INF), r"loss_temperature=inf is not a finite number"),
    (dict(loss_temperature=0.0), r"loss_temperature must be positive"),
    (dict(loss_temperature=-1.0), r"loss_temperature must be positive"),
    (dict(sampled_ratio_cap=NAN), r"sampled_ratio_cap=nan is not a finite number"),
    (dict(sampled_ratio_cap=INF), r"sampled_ratio_cap=inf is not a finite number"),
    (dict(sampled_ratio_cap=0.5), r"sampled_ratio_cap must be at least 1"),
    (dict(temperature=0.0), r"temperature \(the sampling temperature of rollouts\) must be > 0"),
    (dict(temperature=-0.5), r"temperature \(the sampling temperature of rollouts\) must be > 0"),
    (dict(temperature=NAN), r"temperature=nan is not a finite number"),
    (dict(temperature=INF), r"temperature=inf is not a finite number"),
    (dict(beta=NAN), r"beta=nan is not a finite number"),
    (dict(beta=1.5), r"beta must be in the range \[0.0, 1.0\]"),
    (dict(beta=-0.1), r"beta must be in the range \[0.0, 1.0\]"),
    (dict(lmbda=NAN), r"lmbda=nan is not a finite number"),
    (dict(lmbda=1.5), r"lmbda must be in the range \[0.0, 1.0\]"),
    (dict(lmbda=-0.1), r"lmbda must be in the range \[0.0, 1.0\]"),
    (dict(teacher_ema_decay=NAN), r"teacher_ema_decay=nan is not a finite number"),
    (dict(teacher_ema_decay=1.0), r"teacher_ema_decay must be in \(0, 1\)"),
    (dict(teacher_ema_decay=0.0), r"teacher_ema_decay must be in \(0, 1\)"),
    (dict(vllm_gpu_memory_utilization=NAN), r"vllm_gpu_memory_utilization=nan is not a finite number"),
    (dict(vllm_gpu_memory_utilization=1.5), r"vllm_gpu_memory_utilization must be in \(0, 1\]"),
    (dict(vllm_server_timeout=INF), r"vllm_server_timeout=inf is not a finite number"),
    (dict(vllm_server_timeout=0.0), r"vllm_server_timeout must be a positive number of seconds"),
    (dict(learning_rate=NAN), r"learning_rate=nan is not a finite number"),
    # integer knobs
    (dict(teacher_top_k=0), r"teacher_top_k must be at least 1"),
    (dict(max_prompt_length=0), r"max_prompt_length must be a positive number of tokens"),
    (dict(max_new_tokens=0), r"max_new_tokens must be at least 1"),
    (dict(loss_chunk_size=-4), r"loss_chunk_size must be a positive number of tokens"),
    # choice knobs
    (dict(self_teacher="emma"), r"self_teacher must be one of \('frozen', 'ema', 'live'\), got 'emma'"),
    (dict(divergence="kl"), r"divergence must be one of .*got 'kl'"),
    (dict(kl_clip_mode="cap"), r"kl_clip_mode must be one of .*got 'cap'"),
    (dict(privileged_truncation="cut"), r"privileged_truncation must be one of .*got 'cut'"),
    (dict(nonfinite_loss="ignore"), r"nonfinite_loss must be one of .*got 'ignore'"),
    (dict(vllm_mode="remote"), r"vllm_mode must be one of .*got 'remote'"),
    (dict(vllm_model_impl="hf"), r"vllm_model_impl must be one of .*got 'hf'"),
    (dict(divergence="sampled", kl_clip=1.0), r"kl_clip is not defined for divergence='sampled'"),
    # templates, checked against their placeholders
    (dict(teacher_prompt_template="{prompt}\n{gold}"), r"teacher_prompt_template=.*unknown: \['gold'\]"),
    (dict(teacher_prompt_template="{prompt}"), r"teacher_prompt_template=.*exactly the placeholders"),
    (dict(teacher_prompt_template="{prompt} {privileged_context} {"), r"teacher_prompt_template=.*not a valid format"),
    (dict(teacher_prompt_template="{0} {prompt} {privileged_context}"), r"teacher_prompt_template=.*positional"),
    (dict(answer_context_template="The answer is {gold}."), r"answer_context_template=.*\['gold'\].*privileged_from"),
    (dict(answer_context_template="The answer is {}."), r"answer_context_template=.*positional placeholder"),
    (dict(privileged_from="solution"), r"answer_context_template=.*\['answer'\].*privileged_from='solution'"),
]

UNIFIED_CASES = [
    (dict(reward_weight=NAN), r"reward_weight=nan is not a finite number"),
    (dict(distillation_weight=INF), r"distillation_weight=inf is not a finite number"),
    (dict(reward_weight=-1.0), r"reward_weight=-1.0 and distillation_weight=1.0 must be non-negative"),
    (dict(hinton_alpha=NAN), r"hinton_alpha=nan is not a finite number"),
    (dict(hinton_alpha=2.0), r"hinton_alpha must be in \[0, 1\]"),
    (dict(reward_acceptance_threshold=NAN), r"reward_acceptance_threshold=nan is not a finite number"),
    (dict(preset="grpo"), r"preset must be one of .*got 'grpo'"),
    (dict(sampler="teacher_forced"), r"sampler must be one of .*got 'teacher_forced'"),
    (dict(teacher_kind="mentor"), r"teacher_kind must be one of .*got 'mentor'"),
    (dict(num_generations=0), r"num_generations must be at least 1"),
    (dict(preset="opsd", answer_context_template="{gold}"), r"answer_context_template=.*\['gold'\]"),
]


def _knobs(overrides: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in overrides.items())


@pytest.mark.parametrize(("overrides", "message"), CONFIG_CASES, ids=[_knobs(c[0]) for c in CONFIG_CASES])
def test_bad_config_values_are_refused_in_post_init(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        OPSDConfig(**_config_kwargs(tmp_path, **overrides))
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(("overrides", "message"), UNIFIED_CASES, ids=[_knobs(c[0]) for c in UNIFIED_CASES])
def test_bad_unified_config_values_are_refused_in_post_init(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        UnifiedConfig(**_config_kwargs(tmp_path, **overrides))
    assert_nothing_written(tmp_path / "out")


def test_a_collator_built_by_hand_checks_its_templates(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"answer_context_template=.*\['gold'\]"):
        OPSDCollator(tiny_tokenizer, answer_context_template="{gold}")


# ---------------------------------------------------------------------------------------------------------------
# 2. rows and their fit with the trainer: refused at construction, naming dataset, row and field
# ---------------------------------------------------------------------------------------------------------------
ROW_CASES = [
    # messages
    ("turn without content", [{"messages": [{"role": "user"}], "answer": "7"}],
     {}, r"train_dataset: row 0: field 'messages', turn 0 \(user\) has no 'content'"),
    ("number where text belongs", [{"messages": [{"role": "user", "content": 12}], "answer": "7"}],
     {}, r"row 0: field 'messages', turn 0 \(user\) has content int 12"),
    ("unknown role", [{"messages": [{"role": "bot", "content": "hi"}], "answer": "7"}],
     {}, r"row 0: field 'messages', turn 0: role 'bot' is not one of"),
    ("system turn only", [{"messages": [{"role": "system", "content": "Be brief."}], "answer": "7"}],
     {}, r"row 0: field 'messages' has no user turn \(roles: \['system'\]\)"),
    ("system then assistant", [{"messages": [{"role": "system", "content": "Be brief."}, ASSISTANT], "answer": "7"}],
     {}, r"row 0: field 'messages' has no user turn before its completion"),
    ("assistant turn only", [{"messages": [ASSISTANT], "answer": "7"}],
     {}, r"row 0: field 'messages' has no user turn"),
    ("empty messages", [{"messages": [], "answer": "7"}],
     {}, r"row 0: field 'messages' must be a non-empty list"),
    ("messages as text", [{"messages": "hello", "answer": "7"}],
     {}, r"row 0: field 'messages' must be a non-empty list of \{role, content\} dicts, got str"),
    ("turns as text", [{"messages": ["hello"], "answer": "7"}],
     {}, r"row 0: field 'messages', turn 0 must be a \{role, content\} dict, got str"),
    ("bad row among good ones", [GOOD, GOOD, GOOD, {"messages": [{"role": "user", "content": None}], "answer": "7"}],
     {}, r"train_dataset: row 3: field 'messages', turn 0 \(user\) has no 'content'"),
    # prompt / completion
    ("prompt a number", [{"prompt": 5, "answer": "7"}], {}, r"row 0: field 'prompt' must be text or a chat, got int"),
    ("prompt empty", [{"prompt": "  ", "answer": "7"}], {}, r"row 0: field 'prompt' is empty"),
    ("prompt chat without user", [{"prompt": [{"role": "system", "content": "x"}], "answer": "7"}],
     {}, r"row 0: field 'prompt' has no user turn"),
    ("completion a number", [{"prompt": "2+2?", "completion": 4, "answer": "4"}],
     {}, r"row 0: field 'completion' must be text or a chat, got int"),
    ("completion a dict", [{"prompt": "2+2?", "completion": {"text": "4"}, "answer": "4"}],
     {}, r"row 0: field 'completion' must be text or a chat, got dict"),
    ("completion turn without content", [{"prompt": "2+2?", "completion": [{"role": "assistant"}], "answer": "4"}],
     {}, r"row 0: field 'completion', turn 0 \(assistant\) has no 'content'"),
    ("neither messages nor prompt", [{"question": "2+2?", "answer": "4"}],
     {}, r"row 0: has neither 'messages' nor 'prompt' \(fields present: \['answer', 'question'\]\)"),
    # teacher_messages
    ("empty teacher_messages", [{"messages": [USER], "teacher_messages": []}],
     {}, r"row 0: field 'teacher_messages' is an empty list"),
    ("teacher_messages without user", [{"messages": [USER], "teacher_messages": [{"role": "system", "content": "x"}]}],
     {}, r"row 0: field 'teacher_messages' has no user turn"),
    ("teacher_messages turn without content", [{"messages": [USER], "teacher_messages": [{"role": "user"}]}],
     {}, r"row 0: field 'teacher_messages', turn 0 \(user\) has no 'content'"),
    ("teacher_messages as text", [{"messages": [USER], "teacher_messages": "the answer is 7"}],
     {}, r"row 0: field 'teacher_messages' must be a non-empty list"),
    # privileged_context
    ("privileged_context a list", [{"messages": [USER], "privileged_context": ["7", "eight"]}],
     {}, r"row 0: field 'privileged_context' must be text, got list"),
    ("privileged_context a dict", [{"messages": [USER], "privileged_context": {"hint": "7"}}],
     {}, r"row 0: field 'privileged_context' must be text, got dict"),
    ("privileged_context a number", [{"messages": [USER], "privileged_context": 7}],
     {}, r"row 0: field 'privileged_context' must be text, got int"),
    # answer (privileged_from)
    ("answer NaN", [{"messages": [USER], "answer": NAN}],
     {}, r"row 0: field 'answer' \(privileged_from\) is nan"),
    ("answer infinite", [{"messages": [USER], "answer": INF}],
     {}, r"row 0: field 'answer' \(privileged_from\) is inf"),
    ("answer a list", [{"messages": [USER], "answer": ["7"]}],
     {}, r"row 0: field 'answer' \(privileged_from\) must be text or a number, got list"),
    ("answer None among answered rows", [GOOD, {"messages": [USER], "answer": None}],
     {}, r"row 1: field 'answer' \(privileged_from\) is None while other rows have it"),
    ("answer empty among answered rows", [GOOD, {"messages": [USER], "answer": ""}, GOOD],
     {}, r"row 1: field 'answer' \(privileged_from\) is '' while other rows have it"),
    ("privileged_from names a missing column", [GOOD, GOOD],
     dict(privileged_from="solution", answer_context_template="Solution: {solution}"),
     r"privileged_from='solution' names a column that no row has; the rows have \['answer', 'messages'\]"),
    ("self-teacher without any privileged context", [{"messages": [USER]}, {"messages": [USER]}],
     {}, r"no row gives the self-teacher privileged context .*loss would be 0"),
    # rows vs the config
    ("lmbda < 1 and a row without completion", [{"messages": [USER, ASSISTANT], "answer": "7"}, GOOD],
     dict(lmbda=0.5), r"row 1: has no completion .*lmbda=0.5 < 1 with seq_kd=False"),
    ("teacher prompt over its limit", [{"messages": [USER], "privileged_context": "a long hint " * 40}],
     dict(max_prompt_length=64), r"row 0: the teacher prompt has \d+ tokens, over max_teacher_prompt_length=64"),
]


def _trainer(tmp_path, rows, tokenizer, teacher_model=None, eval_rows=None, **overrides):
    return OPSDTrainer(
        model="never/loaded-student", teacher_model=teacher_model,
        args=OPSDConfig(**_config_kwargs(tmp_path, **overrides)), processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=None if eval_rows is None else Dataset.from_list(eval_rows),
    )


@pytest.mark.parametrize(("what", "rows", "overrides", "message"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_rows_are_refused_at_construction_by_row_and_field(tmp_path, tiny_tokenizer, no_weights_no_network, what, rows,
                                                                overrides, message):
    with pytest.raises(RowError, match=message):
        _trainer(tmp_path, rows, tiny_tokenizer, **overrides)
    assert_nothing_written(tmp_path / "out")


ACCEPTED_ROWS = [
    ("privileged context on some rows, no privileged_from", [{"messages": [USER], "privileged_context": "It is 7."},
                                                            {"messages": [USER]}], dict(privileged_from=None), None),
    ("teacher_messages, privileged_context and answer mixed", [{"messages": [USER], "teacher_messages": [USER]},
                                                               {"messages": [USER], "privileged_context": "7"},
                                                               GOOD], {}, None),
    ("an external teacher and no answer column (GKD's rows)", [{"messages": [USER, ASSISTANT]}] * 2, dict(lmbda=0.5),
     "an external teacher"),
    ("an empty privileged_context counts as absent", [{"messages": [USER], "privileged_context": "", "answer": "7"}],
     {}, None),
]


@pytest.mark.parametrize(("what", "rows", "overrides", "teacher"), ACCEPTED_ROWS, ids=[c[0] for c in ACCEPTED_ROWS])
def test_usable_rows_pass_the_dataset_checks(tmp_path, tiny_tokenizer, what, rows, overrides, teacher):
    from trl_opsd.collator import validate_dataset

    args = OPSDConfig(**_config_kwargs(tmp_path, **overrides))
    collator = OPSDCollator(tiny_tokenizer, privileged_from=args.privileged_from)
    validate_dataset(collator, Dataset.from_list(rows), "train_dataset", args, teacher)


TRAINER_CASES = [
    ("self_teacher with a teacher_model", dict(self_teacher="ema"), "never/loaded-teacher",
     r"self_teacher='ema' chooses a self-teacher, but a teacher_model was given"),
    ("teacher_top_k above the vocabulary", dict(divergence="topk", teacher_top_k=100_000, privileged_from=None),
     "never/loaded-teacher", r"teacher_top_k=100000 is above the tokenizer's vocabulary \(\d+ tokens\)"),
]


@pytest.mark.parametrize(("what", "overrides", "teacher", "message"), TRAINER_CASES, ids=[c[0] for c in TRAINER_CASES])
def test_config_that_does_not_fit_the_teacher_or_tokenizer_is_refused_at_construction(
        tmp_path, tiny_tokenizer, no_weights_no_network, what, overrides, teacher, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, [GOOD], tiny_tokenizer, teacher_model=teacher, **overrides)
    assert_nothing_written(tmp_path / "out")


def test_a_bad_eval_row_is_refused_naming_the_eval_dataset(tmp_path, tiny_tokenizer, no_weights_no_network):
    with pytest.raises(RowError, match=r"eval_dataset: row 1: field 'messages', turn 0: role 'robot'"):
        _trainer(tmp_path, [GOOD], tiny_tokenizer, eval_rows=[GOOD, {"messages": [{"role": "robot", "content": "x"}],
                                                                    "answer": "1"}])


def test_a_chat_template_that_raises_is_reported_with_the_row(tmp_path, tiny_tokenizer, no_weights_no_network):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}" \
                              "{% endif %}{{ messages[0]['content'] }}"
    rows = [GOOD, {"messages": [{"role": "system", "content": "x"}, USER], "answer": "7"}]
    with pytest.raises(RowError, match=r"train_dataset: row 1: rendering fields \['messages', 'answer'\] failed with "
                                       r"\w+: no system turns"):
        _trainer(tmp_path, rows, tokenizer)


def test_unified_trainer_refuses_dataset_steps_without_completions(tmp_path, tiny_tokenizer, no_weights_no_network):
    args = UnifiedConfig(**_config_kwargs(tmp_path, preset="kd"))
    with pytest.raises(RowError, match=r"row 0: has no completion .*lmbda=0.0 < 1"):
        UnifiedTrainer(model="never/loaded-student", teacher_model="never/loaded-teacher", args=args,
                       processing_class=tiny_tokenizer, train_dataset=Dataset.from_list([GOOD]))


# ---------------------------------------------------------------------------------------------------------------
# 3. files: JSONL datasets (recipes), prompt files (rs-sft), lm-eval sample logs (compare)
# ---------------------------------------------------------------------------------------------------------------
GOOD_LINE = json.dumps(GOOD)
JSONL_CASES = [
    ("truncated last line", f"{GOOD_LINE}\n{GOOD_LINE[:25]}", r"rows\.jsonl:2: not valid JSON"),
    ("a line that is a list", f"{GOOD_LINE}\n[1, 2]\n", r"rows\.jsonl:2: a row must be a JSON object, got list"),
    ("a line that is a number", f"{GOOD_LINE}\n{GOOD_LINE}\n42\n", r"rows\.jsonl:3: a row must be a JSON object"),
    ("invalid UTF-8", f"{GOOD_LINE}\n".encode() + b'{"messages": "\xff\xfe"}\n', r"rows\.jsonl:2: not UTF-8 text"),
    ("empty file", "\n\n", r"rows\.jsonl holds no rows"),
    ("truncated JSON array (a .json file)", f"[\n {GOOD_LINE},\n {GOOD_LINE[:30]}", r"rows\.json:3: not valid JSON"),
    ("JSON lines in a .json file, one truncated", f"{GOOD_LINE}\n{GOOD_LINE[:30]}", r"rows\.json:2: not valid JSON"),
]


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(("what", "content", "message"), JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_bad_jsonl_datasets_name_the_file_and_line(tmp_path, what, content, message):
    path = _write(tmp_path / "data" / ("rows.json" if ".json file" in what else "rows.jsonl"), content)
    with pytest.raises(data_sources.DataSourceError, match=message):
        data_sources.load_rows(data_sources.resolve_source(str(path), "train"))


PROMPT_FILE_CASES = [
    ("truncated last line", f"{GOOD_LINE}\n{GOOD_LINE[:30]}", r"prompts\.jsonl:2: not valid JSON"),
    ("a line that is a string", '"just text"\n', r"prompts\.jsonl:1: a row must be a JSON object, got str"),
    ("a chat without a user turn", GOOD_LINE + "\n" + json.dumps({"messages": [{"role": "system", "content": "x"}]}),
     r"prompts\.jsonl:2: row 1: the chat has no user turn"),
]


@pytest.mark.parametrize(("what", "content", "message"), PROMPT_FILE_CASES, ids=[c[0] for c in PROMPT_FILE_CASES])
def test_bad_rs_sft_prompt_files_name_the_file_and_line(tmp_path, what, content, message):
    path = _write(tmp_path / "prompts.jsonl", content)
    with pytest.raises(ValueError, match=message):
        rs_sft.load_prompts(path)


def _sample(doc_id, **fields):
    return {"doc_id": doc_id, "filter": "none", "doc_hash": f"h{doc_id}", "exact_match": float(doc_id % 2), **fields}


def _sample_log(folder: Path, lines: list) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return _write(folder / "samples_arith_2026-01-01T00-00-00.000000.jsonl", text)


GOOD_SAMPLES = [_sample(i) for i in range(6)]
COMPARE_CASES = [
    ("a line that is a list", [*GOOD_SAMPLES, [1, 2]], r"\.jsonl:7: a sample line must be a JSON object, got list"),
    ("a list filter", [_sample(0), _sample(1, filter=["none"])],
     r"\.jsonl:2: field 'filter' must be a string, got list"),
    ("an integer doc_hash", [_sample(0, doc_hash=12345)], r"\.jsonl:1: field 'doc_hash' must be a string, got int"),
    ("a string doc_id", [_sample(0), {**_sample(1), "doc_id": "1"}], r"\.jsonl:2: field 'doc_id' must be an integer"),
    ("NaN num_output_tokens", [_sample(0), '{"doc_id": 1, "filter": "none", "doc_hash": "h1", "exact_match": 1.0, '
                                           '"num_output_tokens": NaN}'],
     r"\.jsonl:2: field 'num_output_tokens' is nan; it must be a finite number"),
    ("infinite num_output_tokens", [_sample(0, num_output_tokens=INF)],
     r"\.jsonl:1: field 'num_output_tokens' is inf"),
    ("negative num_output_tokens", [_sample(0, num_output_tokens=-3)],
     r"\.jsonl:1: field 'num_output_tokens' is negative"),
    ("NaN difficulty", [_sample(0, difficulty=NAN)], r"\.jsonl:1: field 'difficulty' is nan"),
    ("a sample without doc_hash", [{"doc_id": 0, "filter": "none"}], r"\.jsonl:1: sample lacks doc_hash"),
]


@pytest.mark.parametrize(("what", "lines", "message"), COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_bad_sample_logs_name_the_file_and_line(tmp_path, capsys, what, lines, message):
    good = _sample_log(tmp_path / "a", GOOD_SAMPLES)
    bad = _sample_log(tmp_path / "b", lines)
    out = tmp_path / "out"
    out.mkdir()
    code = compare.compare_main([str(good.parent), str(bad.parent), "--json", str(out / "r.json"),
                                 "--markdown", str(out / "r.md")])
    assert code == 2
    assert_nothing_written(out)
    assert "samples_arith" in capsys.readouterr().err
    with pytest.raises(compare.CompareError, match=message):
        compare.read_samples(bad)


def test_a_sample_log_that_is_not_utf8_names_the_file(tmp_path):
    path = _write(tmp_path / "samples_arith_2026-01-01T00-00-00.jsonl", json.dumps(_sample(0)).encode() + b"\n\xff\n")
    with pytest.raises(compare.CompareError, match=r"samples_arith_2026-01-01T00-00-00\.jsonl:2: not UTF-8 text"):
        compare.read_samples(path)


@pytest.mark.parametrize("flag", ["--plot", "--json", "--markdown"])
def test_compare_outputs_into_a_missing_folder_fail_before_anything_is_written(tmp_path, capsys, flag):
    a, b = _sample_log(tmp_path / "a", GOOD_SAMPLES), _sample_log(tmp_path / "b", GOOD_SAMPLES)
    out = tmp_path / "out"
    out.mkdir()
    outputs = {"--json": out / "r.json", "--markdown": out / "r.md", "--plot": out / "r.png"}
    outputs[flag] = tmp_path / "missing" / outputs[flag].name
    argv = [str(a.parent), str(b.parent)] + [token for key, path in outputs.items() for token in (key, str(path))]
    assert compare.compare_main(argv) == 2
    assert re.search(r"missing/r\.\w+: its folder .*missing does not exist", capsys.readouterr().err)
    assert_nothing_written(out)


def test_compare_writes_strict_json():
    with pytest.raises(compare.CompareError, match="non-finite number"):
        compare.report_json({"gap": math.nan})


# ---------------------------------------------------------------------------------------------------------------
# 4. recipe command lines and dry runs: refused before the plan or a manifest is written, with no weights loaded
# ---------------------------------------------------------------------------------------------------------------
ARITH = REPO / "harness" / "recipes" / "configs" / "opsd_arith_cpu.yaml"
OPD_ARITH = REPO / "harness" / "recipes" / "configs" / "opd_arith_cpu.yaml"
API_TEACHER = ["--teacher_model_name_or_path", "", "--teacher_api_base", "http://127.0.0.1:9/v1",
               "--teacher_api_model", "served", "--divergence", "topk", "--teacher_top_k", "5"]


def _jsonl(tmp_path, rows) -> str:
    return str(_write(tmp_path / "data" / "rows.jsonl", "".join(json.dumps(row) + "\n" for row in rows)))


RECIPE_CASES = [
    ("row turn without content", opsd_recipe, ARITH,
     lambda t: ["--dataset_name", _jsonl(t, [GOOD, {"messages": [{"role": "user", "content": None}], "answer": "7"}])],
     r"train_dataset: row 1: field 'messages', turn 0 \(user\) has no 'content'"),
    ("row answer NaN", opsd_recipe, ARITH,
     lambda t: ["--dataset_name", _write(t / "d" / "rows.jsonl", GOOD_LINE + '\n{"messages": [{"role": "user", '
                                         '"content": "q"}], "answer": NaN}\n').as_posix()],
     r"row 1: field 'answer' \(privileged_from\) is None while other rows have it"),  # datasets reads NaN as null
    ("privileged_from column missing", opsd_recipe, ARITH,
     lambda t: ["--dataset_name", _jsonl(t, [GOOD, GOOD]), "--privileged_from", "hint",
                "--answer_context_template", "Hint: {hint}"],
     r"privileged_from='hint' names a column that no row has"),
    ("truncated JSONL", opsd_recipe, ARITH,
     lambda t: ["--dataset_name", _write(t / "d" / "rows.jsonl", f"{GOOD_LINE}\n{GOOD_LINE[:20]}").as_posix()],
     r"rows\.jsonl:2: not valid JSON"),
    ("sampling temperature 0", opsd_recipe, ARITH, lambda t: ["--temperature", "0"],
     r"temperature \(the sampling temperature of rollouts\) must be > 0"),
    ("kl_clip nan", opsd_recipe, ARITH, lambda t: ["--kl_clip", "nan"], r"kl_clip=nan is not a finite number"),
    ("template placeholder", opsd_recipe, ARITH, lambda t: ["--answer_context_template", "Gold: {gold}"],
     r"answer_context_template=.*\['gold'\]"),
    ("API key variable unset", opd_recipe, OPD_ARITH,
     lambda t: [*API_TEACHER, "--teacher_api_key_env", "TRL_OPSD_SURELY_UNSET_KEY"],
     r"teacher_api_key_env='TRL_OPSD_SURELY_UNSET_KEY' names an environment variable that is not set"),
    ("API teacher top-k over the vocabulary", opd_recipe, OPD_ARITH,
     lambda t: [*API_TEACHER[:-1], "1000000"], r"teacher_top_k=1000000 is above the tokenizer's vocabulary"),
    ("ema self-teacher with LoRA", opsd_recipe, ARITH, lambda t: ["--use_peft", "true", "--self_teacher", "ema"],
     r"self_teacher='ema'"),
]


@pytest.mark.parametrize(("what", "recipe", "config", "extra", "message"), RECIPE_CASES,
                         ids=[c[0] for c in RECIPE_CASES])
def test_recipe_dry_runs_refuse_bad_inputs_before_writing(tmp_path, no_weights_no_network, monkeypatch, what, recipe, config,
                                                          extra, message):
    monkeypatch.delenv("TRL_OPSD_SURELY_UNSET_KEY", raising=False)
    out = tmp_path / "out"
    with pytest.raises(common.RecipeError, match=message):  # run_cli prints it and exits with status 2
        recipe.main(["--config", str(config), "--dry_run", "--output_dir", str(out), *extra(tmp_path)])
    assert_nothing_written(out)


def test_the_teacher_cache_folder_is_a_folder(tmp_path):
    from harness.recipes.distill import teacher_cache_file

    assert teacher_cache_file(str(tmp_path / "cache")) == str(tmp_path / "cache" / "teacher_cache.sqlite")
    assert teacher_cache_file(str(tmp_path / "responses.sqlite")) == str(tmp_path / "responses.sqlite")


def test_recipe_dry_run_records_that_rows_were_checked(tmp_path, no_weights_no_network):
    out = tmp_path / "out"
    assert opsd_recipe.main(["--config", str(ARITH), "--dry_run", "--output_dir", str(out),
                             "--dataset_name", _jsonl(tmp_path, [GOOD, GOOD])]) == 0
    manifest = json.loads((out / common.DRY_RUN_MANIFEST_NAME).read_text())
    assert manifest["plan"]["data"]["rows_checked"] == "all 2 rows built with the student's tokenizer"


RS_SFT_CASES = [
    ("--samples 0", lambda t: ["--samples", "0"], r"--samples must be at least 1, got 0"),
    ("--chunk-prompts 0", lambda t: ["--chunk-prompts", "0"], r"--chunk-prompts must be at least 1"),
    ("--temperature nan", lambda t: ["--temperature", "nan"], r"--temperature must be a finite number"),
    ("--temperature 0 for the student", lambda t: ["--temperature", "0"], r"--temperature must be > 0 for sampling"),
    ("--tau inf", lambda t: ["--tau", "inf"], r"--tau must be a finite number"),
    ("--max-per-prompt 0", lambda t: ["--max-per-prompt", "0"], r"--max-per-prompt must be at least 1"),
    ("truncated prompts file", lambda t: ["--prompts", _write(t / "p.jsonl", f"{GOOD_LINE}\n{{\"mess").as_posix()],
     r"p\.jsonl:2: not valid JSON"),
    ("teacher key variable unset",
     lambda t: ["--sampler", "teacher", "--teacher-model", "m", "--teacher-url", "http://127.0.0.1:9/v1",
                "--teacher-api-key-env", "TRL_OPSD_SURELY_UNSET_KEY"],
     r"--teacher-api-key-env names TRL_OPSD_SURELY_UNSET_KEY, which is not set"),
]


@pytest.mark.parametrize(("what", "extra", "message"), RS_SFT_CASES, ids=[c[0] for c in RS_SFT_CASES])
def test_rs_sft_recipe_refuses_bad_flags_before_writing(tmp_path, no_weights_no_network, monkeypatch, what, extra, message):
    monkeypatch.delenv("TRL_OPSD_SURELY_UNSET_KEY", raising=False)
    out = tmp_path / "out"
    with pytest.raises(common.RecipeError, match=message):
        rs_sft_recipe.main(["--out", str(out), *extra(tmp_path), "--dry_run"])
    assert_nothing_written(out)


def test_a_torn_job_file_names_itself_and_the_way_out(tmp_path):
    out = tmp_path / "job"
    _write(out / "job.json", '{"sampler": {"kind": "stu')
    with pytest.raises(ValueError, match=r"job\.json is not valid JSON .*delete it and rerun the same command"):
        rs_sft._check_job(out / "job.json", {"sampler": {}})


def test_the_table_covers_the_issue():
    """The issue tried 72 bad inputs; this file keeps at least as many cases."""
    tables = [CONFIG_CASES, UNIFIED_CASES, ROW_CASES, TRAINER_CASES, JSONL_CASES, PROMPT_FILE_CASES, COMPARE_CASES,
              RECIPE_CASES, RS_SFT_CASES]
    assert sum(len(table) for table in tables) >= 72
