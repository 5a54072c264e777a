"""`trl-opsd doctor` on a real chat model: as a student with a teacher, and alone (the OPSD self-teacher case)."""

import json

from real_model.conftest import console_script, run_command


def doctor(tmp_path, *args) -> dict[str, dict]:
    done = run_command([console_script("trl-opsd"), "doctor", "--json", *args], cwd=tmp_path, timeout=600)
    return {check["name"]: check for check in json.loads(done.stdout)}


def test_doctor_student_and_teacher_share_the_tokenizer(smollm2, tmp_path):
    checks = doctor(tmp_path, "--student", smollm2, "--teacher", smollm2)
    assert checks["tokenizers"]["status"] == "ok" and "49152 tokens" in checks["tokenizers"]["detail"]
    assert not [name for name, check in checks.items() if check["status"] == "fail"]


def test_doctor_student_alone_checks_the_self_teachers_chat_template_and_pad_token(smollm2, tmp_path):
    checks = doctor(tmp_path, "--student", smollm2)  # run_command asserts exit status 0
    assert checks["chat_template"]["status"] == "ok" and "<|im_start|>assistant" in checks["chat_template"]["detail"]
    assert checks["pad_token"]["status"] == "ok" and "<|im_end|>" in checks["pad_token"]["detail"]
    assert checks["self_teacher_view"]["status"] == "ok"
