"""``trl-opsd geometry``: where OPD and OPSD put their distillation signal, on the arithmetic world.

The warm-started student samples one completion per held-out prompt. The same tokens are scored by
two teachers, each under the view it sees in training:

- OPSD: the student itself (frozen) with the gold answer in its prompt (the privileged self-teacher);
- OPD: a stronger, separate teacher with the student's own prompt (no hint). By default it is the
  warm start fine-tuned further on gold solutions (``--teacher-steps`` SFT steps, cached next to the
  warm start); ``--teacher PATH`` uses any checkpoint with the same tokenizer instead.

It writes ``geometry.png`` (``harness.plots.plot_geometry``) and ``geometry.json`` (max/mean ratio,
top-5% share, share on the last equation's result, histogram, top tokens, for each method).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
    """The cheap stronger teacher: the warm start plus supervised steps on gold solutions (no hints)."""

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 1e-3
    num_eval_problems: int = 500
    version: str = "1"

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def stronger_teacher(warm_path: str, settings: TeacherSettings, seed: int = 0) -> tuple[str, float]:
    """(checkpoint path, held-out no-hint accuracy) of the cached stronger teacher, trained on first use."""
    out_dir = Path(warm_path) / f"opd_teacher_{settings.cache_key()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result_file = out_dir / "teacher.json"
        if not result_file.exists():
            accuracy = _train_teacher(warm_path, settings, seed, out_dir)
            result_file.write_text(json.dumps({"no_hint_accuracy": accuracy, **dataclasses.asdict(settings)}))
        return str(out_dir), json.loads(result_file.read_text())["no_hint_accuracy"]


def _train_teacher(warm_path: str, settings: TeacherSettings, seed: int, out_dir: Path) -> float:
    from harness.world.arithmetic import generate_problems
    from harness.world.arms import no_hint_correctness, train_sft

    train_sft(warm_path, out_dir, settings.steps, seed, batch_size=settings.batch_size,
              learning_rate=settings.learning_rate)
    correct = no_hint_correctness(str(out_dir), generate_problems(settings.num_eval_problems, "test", seed=seed))
    return sum(correct) / len(correct)


def opd_and_opsd_geometry(student_path: str, teacher_path: str, problems, beta: float, max_new_tokens: int,
                          sample_seed: int) -> tuple[dict, dict]:
    """Geometry statistics (with raw values) of OPD and OPSD on the student's samples for ``problems``."""
    import torch

    from harness.world.arithmetic import problems_to_rows
    from harness.world.warm_start import load
    from trl_opsd.collator import OPSDCollator
    from trl_opsd.geometry import geometry_statistics
    from trl_opsd.losses import per_token_divergence
    from trl_opsd.teachers.local import check_same_tokenizer, completion_logits

    student, tokenizer = load(student_path)
    teacher, teacher_tokenizer = load(teacher_path)
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    student.eval()
    batch = OPSDCollator(tokenizer, max_prompt_length=None, max_teacher_prompt_length=None)(problems_to_rows(problems))
    completions, completion_mask = _sample(student, tokenizer, batch, max_new_tokens, sample_seed)
    width = completions.shape[1]

    def logits(model, prompts, prompt_mask):
        ids, mask = torch.cat([prompts, completions], 1), torch.cat([prompt_mask, completion_mask], 1)
        with torch.no_grad():
            return completion_logits(model, ids, mask, width)

    student_logits = logits(student, batch["prompts"], batch["prompt_attention_mask"])
    views = {
        "opd": logits(teacher, batch["prompts"], batch["prompt_attention_mask"]),
        "opsd": logits(student, batch["teacher_prompts"], batch["teacher_prompt_attention_mask"]),
    }
    return tuple(
        geometry_statistics(per_token_divergence(student_logits, views[name], beta), completion_mask, completions,
                            tokenizer, keep_values=True)
        for name in ("opd", "opsd")
    )


def _sample(model, tokenizer, batch, max_new_tokens: int, seed: int):
    """Student samples at temperature 1 and their mask (up to and including the first EOS)."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = model.generate(
            input_ids=batch["prompts"], attention_mask=batch["prompt_attention_mask"], do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    completions = sequences[:, batch["prompts"].shape[1]:]
    is_eos = completions == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return completions, (~after_eos).long()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the warm start")
    parser.add_argument("--cache-dir", default=None,
                        help="checkpoint cache (default: $TRL_OPSD_CACHE or ~/.cache/trl_opsd)")
    parser.add_argument("--teacher", default=None,
                        help="OPD teacher checkpoint (default: the warm start after more SFT, cached)")
    parser.add_argument("--teacher-steps", type=int, default=TeacherSettings.steps,
                        help="SFT steps of the default OPD teacher")
    parser.add_argument("--num-prompts", type=int, default=256, help="held-out (validation) prompts to sample")
    parser.add_argument("--beta", type=float, default=1.0, help="divergence: 1 reverse KL, 0 forward KL (GKD's beta)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--out", default="runs/geometry", help="output folder for geometry.png and geometry.json")


def run(args: argparse.Namespace) -> int:
    from harness.plots import plot_geometry
    from harness.world.arithmetic import generate_problems
    from harness.world.warm_start import WarmStartSettings, warm_start

    warm = warm_start(WarmStartSettings(seed=args.seed), cache_dir=args.cache_dir)
    if args.teacher:
        teacher_path, teacher_accuracy = args.teacher, None
    else:
        settings = TeacherSettings(steps=args.teacher_steps)
        teacher_path, teacher_accuracy = stronger_teacher(warm.path, settings, args.seed)
    problems = generate_problems(args.num_prompts, "validation", seed=args.seed)
    opd, opsd = opd_and_opsd_geometry(warm.path, teacher_path, problems, args.beta, args.max_new_tokens,
                                      args.sample_seed)
    out = Path(args.out)
    png = plot_geometry(opd, opsd, out / "geometry.png")
    summary = {
        "student": {"path": warm.path, "no_hint_accuracy": warm.no_hint_accuracy, "hint_accuracy": warm.hint_accuracy},
        "opd_teacher": {"path": teacher_path, "no_hint_accuracy": teacher_accuracy},
        "num_prompts": args.num_prompts, "beta": args.beta, "sample_seed": args.sample_seed,
        "opd": {k: v for k, v in opd.items() if k != "values"},
        "opsd": {k: v for k, v in opsd.items() if k != "values"},
    }
    (out / "geometry.json").write_text(json.dumps(summary, indent=2))
    for name, stats in (("OPD ", opd), ("OPSD", opsd)):
        print(f"{name}: max/mean {stats['kl_max_over_mean']:6.1f}  top-5% share {stats['kl_top5pct_share']:.1%}  "
              f"last equation's result {stats['share_last_equation_result']:.1%}  "
              f"final answer {stats['share_final_answer']:.1%}  ({stats['num_tokens']} tokens)")
    print(f"wrote {png} and {out / 'geometry.json'}")
    return 0

