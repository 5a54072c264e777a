"""Supervised fine-tuning on the project's rows: gold solutions, or the dataset RS-SFT wrote.

TRL's ``SFTTrainer`` with the recipes' shared machinery (data sources, plan, VRAM decision, manifest).
Rows are trained on their trailing assistant turn (``messages``) or ``completion``.

    python recipes/sft.py --config recipes/configs/sft_arith_cpu.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/sft.py \
        --model_name_or_path Qwen/Qwen3-1.7B --dataset_name runs/rs_sft/train.jsonl --output_dir runs/sft
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config  # noqa: E402

from recipes import common, memory, models, student  # noqa: E402
from recipes.common import RecipeArguments, RecipeError  # noqa: E402


def resolve(script_args: RecipeArguments, training_args: SFTConfig, model_args: ModelConfig,
            launch: common.Launch) -> tuple[dict, models.ModelSpec, common.Data]:
    """(plan, student spec, data), with the VRAM decision applied to ``model_args``; loads no weights."""
    setup = common.described_setup(script_args, launch)
    try:
        spec = models.resolve(model_args.model_name_or_path)
    except models.ModelSpecError as error:
        raise RecipeError(str(error)) from None
    parameters, parameters_source = models.count_parameters(spec, training_args.trust_remote_code)

    def footprint(load_in_4bit: bool, use_peft: bool) -> memory.TrainingFootprint | None:
        if parameters is None:
            return None
        precision = student.precision_of(model_args.dtype, load_in_4bit, model_args.load_in_8bit and not load_in_4bit)
        return memory.TrainingFootprint(parameters, precision, use_peft, teacher="none",
                                        num_processes=setup.num_processes, zero_stage=setup.zero_stage,
                                        fsdp=setup.distributed == "fsdp")

    device, device_gib = common.device_memory(script_args, training_args)
    already_quantized = model_args.load_in_4bit and model_args.use_peft
    decision = memory.decide(footprint(model_args.load_in_4bit, model_args.use_peft),
                             None if already_quantized else footprint(True, True), device, device_gib,
                             script_args.memory_policy)
    if decision.switch_to_4bit_lora:
        model_args.load_in_4bit, model_args.load_in_8bit, model_args.use_peft = True, False, True
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
    return plan, spec, data


def main(argv: list[str] | None = None) -> int:
    launch = common.detect_launch()
    parsed = common.parse(TrlParser((RecipeArguments, SFTConfig, ModelConfig)), argv, launch)
    script_args, training_args, model_args = parsed
    plan, spec, data = resolve(script_args, training_args, model_args, launch)
    common.print_plan("sft", plan, script_args.dry_run)
    if script_args.dry_run:
        return common.dry_run("sft", plan, parsed, data, training_args.output_dir)

    if data.train is None:
        data = common.resolve_data(script_args, with_solution=True, load_remote=True)
    model, tokenizer = student.load(spec, training_args, model_args)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data.train, processing_class=tokenizer,
                         peft_config=get_peft_config(model_args))
    return common.train_and_record("sft", trainer, plan, parsed, data, launch, script_args.rank_fingerprint)


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
