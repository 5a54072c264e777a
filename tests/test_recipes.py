"""Recipes: every YAML config parses, every dry run plans offline without weights, manifests hold no secret."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

from harness.recipes import common, data_sources, distill, launch_env, memory, models
from harness.recipes import opd, opsd, sft, unified

CONFIGS = sorted((REPO / "harness" / "recipes" / "configs").glob("*.yaml"))
RECIPES = {"opsd": opsd, "opd": opd, "sft": sft, "unified": unified}
ACCELERATE = REPO / "accelerate_configs"


def recipe_of(config: Path):
    return RECIPES[config.stem.split("_", 1)[0]]


def parser_of(config: Path):
    if recipe_of(config) is sft:
        from trl import ModelConfig, SFTConfig, TrlParser

        return TrlParser((common.RecipeArguments, SFTConfig, ModelConfig))
    return distill.make_parser(config.stem.split("_", 1)[0])


def dry_run(config: Path, tmp_path: Path, *extra: str) -> dict:
    """Run the config's recipe with --dry_run in-process; return the plan from its dry-run manifest."""
    out = tmp_path / f"out_{config.stem}"
    code = recipe_of(config).main(["--config", str(config), "--dry_run", "--output_dir", str(out), *extra])
    assert code == 0
    return json.loads((out / common.DRY_RUN_MANIFEST_NAME).read_text())


def test_the_configs_the_issue_asks_for_exist():
    assert {c.name for c in CONFIGS} >= {
        "opsd_arith_cpu.yaml", "opd_arith_cpu.yaml", "sft_arith_cpu.yaml", "opd_mistral7b_mixtral_gsm8k.yaml",
        "opsd_mistral7b_gsm8k.yaml", "opsd_qwen3_1p7b.yaml",
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_every_yaml_config_parses_into_its_dataclasses(config):
    values = yaml.safe_load(config.read_text())
    parsed = common.parse(parser_of(config), ["--config", str(config)], common.detect_launch())
    for key, value in values.items():
        holders = [arguments for arguments in parsed if hasattr(arguments, key)]
        assert holders, f"{config.name}: {key} is not a field of {[type(a).__name__ for a in parsed]}"
        landed = getattr(holders[0], key)
        landed = getattr(landed, "value", landed)  # enums such as lr_scheduler_type
        if key == "report_to":  # TrainingArguments turns "none" into []
            landed = landed or "none"
        assert landed == value or str(landed) == str(value), f"{config.name}: {key}={landed!r}, YAML says {value!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_dry_run_of_every_config_plans_offline_without_loading_weights(config, tmp_path, no_weights_no_network):
    manifest = dry_run(config, tmp_path)
    plan = manifest["plan"]
    assert manifest["status"] == "dry_run"
    assert {"student", "data", "loss", "optimization", "accelerate", "memory"} <= set(plan)
    assert plan["student"]["name"] == yaml.safe_load(config.read_text())["model_name_or_path"]
    assert manifest["packages"]["torch"] and "commit" in manifest["git"]
    if recipe_of(config) is not sft:
        assert plan["teacher"]["kind"] in ("self", "external", "none")
    if plan["data"]["source"] == "arithmetic":
        assert len(plan["data"]["fingerprint_sha256"]) == 64


def test_the_seed_notebooks_loss_is_planned_as_forward_kl_with_clamp_at_one(tmp_path, no_weights_no_network):
    """The notebook's "reverse-KL KL(p_T || p_S)" is the forward KL: the configs must reproduce its math."""
    for name in ("opd_mistral7b_mixtral_gsm8k", "opsd_mistral7b_gsm8k"):
        loss = dry_run(REPO / "harness" / "recipes" / "configs" / f"{name}.yaml", tmp_path)["plan"]["loss"]
        assert loss["divergence"].startswith("forward KL  KL(p_T || p_S)")
        assert loss["clip"].startswith("clamp at 1.0")


def test_mistral_mixtral_plan_names_both_models_in_4bit_and_sizes_them_without_the_hub(tmp_path, no_weights_no_network):
    plan = dry_run(REPO / "harness/recipes/configs/opd_mistral7b_mixtral_gsm8k.yaml", tmp_path, "--assume_gpu_memory_gb", "80")
    assert plan["plan"]["student"]["precision"] == "4bit (compute bfloat16)"
    teacher = plan["plan"]["teacher"]
    assert teacher["kind"] == "external" and teacher["model"]["name"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert teacher["model"]["precision"] == "4bit (compute bfloat16)"
    assert teacher["model"]["parameters"] == 56_000_000_000  # "8x7B" from the name: an upper bound
    assert plan["plan"]["memory"]["decision"] == "as configured" and "fits" in plan["plan"]["memory"]["reason"]


def test_tight_memory_switches_to_4bit_lora_and_the_adapter_disabled_teacher(tmp_path, no_weights_no_network):
    config = REPO / "harness/recipes/configs/opsd_qwen3_1p7b.yaml"
    plan = dry_run(config, tmp_path, "--use_peft", "false", "--assume_gpu_memory_gb", "8")["plan"]
    assert plan["memory"]["decision"] == "4-bit + LoRA"
    assert plan["student"]["precision"].startswith("4bit") and plan["student"]["peft"].startswith("LoRA")
    assert "adapters disabled" in plan["teacher"]["what"]
    roomy = dry_run(config, tmp_path, "--use_peft", "false", "--assume_gpu_memory_gb", "80")["plan"]
    assert roomy["memory"]["decision"] == "as configured"
    assert roomy["teacher"]["what"].endswith("frozen copy of the initial policy")
    kept = dry_run(config, tmp_path, "--use_peft", "false", "--assume_gpu_memory_gb", "8",
                   "--memory_policy", "as_configured")["plan"]
    assert kept["memory"]["decision"] == "as configured" and kept["memory"]["reason"].startswith("TIGHT")
    cpu = dry_run(REPO / "harness/recipes/configs/opsd_arith_cpu.yaml", tmp_path)["plan"]
    assert cpu["memory"]["reason"].startswith("no GPU") and cpu["student"]["precision"] == "float32"


def test_memory_estimate_follows_its_documented_arithmetic():
    full = memory.TrainingFootprint(10**9, memory.Precision("float32"), use_peft=False, teacher="none")
    assert full.estimate_gib() == pytest.approx(16e9 * 1.2 / 2**30 + 1.0)
    zero2 = memory.TrainingFootprint(10**9, memory.Precision("float32"), False, "none", num_processes=4, zero_stage=2)
    assert zero2.estimate_gib() == pytest.approx((4e9 + 12e9 / 4) * 1.2 / 2**30 + 1.0)
    copy = memory.TrainingFootprint(10**9, memory.Precision("bfloat16"), False, "copy")
    assert copy.estimate_gib() == pytest.approx((2e9 + 6e9 + 2e9) * 1.2 / 2**30 + 1.0)


@pytest.mark.parametrize("accelerate_config", sorted(ACCELERATE.glob("*.yaml")), ids=lambda c: c.stem)
def test_peft_self_distillation_plans_under_every_accelerate_config(accelerate_config, tmp_path, no_weights_no_network):
    plan = dry_run(REPO / "harness/recipes/configs/opsd_qwen3_1p7b.yaml", tmp_path, "--accelerate_config",
                   str(accelerate_config), "--assume_gpu_memory_gb", "80")["plan"]
    expected = launch_env.from_config_file(accelerate_config)
    assert plan["accelerate"]["distributed"] == expected.distributed
    assert plan["accelerate"]["num_processes"] == expected.num_processes


def test_fsdp_refuses_a_teacher_with_its_own_weights_and_fsdp1_altogether(tmp_path, no_weights_no_network):
    arith = REPO / "harness/recipes/configs/opsd_arith_cpu.yaml"
    with pytest.raises(common.RecipeError, match="use_peft: true"):
        dry_run(arith, tmp_path, "--accelerate_config", str(ACCELERATE / "fsdp.yaml"))
    fsdp1 = tmp_path / "fsdp1.yaml"
    values = yaml.safe_load((ACCELERATE / "fsdp.yaml").read_text())
    values["fsdp_config"]["fsdp_version"] = 1
    fsdp1.write_text(yaml.safe_dump(values))
    with pytest.raises(common.RecipeError, match="FSDP1"):
        dry_run(REPO / "harness/recipes/configs/opsd_qwen3_1p7b.yaml", tmp_path, "--accelerate_config", str(fsdp1))
    zero3_init = tmp_path / "zero3_init.yaml"
    values = yaml.safe_load((ACCELERATE / "deepspeed_zero3.yaml").read_text())
    values["deepspeed_config"]["zero3_init_flag"] = True
    zero3_init.write_text(yaml.safe_dump(values))
    with pytest.raises(common.RecipeError, match="zero3_init_flag"):
        dry_run(arith, tmp_path, "--accelerate_config", str(zero3_init))


def test_configuration_errors_name_the_key(tmp_path, no_weights_no_network):
    arith = REPO / "harness/recipes/configs/opsd_arith_cpu.yaml"
    with pytest.raises(common.RecipeError, match="recipes/opd.py"):
        dry_run(arith, tmp_path, "--teacher_model_name_or_path", "arithmetic:warm")
    with pytest.raises(common.RecipeError, match="OPD needs a teacher"):
        dry_run(REPO / "harness/recipes/configs/opd_arith_cpu.yaml", tmp_path, "--teacher_model_name_or_path", "")
    with pytest.raises(common.RecipeError, match="divergence='full'"):
        dry_run(REPO / "harness/recipes/configs/opd_arith_cpu.yaml", tmp_path, "--teacher_model_name_or_path", "",
                "--teacher_api_base", "http://127.0.0.1:9/v1", "--teacher_api_model", "m")
    with pytest.raises(common.RecipeError, match="memory_policy"):
        dry_run(arith, tmp_path, "--memory_policy", "sometimes")
    with pytest.raises(common.RecipeError, match="self_teacher='ema'"):
        dry_run(arith, tmp_path, "--use_peft", "true", "--self_teacher", "ema")


def test_api_teacher_is_planned_without_contacting_the_server(tmp_path, no_weights_no_network):
    plan = dry_run(REPO / "harness/recipes/configs/opd_arith_cpu.yaml", tmp_path, "--teacher_model_name_or_path", "",
                   "--teacher_api_base", "http://127.0.0.1:9/v1", "--teacher_api_model", "served", "--divergence",
                   "topk", "--teacher_top_k", "5")["plan"]
    assert plan["teacher"]["kind"] == "api" and "http://127.0.0.1:9/v1" in plan["teacher"]["what"]
    assert "top-5 + a tail bucket" in plan["loss"]["divergence"]


def test_manifest_and_printed_plan_hold_no_secret(tmp_path, monkeypatch, capsys, no_weights_no_network):
    secret, token = "sk-fake-0123456789-SECRET", "hf_fakeTOKEN0123456789"
    monkeypatch.setenv("TRL_OPSD_TEST_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(sys, "argv", ["opd.py", "--hub_token", token, "--run_name", f"run-{secret}"])
    manifest = dry_run(REPO / "harness/recipes/configs/opd_arith_cpu.yaml", tmp_path, "--hub_token", token, "--run_name",
                       f"run-{secret}", "--teacher_api_key_env", "TRL_OPSD_TEST_API_KEY")
    text = json.dumps(manifest) + capsys.readouterr().out
    assert secret not in text and token not in text
    config = manifest["resolved_config"]
    assert "hub_token" not in config["OPSDConfig"] and "teacher_api_key_env" not in config["TeacherArguments"]
    assert config["OPSDConfig"]["run_name"] == "run-<redacted>"
    assert config["OPSDConfig"]["max_new_tokens"] == 40  # a count of tokens is not a secret
    assert manifest["runtime"]["argv"] == ["opd.py", "--run_name", "run-<redacted>"]


def test_secret_names_are_matched_by_word():
    from harness.recipes.manifest import is_secret_name, scrub

    assert all(map(is_secret_name, ["hub_token", "OPENAI_API_KEY", "apiKey", "SNOWFLAKE_PAT", "db-password"]))
    assert not any(map(is_secret_name, ["max_new_tokens", "tokenizer_name", "keep_last", "teacher_top_k"]))
    assert scrub({"a": {"token": "x", "b": ["abc-SECRETVALUE"]}}, ["SECRETVALUE"]) == {"a": {"b": ["abc-<redacted>"]}}


def test_dry_run_from_the_command_line_and_a_refusal_exit_code(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "harness/recipes/opsd.py"), "--config",
               str(REPO / "harness/recipes/configs/opsd_qwen3_1p7b.yaml"), "--dry_run", "--output_dir", str(tmp_path / "cli")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trl-opsd recipe plan: opsd (dry run" in done.stdout and "Qwen/Qwen3-1.7B" in done.stdout
    refusing = [*command[:3], str(REPO / "harness/recipes/configs/opsd_arith_cpu.yaml"), "--dry_run", "--accelerate_config",
                str(ACCELERATE / "fsdp.yaml"), "--output_dir", str(tmp_path / "r")]
    refused = subprocess.run(refusing, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "\nerror: FSDP with a teacher" in "\n" + refused.stderr



def test_the_installed_package_runs_a_recipe_by_config_name_from_any_folder(tmp_path):
    """`pip install .` (not editable) ships the recipes and their configs: `accelerate launch -m` dry run outside
    the checkout, the config named rather than given as a path."""
    wheels, site, run = tmp_path / "wheels", tmp_path / "site", tmp_path / "run"
    run.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True,
                   capture_output=True, timeout=600)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))],
                   check=True, capture_output=True, timeout=600)
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import harness.recipes; print(harness.recipes.__file__)"],
                           capture_output=True, text=True, env=env, cwd=run, check=True)
    assert where.stdout.startswith(str(site))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "harness.recipes.opsd",
               "--config", "opsd_arith_cpu", "--dry_run", "--output_dir", str(run / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=run, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trl-opsd recipe plan: opsd (dry run" in done.stdout
    manifest = json.loads((run / "out" / common.DRY_RUN_MANIFEST_NAME).read_text())
    assert manifest["plan"]["student"]["name"] == "arithmetic:warm" and manifest["status"] == "dry_run"


# -- data sources and model names ----------------------------------------------------------------------
def test_local_data_sources_and_foreign_formats(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = data_sources.resolve_source(str(jsonl), "train")
    assert source.kind == "jsonl" and data_sources.load_rows(source)[0]["answer"] == "2"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "validation.jsonl").write_text(jsonl.read_text())
    assert data_sources.resolve_source(str(tmp_path / "folder"), "validation").kind == "jsonl_folder"
    with pytest.raises(data_sources.DataSourceError, match="train.jsonl"):
        data_sources.resolve_source(str(tmp_path / "folder"), "train")
    with pytest.raises(data_sources.DataSourceError, match="does not exist"):
        data_sources.resolve_source("./missing.jsonl", "train")

    from datasets import Dataset

    gsm8k = Dataset.from_list([{"question": "Q?", "answer": "2 * 3 = <<2*3=6>>6\n#### 1,006"}])
    converted = data_sources.to_contract(gsm8k, "auto", with_solution=True)[0]
    assert converted["answer"] == "1006" and converted["messages"][-1]["role"] == "assistant"
    assert len(data_sources.to_contract(gsm8k, "gsm8k", with_solution=False)[0]["messages"]) == 1
    paper = Dataset.from_list([{"problem": "P", "solution": "S"}])
    assert data_sources.to_contract(paper, "auto", False)[0]["privileged_context"] == "S"
    with pytest.raises(data_sources.DataSourceError, match="row 0: field 'answer'"):
        data_sources.to_contract(Dataset.from_list([{"question": "Q", "answer": "no final line"}]), "auto", False)


def test_arithmetic_rows_and_their_fingerprint_are_deterministic():
    source = data_sources.resolve_source("arithmetic", "train")
    def fingerprint(seed):
        return data_sources.fingerprint(data_sources.load_rows(source, num_rows=20, seed=seed))

    assert fingerprint(3) == fingerprint(3) != fingerprint(4)


def test_model_names_resolve_without_loading(tmp_path, tiny_tokenizer):
    from harness.world.tiny import build_tiny_model

    spec = models.resolve("arithmetic:warm?max_steps=3000&target_no_hint_accuracy=0.6")
    assert spec.world_settings.max_steps == 3000 and spec.world_settings.target_no_hint_accuracy == 0.6
    with pytest.raises(models.ModelSpecError, match="not a WarmStartSettings field"):
        models.resolve("arithmetic:warm?stepz=1")
    with pytest.raises(models.ModelSpecError, match="without a config.json"):
        models.resolve(str(tmp_path))
    model = build_tiny_model(tiny_tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    count, how = models.count_parameters(models.resolve(str(tmp_path / "tiny")))
    assert count == sum(p.numel() for p in model.parameters()) and how.startswith("config.json")
    assert models.count_parameters(models.resolve("org/Some-1.7B-Instruct"))[0] == 1_700_000_000


@pytest.mark.parametrize("preset, alpha, lam, teacher, sampler", [
    ("sft_rs", 0.0, 1.0, "external", "teacher"),
    ("rl_outcome", 1.0, 0.0, "none", "student"),
    ("opd", 1.0, 1.0, "external", "student"),
    ("opsd", 1.0, 1.0, "self", "student"),
    ("kd", 0.0, 1.0, "external", "dataset"),
])
def test_unified_recipe_plans_each_row_of_the_seed_table(preset, alpha, lam, teacher, sampler, tmp_path,
                                                         no_weights_no_network):
    extra = ["--teacher_model_name_or_path", "arithmetic:warm?seed=1"] if teacher == "external" else []
    plan = dry_run(REPO / "harness/recipes/configs/unified_opsd_arith_cpu.yaml", tmp_path, "--preset", preset, *extra)["plan"]
    loss = plan["loss"]
    assert (loss["preset"], loss["alpha_reward_weight"], loss["lambda_distillation_weight"], loss["sampler"]) == (
        preset, alpha, lam, sampler)
    assert plan["teacher"]["kind"] == teacher
    assert loss["clip"] == "none"  # the opsd preset leaves the clip off (measured; trl_opsd/unified.py)
    assert loss["on_policy_fraction_lmbda"] == (1.0 if sampler == "student" else 0.0)
    if preset == "opsd":
        assert "'answer'" in plan["teacher"]["privileged_context"]
    if teacher == "external":
        assert plan["teacher"]["privileged_context"].startswith("only rows'")  # the external teacher gets no hint


# -- real runs, one step each, on an untrained tiny checkpoint ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """(student, teacher): two tiny Llamas with the same tokenizer, saved like any local checkpoint."""
    from harness.world.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"tiny{seed}")
        build_tiny_model(tokenizer, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


@pytest.mark.parametrize("config, extra", [
    ("opsd_arith_cpu", []),
    ("opd_arith_cpu", ["--teacher_model_name_or_path", "{teacher}"]),
    ("sft_arith_cpu", []),
    ("unified_opsd_arith_cpu", []),
])
def test_each_recipe_trains_and_records_its_run(config, extra, tiny_checkpoints, tmp_path):
    student, teacher = tiny_checkpoints
    out = tmp_path / "run"
    argv = ["--config", str(REPO / "harness/recipes/configs" / f"{config}.yaml"), "--model_name_or_path", student,
            "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_train_rows", "8", "--output_dir", str(out),
            *(arg.format(teacher=teacher) for arg in extra)]
    if not config.startswith("sft"):
        argv += ["--max_new_tokens", "8"]
    assert recipe_of(Path(config)).main(argv) == 0
    manifest = json.loads((out / common.MANIFEST_NAME).read_text())
    assert manifest["status"] == "completed" and manifest["train"]["global_step"] == 1
    assert manifest["dataset"]["num_rows"] == 8 and len(manifest["dataset"]["fingerprint_sha256"]) == 64
    assert (out / "model.safetensors").exists()


def test_rs_sft_recipe_plans_then_writes_data_and_its_fingerprint(tiny_checkpoints, tmp_path, capsys):
    from harness.recipes import rs_sft

    args = ["--model", tiny_checkpoints[0], "--num-prompts", "4", "--samples", "2", "--filter", "verifier",
            "--judge", "none", "--max-new-tokens", "8"]
    assert rs_sft.main(["--out", str(tmp_path / "plan"), *args, "--dry_run"]) == 0
    plan = json.loads((tmp_path / "plan" / common.DRY_RUN_MANIFEST_NAME).read_text())["plan"]
    assert plan["sampler"]["model"]["path"] == tiny_checkpoints[0] and plan["prompts"]["num_prompts"] == 4
    assert not (tmp_path / "plan" / "sft.jsonl").exists()  # a dry run samples nothing

    assert rs_sft.main(["--out", str(tmp_path / "data"), *args]) == 0
    manifest = json.loads((tmp_path / "data" / common.MANIFEST_NAME).read_text())
    assert manifest["status"] == "completed"
    written = (tmp_path / "data" / "sft.jsonl").read_bytes()
    assert manifest["outputs_sha256"]["sft.jsonl"] == hashlib.sha256(written).hexdigest()
    with pytest.raises(common.RecipeError, match="--sampler teacher needs --teacher-model"):
        rs_sft.main(["--out", str(tmp_path / "x"), "--sampler", "teacher", "--dry_run"])
