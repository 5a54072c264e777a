"""accelerate_configs/: each file goes through accelerate's own launch path and the plugin it configures.

The environment ``accelerate launch`` would hand the script is built with accelerate's launcher functions
(``_validate_launch_command`` + ``prepare_deepspeed_cmd_env`` / ``prepare_multi_gpu_env``), then the
DeepSpeed / FSDP plugin is constructed from it exactly as in the launched process, and DeepSpeed's own
``DeepSpeedConfig`` checks the resulting config (with the "auto" batch fields filled as the trainer would).
"""

import copy
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

REPO = Path(__file__).resolve().parents[1]

from harness.recipes import launch_env

CONFIGS = REPO / "accelerate_configs"
EXPECTED = {  # file -> (distributed type, processes, mixed_precision in the file)
    "cpu_ddp": (DistributedType.MULTI_GPU, 2, "no"),
    "cpu_single": (DistributedType.NO, 1, "no"),
    "single_gpu": (DistributedType.NO, 1, "bf16"),
    "multi_gpu": (DistributedType.MULTI_GPU, 8, "bf16"),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 8, "bf16"),
    "deepspeed_zero3": (DistributedType.DEEPSPEED, 8, "bf16"),
    "deepspeed_zero2_cpu": (DistributedType.DEEPSPEED, 2, None),  # no mixed_precision key at all (see the file)
    "fsdp": (DistributedType.FSDP, 8, "bf16"),
}


def launched_environment(name: str, monkeypatch) -> tuple:
    """(launch args, the environment `accelerate launch --config_file <name>.yaml` gives the script)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before calling the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:  # launch_command's last branch: the simple launcher (one process, no torchrun)
        _, env = prepare_simple_launcher_cmd_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return args, env


def test_the_config_files_are_exactly_the_documented_ones():
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_loads_with_the_expected_setup(name):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    kind, processes, precision = EXPECTED[name]
    mixed_precision = None if config.mixed_precision is None else str(config.mixed_precision)
    assert (config.distributed_type, config.num_processes, mixed_precision) == (kind, processes, precision)
    setup = launch_env.from_config_file(CONFIGS / f"{name}.yaml")
    assert setup.num_processes == processes and setup.mixed_precision == (precision or "no")


def test_cpu_ddp_starts_two_processes_through_torchrun_and_stays_on_cpu(monkeypatch):
    """MULTI_CPU (or --cpu) would take accelerate's simple launcher: one process. MULTI_GPU + use_cpu takes torchrun."""
    args, _ = launched_environment("cpu_ddp", monkeypatch)
    assert args.multi_gpu and not args.cpu and args.use_cpu
    assert int(args.nproc_per_node) == 2
    assert launch_env.required_overrides(launch_env.from_environment(), has_accelerator=False) == {"use_cpu": True}


def test_cpu_single_takes_the_simple_launcher_and_is_labelled_as_launched(monkeypatch):
    """One `accelerate launch` process on CPU: no torchrun, no LOCAL_RANK, yet the plan must not call it
    "not launched by accelerate" (the simple launcher's own variables say it was)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert launch_env.from_environment().source == "single process (not launched by accelerate)"
    args, env = launched_environment("cpu_single", monkeypatch)
    assert not args.multi_gpu and args.use_cpu and "LOCAL_RANK" not in env and env["ACCELERATE_USE_CPU"] == "True"
    setup = launch_env.from_environment()
    assert (setup.source, setup.distributed, setup.num_processes) == ("accelerate launch environment", "none", 1)
    assert setup.cpu_requested and setup.mixed_precision == "no"
    assert launch_env.required_overrides(setup, has_accelerator=False) == {"use_cpu": True}


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero2_cpu"])
def test_deepspeed_configs_pass_the_plugin_and_deepspeeds_own_check(name, monkeypatch):
    _, env = launched_environment(name, monkeypatch)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    config = copy.deepcopy(plugin.deepspeed_config)
    stage = 3 if name.endswith("zero3") else 2
    assert config["zero_optimization"]["stage"] == stage
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert config["bf16"]["enabled"] is (not name.endswith("_cpu")) and config["fp16"]["enabled"] is False
    assert plugin.zero3_init_flag is False  # the frozen self-teacher is a deep copy: see deepspeed_zero3.yaml
    setup = launch_env.from_environment()
    assert (setup.distributed, setup.zero_stage, setup.zero3_init) == ("deepspeed", stage, False)

    deepspeed_config = pytest.importorskip("deepspeed.runtime.config", reason="deepspeed is not installed "
                                           "(pip install 'trl-opsd[deepspeed]')")
    config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=8)  # the "auto"s
    checked = deepspeed_config.DeepSpeedConfig(config)
    assert checked.zero_optimization_stage == stage and checked.gradient_clipping == 1.0
    assert checked.train_batch_size == 8


def test_deepspeed_without_a_gpu_gets_gloo_and_keeps_use_cpu_off(monkeypatch):
    launched_environment("deepspeed_zero2_cpu", monkeypatch)
    assert launch_env.required_overrides(launch_env.from_environment(), has_accelerator=False) == {
        "use_cpu": False, "ddp_backend": "gloo"}
    assert launch_env.required_overrides(launch_env.from_environment(), has_accelerator=True) == {}


def test_fsdp_config_builds_an_fsdp2_plugin_and_is_refused_without_gpus(monkeypatch):
    launched_environment("fsdp", monkeypatch)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    setup = launch_env.from_environment()
    assert (setup.distributed, setup.fsdp_version) == ("fsdp", 2)
    with pytest.raises(launch_env.LaunchError, match="FSDP needs GPUs"):
        launch_env.required_overrides(setup, has_accelerator=False)
