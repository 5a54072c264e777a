"""`trl-opsd doctor`: CPU machines pass by default, required capabilities fail with a cause and a fix."""

import copy
import json
import sys

import pytest

from harness import doctor
from harness.cli import main


def by_name(checks):
    return {check.name: check for check in checks}


def test_a_cpu_only_machine_passes_by_default_and_reports_what_it_found(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "[ ok ] torch" in out and "result: 0 failure(s)" in out
    checks = by_name(doctor.run_checks())
    assert checks["torch"].status == "ok" and "device" in checks["torch"].detail
    if checks["gpu"].status != "ok":  # no GPU here: a warning with its cause, never a failure by default
        assert checks["gpu"].status == "warn" and checks["gpu"].cause and checks["gpu"].fix


def test_required_capabilities_that_are_missing_fail_with_cause_and_fix(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(["doctor", "--require-gpu", "--json"]) == 1
    gpu = by_name(doctor.Check(**c) for c in json.loads(capsys.readouterr().out))["gpu"]
    assert gpu.status == "fail" and "CPU-only build" in gpu.cause and "download.pytorch.org" in gpu.fix
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert "no device" in doctor.check_gpu(True, None).cause

    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: None)
    for check in (doctor.check_deepspeed(True), doctor.check_vllm(True)):
        assert check.status == "fail" and check.cause.endswith("package is absent") and "pip install" in check.fix
    assert doctor.check_vllm(False).status == "warn"


def test_a_broken_bitsandbytes_names_the_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    check = doctor.check_bitsandbytes(require_4bit=True)
    assert check.status == "fail" and "import of bitsandbytes halted" in check.cause
    assert "bitsandbytes>=0.43.1" in check.fix
    assert doctor.check_bitsandbytes(require_4bit=False).status == "warn"


def test_bitsandbytes_runs_a_real_4bit_layer_here():
    pytest.importorskip("bitsandbytes")
    check = doctor.check_bitsandbytes(require_4bit=True)
    assert check.status == "ok" and "4-bit NF4 layer runs on" in check.detail


def test_a_stale_transformers_cache_is_diagnosed_as_such(monkeypatch):
    from transformers.utils import import_utils

    class StaleVerdict:
        """False until the cache is cleared, as when bitsandbytes was installed into a running process."""

        def __init__(self):
            self.cleared = False

        def __call__(self):
            return self.cleared

        def cache_clear(self):
            self.cleared = True

    monkeypatch.setattr(import_utils, "is_bitsandbytes_available", StaleVerdict())
    monkeypatch.setattr(doctor, "_version", lambda name: "0.50.0")
    check = doctor.check_transformers_verdict(require_4bit=True)
    assert check.status == "fail" and "stale lru_cache" in check.cause and "restart" in check.fix

    monkeypatch.setattr(import_utils, "is_bitsandbytes_available", lambda: False)
    assert "below transformers' minimum" in doctor.check_transformers_verdict(require_4bit=True).cause


def test_tokenizer_match_of_student_and_teacher(tmp_path, tiny_tokenizer, capsys):
    from harness.world.tiny import build_tokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "same")
    build_tokenizer(vocab_size=400).save_pretrained(tmp_path / "other")
    student = str(tmp_path / "student")
    assert doctor.check_tokenizer_match(student, str(tmp_path / "same")).status == "ok"
    mismatch = doctor.check_tokenizer_match(student, str(tmp_path / "other"))
    assert mismatch.status == "fail" and "vocabularies differ" in mismatch.cause and "same token ids" in mismatch.fix
    assert main(["doctor", "--student", student, "--teacher", str(tmp_path / "other")]) == 1
    assert "[fail] tokenizers" in capsys.readouterr().out
    assert doctor.check_tokenizer_match(student, None) is None  # student alone: the self-teacher checks instead
    assert doctor.check_tokenizer_match(None, student).status == "fail"
    missing = doctor.check_tokenizer_match(student, str(tmp_path / "nowhere"))
    assert missing.status == "fail" and "cannot load the teacher tokenizer" in missing.detail


def test_student_alone_is_a_self_teacher_run_that_passes_and_checks_the_template_pad_and_view(
        tmp_path, tiny_tokenizer, capsys):
    """OPSD has no separate teacher: `doctor --student M` must not fail for want of --teacher."""
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    student = str(tmp_path / "student")
    assert main(["doctor", "--student", student]) == 0
    out = capsys.readouterr().out
    assert "tokenizers" not in out and "result: 0 failure(s)" in out
    checks = by_name(doctor.check_self_teacher(student))
    assert checks["chat_template"].status == "ok" and "<|im_start|>assistant" in checks["chat_template"].detail
    assert checks["pad_token"].status == "ok" and "distinct from EOS" in checks["pad_token"].detail
    view = checks["self_teacher_view"]
    assert view.status == "ok" and "'The final answer is 7.'" in view.detail
    assert main(["doctor", "--teacher", student]) == 1  # a teacher without a student is still a mistake


def test_self_teacher_problems_are_named(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the session's tokenizer must keep its pad token and template
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "pad_is_eos")
    pad = by_name(doctor.check_self_teacher(str(tmp_path / "pad_is_eos")))["pad_token"]
    assert pad.status == "ok" and "pad token = EOS" in pad.detail and "first EOS" in pad.detail

    tokenizer.pad_token = None
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "bare")
    checks = by_name(doctor.check_self_teacher(str(tmp_path / "bare")))
    assert checks["chat_template"].status == "fail" and "no chat template" in checks["chat_template"].detail
    assert checks["pad_token"].status == "warn" and "pad_token = eos_token" in checks["pad_token"].fix
    assert checks["self_teacher_view"].status == "fail"
    assert main(["doctor", "--student", str(tmp_path / "bare")]) == 1

    # A template that ignores add_generation_prompt, and one that drops the user's text (the hint is lost).
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "no_header")
    no_header = by_name(doctor.check_self_teacher(str(tmp_path / "no_header")))["chat_template"]
    assert no_header.status == "warn" and "adds nothing" in no_header.detail
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(tmp_path / "drops_text")
    view = by_name(doctor.check_self_teacher(str(tmp_path / "drops_text")))["self_teacher_view"]
    assert view.status == "fail" and "does not carry the privileged context" in view.detail
    bad = doctor.check_self_teacher(str(tmp_path / "drops_text"), teacher_prompt_template="{prompt} {hint}")
    assert by_name(bad)["self_teacher_view"].status == "fail" and "{hint}" in by_name(bad)["self_teacher_view"].cause
