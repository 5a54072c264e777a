"""``use_vllm``: the import guard, the config plumbing into TRL's ``VLLMGeneration``, rollouts laid out for the loss.

vLLM itself is not exercised (it needs a GPU): TRL's backend is replaced by a recording fake.
"""

import math

import pytest
import torch
import trl.generation.vllm_generation
from datasets import Dataset

import trl_opsd.forward
import trl_opsd.trainer
from harness.world.arithmetic import generate_problems, problems_to_rows
from harness.world.tiny import build_tiny_model
from trl_opsd import OPSDConfig, OPSDTrainer

ROWS = problems_to_rows(generate_problems(4, "train", seed=1))


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, max_new_tokens=9, report_to="none",
        use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", use_vllm=True,
    )
    values.update(overrides)
    return OPSDConfig(**values)


def _trainer(tokenizer, tmp_path, **overrides):
    return OPSDTrainer(model=build_tiny_model(tokenizer), args=_args(tmp_path, **overrides),
                       train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)


class FakeVLLMGeneration:
    """Records how it was built and called; answers every prompt with a completion of its length mod 4 + 1 tokens."""

    instances = []

    def __init__(self, **kwargs):
        self.kwargs, self.prompts, self.syncs = kwargs, [], 0
        FakeVLLMGeneration.instances.append(self)

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations):
        assert images is None and num_generations == 1
        self.prompts.append(prompts)
        completions = [[7 + i for i in range(len(prompt) % 4 + 1)] for prompt in prompts]
        return prompts, completions, None, None


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeVLLMGeneration.instances = []
    monkeypatch.setattr(trl_opsd.trainer, "is_vllm_available", lambda: True)
    monkeypatch.setattr(trl.generation.vllm_generation, "VLLMGeneration", FakeVLLMGeneration)
    return FakeVLLMGeneration


def test_use_vllm_without_vllm_fails_at_construction_naming_the_key_and_the_install(tiny_tokenizer, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(trl_opsd.trainer, "is_vllm_available", lambda: False)
    with pytest.raises(ImportError, match=r"use_vllm=True .*pip install 'trl\[vllm\]'"):
        _trainer(tiny_tokenizer, tmp_path)


def test_without_use_vllm_nothing_is_built(tiny_tokenizer, tmp_path, fake_vllm):
    trainer = _trainer(tiny_tokenizer, tmp_path, use_vllm=False)
    assert trainer.vllm_generation is None and not fake_vllm.instances


def test_config_knobs_reach_trls_vllm_backend(tiny_tokenizer, tmp_path, fake_vllm):
    trainer = _trainer(
        tiny_tokenizer, tmp_path, vllm_mode="server", vllm_server_base_url="http://teacher-box:8001",
        vllm_server_host="10.0.0.2", vllm_server_port=8123, vllm_server_timeout=12.5, vllm_group_port=50000,
        vllm_gpu_memory_utilization=0.45, vllm_max_model_length=384, vllm_tensor_parallel_size=2,
        vllm_enable_sleep_mode=True, vllm_model_impl="transformers", temperature=0.7, gradient_accumulation_steps=3,
    )
    assert trainer.vllm_generation is fake_vllm.instances[0]
    kwargs = trainer.vllm_generation.kwargs
    assert kwargs["model"] is trainer.model and kwargs["processing_class"] is tiny_tokenizer
    assert kwargs["accelerator"] is trainer.accelerator
    assert {key: kwargs[key] for key in (
        "mode", "server_base_url", "server_host", "server_port", "server_timeout", "group_port",
        "gpu_memory_utilization", "max_model_length", "tensor_parallel_size", "enable_sleep_mode", "model_impl",
        "temperature", "max_completion_length", "max_num_seqs", "top_p", "top_k", "min_p", "repetition_penalty",
    )} == {
        "mode": "server", "server_base_url": "http://teacher-box:8001", "server_host": "10.0.0.2",
        "server_port": 8123, "server_timeout": 12.5, "group_port": 50000, "gpu_memory_utilization": 0.45,
        "max_model_length": 384, "tensor_parallel_size": 2, "enable_sleep_mode": True, "model_impl": "transformers",
        "temperature": 0.7, "max_completion_length": 9, "max_num_seqs": 12,  # a window of 3 micro-batches of 2, per TP rank
        "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,  # the policy itself, untruncated
    }


@pytest.mark.parametrize("knob, value", [("vllm_mode", "remote"), ("vllm_gpu_memory_utilization", 0.0),
                                         ("vllm_tensor_parallel_size", 0), ("vllm_max_model_length", 0)])
def test_bad_vllm_knobs_fail_in_the_config(tmp_path, knob, value):
    with pytest.raises(ValueError, match=knob):
        _args(tmp_path, **{knob: value})


def test_student_rollouts_come_from_vllm_unpadded_in_and_right_padded_out(tiny_tokenizer, tmp_path, fake_vllm,
                                                                         monkeypatch):
    trainer = _trainer(tiny_tokenizer, tmp_path)
    monkeypatch.setattr(trainer, "_sample", lambda *args: pytest.fail("transformers generate was used"))
    batch = trainer._attach_completions(trainer.data_collator(ROWS), "student")

    sent = trainer.vllm_generation.prompts[-1]
    assert sent == [trainer.data_collator.row_views(row, i).prompt_ids for i, row in enumerate(ROWS)]
    lengths = [len(prompt) % 4 + 1 for prompt in sent]
    assert batch["completions"].shape == (len(ROWS), max(lengths))
    for row, length in enumerate(lengths):
        assert batch["completions"][row, :length].tolist() == [7 + i for i in range(length)]
        assert (batch["completions"][row, length:] == tiny_tokenizer.pad_token_id).all()
        assert batch["completion_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)


def test_weights_are_pushed_once_per_optimizer_step(tiny_tokenizer, tmp_path, fake_vllm):
    trainer = _trainer(tiny_tokenizer, tmp_path)
    for _ in range(3):  # micro-batches of one accumulation window
        trainer._attach_completions(trainer.data_collator(ROWS[:2]), "student")
    assert trainer.vllm_generation.syncs == 1
    trainer.state.global_step += 1
    trainer._attach_completions(trainer.data_collator(ROWS[:2]), "student")
    assert trainer.vllm_generation.syncs == 2


def test_training_runs_on_vllm_rollouts_one_call_per_accumulation_window(tiny_tokenizer, tmp_path, fake_vllm):
    trainer = _trainer(tiny_tokenizer, tmp_path, gradient_accumulation_steps=2)
    windows = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, **kwargs):
        prompts = trl_opsd.forward.unpadded_rows(inputs["prompts"], inputs["prompt_attention_mask"])
        windows.append((trainer.state.global_step, prompts, inputs["completions"].tolist()))
        return compute_loss(model, inputs, **kwargs)

    trainer.compute_loss = recording
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    calls = trainer.vllm_generation.prompts
    assert trainer.vllm_generation.syncs == 2 and [len(prompts) for prompts in calls] == [4, 4]
    for step, call in enumerate(calls):  # each micro-batch got the completions of its own prompts, in order
        micro_batches = [(prompts, completions) for s, prompts, completions in windows if s == step]
        assert len(micro_batches) == 2
        rows = [(p, c) for prompts, completions in micro_batches for p, c in zip(prompts, completions)]
        assert len(rows) == len(call)
        for sent, (prompt, completion) in zip(call, rows):
            length = len(sent) % 4 + 1  # the fake's answer to this prompt
            assert prompt == sent and completion[:length] == [7 + i for i in range(length)]
    logged = [log for log in trainer.state.log_history if "on_policy_fraction" in log]
    assert logged and all(log["on_policy_fraction"] == 1.0 for log in logged)
    assert torch.isfinite(torch.tensor([log["loss"] for log in logged])).all()
