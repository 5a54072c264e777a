"""``trl-opsd doctor``: the seed notebook's section-0 preflight as a command.

It reports the torch build and the device and dtype runs will use, the GPUs and their memory,
bitsandbytes (import, a real 4-bit layer on the device, and transformers' ``is_bitsandbytes_available()``
verdict, whose ``lru_cache`` goes stale when bitsandbytes is installed into a running process),
DeepSpeed and vLLM, and, given ``--student`` and ``--teacher``, whether their tokenizers map text to the
same ids (per-token divergences are undefined otherwise). Given ``--student`` alone (OPSD: the student is its
own teacher) it checks what a self-teacher run needs of the student's tokenizer instead: a chat template
that renders a conversation with a generation prompt, the pad token, and the teacher's view (the prompt
with the privileged context the self-teacher is given, through the same templates as ``OPSDConfig``).

Every problem names its cause and its fix. By default only what every run needs can fail, so a
CPU-only laptop passes; ``--require-gpu``, ``--require-4bit``, ``--require-deepspeed``, ``--require-vllm``
and ``--min-vram-gb`` turn the corresponding warnings into failures. The exit code is 1 when anything
failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from importlib import metadata

from trl_opsd.prompts import DEFAULT_ANSWER_CONTEXT_TEMPLATE, DEFAULT_TEACHER_PROMPT_TEMPLATE

SEED_MIN_BITSANDBYTES = "0.43.1"  # the seed notebook's pin (section 0)
GIB = 1024**3


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    cause: str | None = None
    fix: str | None = None


def _problem(name: str, required: bool, detail: str, cause: str, fix: str) -> Check:
    return Check(name, "fail" if required else "warn", detail, cause, fix)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


# -- checks -------------------------------------------------------------------------------------------
def check_torch() -> Check:
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    if torch.cuda.is_available():
        device = "cuda:0"
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        device, dtype = "cpu", "float32 (set bf16: false in CPU configs)"
    return Check("torch", "ok", f"torch {torch.__version__}, {build}; runs use device {device}, dtype {dtype}")


def check_gpu(require_gpu: bool, min_vram_gb: float | None) -> Check:
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            cause = "this torch is a CPU-only build (torch.version.cuda is None)"
            fix = ("install a CUDA build of torch, e.g. pip install torch --index-url "
                   "https://download.pytorch.org/whl/cu126")
        else:
            cause = (f"torch is a CUDA {torch.version.cuda} build but sees no device (CUDA_VISIBLE_DEVICES="
                     f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
            fix = "check the driver with nvidia-smi, the container's GPU access, and CUDA_VISIBLE_DEVICES"
        return _problem("gpu", require_gpu or min_vram_gb is not None, "no GPU visible: CPU runs only", cause, fix)
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append((properties.total_memory / GIB, f"cuda:{index} {properties.name} "
                     f"{properties.total_memory / GIB:.1f} GiB (sm_{properties.major}{properties.minor})"))
    detail = "; ".join(text for _, text in gpus)
    largest = max(memory for memory, _ in gpus)
    if min_vram_gb is not None and largest < min_vram_gb:
        return _problem("gpu", True, detail,
                        f"the largest GPU has {largest:.1f} GiB, below --min-vram-gb {min_vram_gb}",
                        "use a bigger GPU, or let the recipes fall back to 4-bit + LoRA (memory_policy: auto)")
    return Check("gpu", "ok", detail)


def check_bitsandbytes(require_4bit: bool) -> Check:
    """Import bitsandbytes and run one real 4-bit layer on the device runs will use."""
    fix = f"pip install -U 'bitsandbytes>={SEED_MIN_BITSANDBYTES}' (the project pins >=0.45), then restart Python"
    try:
        import bitsandbytes as bnb
    except Exception as error:  # a broken wheel raises anything from ImportError to OSError / RuntimeError
        return _problem("bitsandbytes", require_4bit, "import failed", f"{type(error).__name__}: {error}", fix)
    from packaging.version import Version

    if Version(bnb.__version__) < Version(SEED_MIN_BITSANDBYTES):
        return _problem("bitsandbytes", require_4bit, f"bitsandbytes {bnb.__version__}",
                        f"older than {SEED_MIN_BITSANDBYTES}, which current transformers needs for 4-bit", fix)
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        output = layer(torch.ones(2, 64, device=device))
        if not torch.isfinite(output).all():
            raise RuntimeError("the 4-bit layer returned non-finite values")
    except Exception as error:
        return _problem("bitsandbytes", require_4bit, f"bitsandbytes {bnb.__version__} imports",
                        f"its 4-bit kernels failed on {device}: {type(error).__name__}: {error}",
                        "reinstall a bitsandbytes wheel built for this torch / CUDA (" + fix + ")")
    return Check("bitsandbytes", "ok", f"bitsandbytes {bnb.__version__}: a 4-bit NF4 layer runs on {device}")


def check_transformers_verdict(require_4bit: bool) -> Check:
    """transformers' own answer, which decides whether ``BitsAndBytesConfig`` loads work."""
    from transformers.utils import import_utils

    verdict = import_utils.is_bitsandbytes_available()
    if verdict:
        return Check("transformers_bnb", "ok", "transformers.utils.is_bitsandbytes_available() is True")
    installed = _version("bitsandbytes")
    if installed and hasattr(import_utils.is_bitsandbytes_available, "cache_clear"):
        import_utils.is_bitsandbytes_available.cache_clear()
        if import_utils.is_bitsandbytes_available():
            return _problem("transformers_bnb", require_4bit,
                            "is_bitsandbytes_available() was False, True after clearing its cache",
                            "stale lru_cache: transformers checked before bitsandbytes was installed",
                            "restart the Python process (or notebook kernel) so transformers re-imports bitsandbytes")
    if not installed:
        return _problem("transformers_bnb", require_4bit, "is_bitsandbytes_available() is False",
                        "bitsandbytes is not installed", "pip install 'trl-opsd[quant]'")
    minimum = getattr(import_utils, "BITSANDBYTES_MIN_VERSION", "?")
    return _problem("transformers_bnb", require_4bit, "is_bitsandbytes_available() is False",
                    f"bitsandbytes {installed} is below transformers' minimum {minimum}",
                    f"pip install -U 'bitsandbytes>={minimum}', then restart Python")


def check_deepspeed(require: bool) -> Check:
    fix = "pip install 'trl-opsd[deepspeed]' (deepspeed from PyPI; CPU runs use its CPU accelerator and gloo)"
    if importlib.util.find_spec("deepspeed") is None:
        return _problem("deepspeed", require, "not installed", "the deepspeed package is absent", fix)
    import contextlib
    import sys

    try:
        # DeepSpeed logs to the stdout it finds at import ("Setting accelerator to CPU"): to stderr, so that
        # `doctor --json` prints JSON alone
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
        detail = (f"deepspeed {deepspeed.__version__}, accelerator {accelerator.device_name()}, "
                  f"communication backend {accelerator.communication_backend_name()}")
    except Exception as error:
        return _problem("deepspeed", require, "installed but does not import", f"{type(error).__name__}: {error}", fix)
    return Check("deepspeed", "ok", detail)


def check_vllm(require: bool) -> Check:
    """Presence only: importing vLLM initialises CUDA, which a preflight should not do."""
    version = _version("vllm") if importlib.util.find_spec("vllm") is not None else None
    if version is None:
        return _problem("vllm", require, "not installed", "the vllm package is absent",
                        "pip install vllm on a GPU machine; serve a teacher with `vllm serve <model>` and point "
                        "trl-opsd opd (harness/recipes/opd.py) at it with teacher_api_base")
    return Check("vllm", "ok", f"vllm {version} installed")


def check_tokenizer_match(student: str | None, teacher: str | None) -> Check | None:
    if student is None and teacher is None:
        return None
    if student is None:
        return Check("tokenizers", "fail", "--teacher without --student", "the match needs the student too",
                     "pass --student (alone it checks a self-teacher run)")
    if teacher is None:
        return None  # a self-teacher run: check_self_teacher
    from transformers import AutoTokenizer

    from trl_opsd.teachers.local import check_same_tokenizer

    loaded = {}
    for role, name in (("student", student), ("teacher", teacher)):
        try:
            loaded[role] = AutoTokenizer.from_pretrained(name)
        except Exception as error:
            return Check("tokenizers", "fail", f"cannot load the {role} tokenizer {name!r}",
                         f"{type(error).__name__}: {error}",
                         "check the path; offline (HF_HUB_OFFLINE=1) only local folders and cached hub models load")
    try:
        check_same_tokenizer(loaded["student"], loaded["teacher"])
    except ValueError as error:
        return Check("tokenizers", "fail", f"{student} vs {teacher}", str(error),
                     "use a teacher from the student's family (same token ids), or a server teacher with "
                     "divergence topk/sampled; dense per-token KL needs one vocabulary")
    size = len(loaded["student"])
    return Check("tokenizers", "ok", f"{student} and {teacher} map text to the same ids ({size} tokens)")


SAMPLE_CHAT = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
SAMPLE_ANSWER = "7"


def check_self_teacher(student: str, answer_context_template: str = DEFAULT_ANSWER_CONTEXT_TEMPLATE,
                       teacher_prompt_template: str = DEFAULT_TEACHER_PROMPT_TEMPLATE) -> list[Check]:
    """OPSD's self-teacher run: the student's chat template, pad token, and the teacher's privileged view."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(student)
    except Exception as error:
        return [Check("student_tokenizer", "fail", f"cannot load the student tokenizer {student!r}",
                      f"{type(error).__name__}: {error}",
                      "check the path; offline (HF_HUB_OFFLINE=1) only local folders and cached hub models load")]
    return [_chat_template_check(tokenizer), _pad_token_check(tokenizer),
            _privileged_view_check(tokenizer, answer_context_template, teacher_prompt_template)]


def _render(tokenizer, chat: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)


def _chat_template_check(tokenizer) -> Check:
    fix = ("use the instruct/chat variant of the model, or set tokenizer.chat_template (and save it with the "
           "tokenizer) before training; rows with 'messages' are rendered with it")
    if not tokenizer.chat_template:
        return Check("chat_template", "fail", "the student tokenizer has no chat template",
                     "chat rows ('messages') cannot be rendered: apply_chat_template raises", fix)
    try:
        prompt = _render(tokenizer, SAMPLE_CHAT, add_generation_prompt=True)
        bare = _render(tokenizer, SAMPLE_CHAT, add_generation_prompt=False)
        replied = _render(tokenizer, [*SAMPLE_CHAT, {"role": "assistant", "content": SAMPLE_ANSWER}], False)
    except Exception as error:
        return Check("chat_template", "fail", "the chat template does not render a user turn",
                     f"{type(error).__name__}: {error}", fix)
    if prompt == bare:
        return Check("chat_template", "warn", "add_generation_prompt=True adds nothing",
                     "rollouts start right after the user turn, without the template's assistant header",
                     "use a template that writes the assistant header under add_generation_prompt")
    if not replied.startswith(prompt):
        return Check("chat_template", "warn", "the generation prompt is not a prefix of the rendered reply",
                     "rows with a dataset completion (off-policy, SFT) are refused by the collator",
                     "use a template whose generation prompt equals the start of its assistant turn")
    header = prompt[len(bare):]
    return Check("chat_template", "ok", f"renders a user turn; add_generation_prompt appends {header!r}")


def _pad_token_check(tokenizer) -> Check:
    if tokenizer.pad_token is None:
        return Check("pad_token", "warn", "the student tokenizer has no pad token",
                     "OPSDCollator refuses a tokenizer without one",
                     "nothing to do with the recipes: they set pad_token = eos_token (TRL's convention); when you "
                     "build OPSDTrainer yourself, set tokenizer.pad_token first")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        return Check("pad_token", "ok", f"pad token = EOS {tokenizer.eos_token!r}: fine for OPSDTrainer, which ends "
                     "completion masks at the first EOS (kept) and masks prompts by attention mask, never by pad id")
    return Check("pad_token", "ok", f"pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), distinct from "
                 f"EOS {tokenizer.eos_token!r}")


def _privileged_view_check(tokenizer, answer_context_template: str, teacher_prompt_template: str) -> Check:
    from trl_opsd.prompts import check_templates, insert_privileged_context

    name = "self_teacher_view"
    try:
        check_templates(teacher_prompt_template, answer_context_template, "answer")
        context = answer_context_template.format(answer=SAMPLE_ANSWER)
        teacher_chat = insert_privileged_context(SAMPLE_CHAT, context, teacher_prompt_template)
        student_ids = tokenizer(_render(tokenizer, SAMPLE_CHAT, True), add_special_tokens=False)["input_ids"]
        teacher_text = _render(tokenizer, teacher_chat, True)
    except Exception as error:
        return Check(name, "fail", "the self-teacher's prompt cannot be built", f"{type(error).__name__}: {error}",
                     "fix teacher_prompt_template / answer_context_template (placeholders {prompt}, "
                     "{privileged_context}; {answer})")
    teacher_ids = tokenizer(teacher_text, add_special_tokens=False)["input_ids"]
    if context not in teacher_text or len(teacher_ids) <= len(student_ids):
        return Check(name, "fail", "the rendered teacher prompt does not carry the privileged context",
                     "the chat template drops or rewrites the user turn's text",
                     "use a template that renders message content verbatim, or give rows teacher_messages")
    return Check(name, "ok", f"the teacher sees the user turn + {context!r} (+{len(teacher_ids) - len(student_ids)} "
                 "tokens; privileged_from='answer', with OPSDConfig's templates unless others are passed)")


def run_checks(require_gpu: bool = False, require_4bit: bool = False, require_deepspeed: bool = False,
               require_vllm: bool = False, min_vram_gb: float | None = None, student: str | None = None,
               teacher: str | None = None, templates: dict[str, str] | None = None) -> list[Check]:
    checks = [
        check_torch(),
        check_gpu(require_gpu, min_vram_gb),
        check_bitsandbytes(require_4bit),
        check_transformers_verdict(require_4bit),
        check_deepspeed(require_deepspeed),
        check_vllm(require_vllm),
        check_tokenizer_match(student, teacher),
        *(check_self_teacher(student, **(templates or {})) if student is not None and teacher is None else []),
    ]
    return [check for check in checks if check is not None]


# -- command line -------------------------------------------------------------------------------------
def render(checks: list[Check]) -> str:
    lines = ["trl-opsd doctor"]
    for check in checks:
        lines.append(f"  [{check.status:^4}] {check.name:<17} {check.detail}")
        if check.cause:
            lines.append(f"{'':26}cause: {check.cause}")
        if check.fix:
            lines.append(f"{'':26}fix:   {check.fix}")
    failures = sum(c.status == "fail" for c in checks)
    warnings = sum(c.status == "warn" for c in checks)
    lines.append(f"result: {failures} failure(s), {warnings} warning(s)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--require-gpu", action="store_true", help="fail when no CUDA GPU is visible")
    parser.add_argument("--require-4bit", action="store_true", help="fail unless bitsandbytes 4-bit works here")
    parser.add_argument("--require-deepspeed", action="store_true", help="fail unless DeepSpeed imports")
    parser.add_argument("--require-vllm", action="store_true", help="fail unless vLLM is installed")
    parser.add_argument("--min-vram-gb", type=float, default=None, help="fail unless a GPU has at least this much")
    parser.add_argument("--student", default=None, help="student model/tokenizer path or hub id")
    parser.add_argument("--teacher", default=None, help="teacher model/tokenizer path or hub id (none: OPSD's "
                        "self-teacher; the student's chat template, pad token and privileged view are checked)")
    parser.add_argument("--answer-context-template", default=DEFAULT_ANSWER_CONTEXT_TEMPLATE,
                        help="self-teacher: OPSDConfig.answer_context_template to check")
    parser.add_argument("--teacher-prompt-template", default=DEFAULT_TEACHER_PROMPT_TEMPLATE,
                        help="self-teacher: OPSDConfig.teacher_prompt_template to check")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(args: argparse.Namespace) -> int:
    checks = run_checks(args.require_gpu, args.require_4bit, args.require_deepspeed, args.require_vllm,
                        args.min_vram_gb, args.student, args.teacher,
                        {"answer_context_template": args.answer_context_template,
                         "teacher_prompt_template": args.teacher_prompt_template})
    print(json.dumps([asdict(c) for c in checks], indent=2) if args.json else render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0
