"""Supervised fine-tuning on the project's rows: gold solutions, or the dataset RS-SFT wrote.

TRL's ``SFTTrainer`` with the recipes' shared machinery (data sources, plan, VRAM decision, manifest).
Rows are trained on their trailing assistant turn (``messages``) or ``completion``.

    trl-opsd sft --config sft_arith_cpu
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m harness.recipes.sft \\
        --model_name_or_path Qwen/Qwen3-1.7B --dataset_name runs/rs_sft/sft.jsonl --output_dir runs/sft
"""

import sys
from dataclasses import dataclass

from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from harness.recipes import common, memory, models, student
from harness.recipes.common import RecipeArguments, RecipeError


@dataclass
class Plan:
    """What the run will do (``plan``, printed and recorded), and the arguments it runs with."""

    plan: dict
    student: models.ModelSpec
    data: common.Data
    model_args: ModelConfig  # with the VRAM decision applied
    parsed: tuple  # the parsed dataclasses, ``model_args`` among them


def make_plan(script_args: RecipeArguments, training_args: SFTConfig, model_args: ModelConfig,
              launch: common.Launch) -> Plan:
    """The plan, with the VRAM decision made; loads no weights."""
    setup = common.described_setup(script_args, launch)
    try:
        spec = models.resolve(model_args.model_name_or_path)
    except models.ModelSpecError as error:
        raise RecipeError(str(error)) from None
    parameters, parameters_source = models.count_parameters(spec, training_args.trust_remote_code)

    def footprint(args: ModelConfig, switched: bool) -> memory.TrainingFootprint | None:
        if parameters is None:
            return None
        return memory.TrainingFootprint(parameters, student.precision_of(args.dtype, args.load_in_4bit,
                                                                         args.load_in_8bit),
                                        args.use_peft, teacher="none", num_processes=setup.num_processes,
                                        zero_stage=setup.zero_stage, fsdp=setup.distributed == "fsdp")

    device, device_gib = common.device_memory(script_args, training_args)
    decision, model_args = memory.plan(model_args, footprint, device, device_gib, script_args.memory_policy,
                                       can_switch=not (model_args.load_in_4bit and model_args.use_peft))
    data = common.resolve_data(script_args, with_solution=True, load_remote=not script_args.dry_run)
    plan = {
        "recipe": "sft",
        "student": student.describe(spec, parameters, parameters_source, model_args),
        "data": data.describe(script_args),
        "loss": {"objective": "cross-entropy on the completion" + (" (assistant tokens only)"
                                                                   if training_args.assistant_only_loss else ""),
                 "max_length": training_args.max_length},
        "optimization": common.describe_optimization(training_args),
        "accelerate": common.describe_launch(setup, launch, training_args),
        "memory": decision.describe(),
        "output_dir": training_args.output_dir,
        "warnings": common.precision_warnings(training_args, device),
    }
    return Plan(plan, spec, data, model_args, (script_args, training_args, model_args))


def main(argv: list[str] | None = None) -> int:
    launch = common.detect_launch()
    script_args, training_args, model_args = common.parse(TrlParser((RecipeArguments, SFTConfig, ModelConfig)),
                                                          argv, launch)
    run = make_plan(script_args, training_args, model_args, launch)
    common.print_plan("sft", run.plan, script_args.dry_run)
    if script_args.dry_run:
        return common.dry_run("sft", run.plan, run.parsed, run.data, training_args.output_dir)

    data = common.loaded(run.data, script_args, with_solution=True)
    model, tokenizer = student.load(run.student, training_args, run.model_args)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data.train, processing_class=tokenizer,
                         peft_config=get_peft_config(run.model_args))
    return common.train_and_record("sft", trainer, run.plan, run.parsed, data, launch, script_args.rank_fingerprint)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
