"""``rollout_backend``: the ``use_vllm`` alias, refusals, and ``"hf_static"`` (static KV cache, fixed shapes, compiled
decode step) against ``"hf"`` (dynamic cache): the same greedy completions, samples from the same distribution, the
same training losses.

Compilation runs with dynamo's ``eager`` backend here: the graph capture, guards and recompilation are the real ones,
inductor's code generation (minutes of C++ compilation on a loaded CPU) is left to ``benchmarks/rollout_speed.py``.
"""

import pytest
import torch
from datasets import Dataset
from scipy import stats
from transformers import CompileConfig, Qwen2Config, Qwen2ForCausalLM

import trl_opsd.rollouts
from harness.world.arithmetic import generate_problems, problems_to_rows
from harness.world.tiny import build_tiny_model
from trl_opsd import OPSDConfig, OPSDTrainer
from trl_opsd.forward import completion_logits
from trl_opsd.rollouts import bucket_width, fixed_shape_prompts, generation_config_for

ROWS = problems_to_rows(generate_problems(12, "train", seed=3))


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, max_new_tokens=10, report_to="none",
        use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", learning_rate=1e-3, seed=11,
    )
    values.update(overrides)
    return OPSDConfig(**values)


def _trainer(tokenizer, tmp_path, model=None, peft_config=None, **overrides):
    return OPSDTrainer(model=model if model is not None else build_tiny_model(tokenizer),
                       args=_args(tmp_path, **overrides), train_dataset=Dataset.from_list(ROWS),
                       processing_class=tokenizer, peft_config=peft_config)


@pytest.fixture
def eager_compile(monkeypatch):
    """Compile the decode step on CPU with dynamo's eager backend (real capture and guards, no C++ build)."""
    def config(everywhere):
        compile_config = CompileConfig(backend="eager", mode=None)
        compile_config._compile_all_devices = everywhere
        return compile_config

    monkeypatch.setattr(trl_opsd.rollouts, "decode_compile_config", config)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _peaked_tiny_model(tokenizer, seed=4):
    """The tests' tiny Llama with its matrices redrawn at std 0.3: peaked, prompt-dependent next-token distributions
    (about 2-3 nats), where the std-0.02 initialisation greedily repeats one token and samples almost uniformly."""
    model = build_tiny_model(tokenizer, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _tiny_qwen2(tokenizer, seed=0):
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float().eval()
        with torch.no_grad():  # peaked distributions, as in _peaked_tiny_model
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0.0, 0.3)
    assert len(set(model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False)[0].tolist())) > 4
    return model


def _student_completions(trainer, rows, source="student"):
    """The student's (or with ``source="teacher"``, the teacher's) completions of ``rows`` as drawn by the trainer's
    rollout path."""
    batch = trainer._attach_completions(trainer.data_collator(rows), source)
    return batch["completions"], batch["completion_mask"]


# -- configuration ------------------------------------------------------------------------------------------------

def test_use_vllm_is_an_alias_resolved_in_one_place(tmp_path):
    assert _args(tmp_path).rollout_backend == "hf"
    aliased = _args(tmp_path, use_vllm=True)
    assert aliased.rollout_backend == "vllm" and aliased.use_vllm
    named = _args(tmp_path, rollout_backend="vllm")
    assert named.use_vllm
    assert not _args(tmp_path, rollout_backend="hf_static").use_vllm
    with pytest.raises(ValueError, match=r"use_vllm=True .* rollout_backend='hf_static'"):
        _args(tmp_path, use_vllm=True, rollout_backend="hf_static")
    with pytest.raises(ValueError, match=r"rollout_backend must be one of"):
        _args(tmp_path, rollout_backend="static")
    with pytest.raises(ValueError, match=r"rollout_compile=True only applies to rollout_backend='hf_static'"):
        _args(tmp_path, rollout_compile=True)


def test_hf_static_refuses_a_model_without_static_cache_support(tiny_tokenizer, tmp_path):
    model = build_tiny_model(tiny_tokenizer)
    model._can_compile_fullgraph = False
    with pytest.raises(ValueError, match=r"student \(LlamaForCausalLM\) does not declare it.*rollout_backend='hf'"):
        _trainer(tiny_tokenizer, tmp_path, model=model, rollout_backend="hf_static")


def test_static_generation_config_compiles_only_where_asked():
    kwargs = dict(max_new_tokens=4, do_sample=True)
    assert generation_config_for("hf", kwargs, None).cache_implementation is None
    default = generation_config_for("hf_static", kwargs, None)
    assert default.cache_implementation == "static" and default.compile_config is None and not default.disable_compile
    assert generation_config_for("hf_static", kwargs, True).compile_config._compile_all_devices
    assert generation_config_for("hf_static", kwargs, False).disable_compile


def test_prompts_are_padded_to_buckets_and_rows_filled_without_empty_rows():
    assert [bucket_width(w, 512) for w in (1, 16, 17, 33, 300)] == [16, 16, 32, 64, 512]
    assert bucket_width(40, 48) == 48 and bucket_width(60, 48) == 64  # over the limit: the bucket, not the limit
    prompts, mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    padded, padded_mask = fixed_shape_prompts(prompts, mask, pad_token_id=0, width=5, rows=4)
    assert padded.tolist() == [[0, 0, 0, 5, 6], [0, 0, 7, 8, 9], [0, 0, 0, 5, 6], [0, 0, 0, 5, 6]]
    assert padded_mask.sum(1).tolist() == [2, 3, 2, 2]


# -- greedy: identical completions --------------------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True])
def test_greedy_completions_identical_to_the_dynamic_cache_through_the_trainer(tiny_tokenizer, tmp_path, compiled,
                                                                               request):
    if compiled:
        request.getfixturevalue("eager_compile")
    rows = ROWS[:3]  # a partial batch: filled up to per_device_train_batch_size rows, the extra ones dropped
    dynamic = _trainer(tiny_tokenizer, tmp_path, model=_peaked_tiny_model(tiny_tokenizer))
    static = _trainer(tiny_tokenizer, tmp_path, model=_peaked_tiny_model(tiny_tokenizer), rollout_backend="hf_static",
                      rollout_compile=compiled)
    for trainer in (dynamic, static):
        trainer.generation_config.do_sample = False
    expected, expected_mask = _student_completions(dynamic, rows)
    completions, mask = _student_completions(static, rows)
    assert completions.shape == expected.shape == (3, 10) and len(set(expected.flatten().tolist())) > 3
    assert torch.equal(completions, expected) and torch.equal(mask, expected_mask)
    # The weights move between steps: the compiled graph must read them, not a snapshot.
    for trainer in (dynamic, static):
        with torch.no_grad():
            trainer.model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    moved, _ = _student_completions(static, rows)
    assert torch.equal(moved, _student_completions(dynamic, rows)[0]) and not torch.equal(moved, expected)


def test_peft_rollouts_use_the_adapters_for_the_student_and_not_for_the_self_teacher(tiny_tokenizer, tmp_path,
                                                                                     eager_compile):
    from peft import LoraConfig

    rows = ROWS[:4]
    completions = {}
    for backend in ("hf", "hf_static"):
        torch.manual_seed(0)  # the same random (non-zero) adapters for both backends
        trainer = _trainer(tiny_tokenizer, tmp_path, model=_peaked_tiny_model(tiny_tokenizer), rollout_backend=backend,
                           seq_kd=True, gradient_checkpointing=True,
                           peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
        trainer.generation_config.do_sample = False
        # student, teacher (adapters disabled: another compiled graph), student again (back to the first one)
        completions[backend] = [_student_completions(trainer, rows, source)[0]
                                for source in ("student", "teacher", "student")]
    for expected, got in zip(completions["hf"], completions["hf_static"]):
        assert torch.equal(expected, got)
    student, teacher, student_again = completions["hf_static"]
    assert not torch.equal(student, teacher) and torch.equal(student, student_again)


@pytest.mark.slow  # builds the arithmetic world when it is not cached
def test_greedy_completions_identical_on_the_arithmetic_world(warm_world, tmp_path, eager_compile):
    student, tokenizer = warm_world.load()
    rows = problems_to_rows(generate_problems(6, "validation", seed=7))
    completions = {}
    for backend in ("hf", "hf_static"):
        trainer = OPSDTrainer(model=student, args=_args(tmp_path, per_device_train_batch_size=8, max_new_tokens=24,
                                                         rollout_backend=backend),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        trainer.generation_config.do_sample = False
        completions[backend] = _student_completions(trainer, rows)
    assert torch.equal(completions["hf"][0], completions["hf_static"][0])
    assert torch.equal(completions["hf"][1], completions["hf_static"][1])
    assert (completions["hf"][1].sum(1) < 24).any()  # answers ended by EOS: the masks were compared too


def test_greedy_completions_identical_on_a_tiny_qwen2(tiny_tokenizer, eager_compile):
    model = _tiny_qwen2(tiny_tokenizer)
    prompts = torch.randint(5, len(tiny_tokenizer), (5, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    mask[1, :4] = mask[3, :7] = 0  # left padding
    prompts[mask == 0] = tiny_tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=None)
    expected = model.generate(input_ids=prompts, attention_mask=mask,
                              generation_config=generation_config_for("hf", kwargs, None))[:, 11:]
    fixed, fixed_mask = fixed_shape_prompts(prompts, mask, tiny_tokenizer.pad_token_id, width=bucket_width(11, 64),
                                            rows=8)
    for _ in range(2):  # the second call reuses the cache size and the compiled graph
        out = model.generate(input_ids=fixed, attention_mask=fixed_mask,
                             generation_config=generation_config_for("hf_static", kwargs, True))
        assert torch.equal(out[:5, fixed.shape[1]:], expected)


# -- sampling: the same distribution ------------------------------------------------------------------------------

def _randomized_pit(model, sequences, mask, width, temperature, generator):
    """For every sampled completion token, its randomized probability integral transform under the model's exact
    ``softmax(logits / temperature)``: ``P(X < x) + V * P(X = x)`` with tokens ordered by probability and V uniform.
    Uniform on (0, 1) exactly when the tokens were drawn from that distribution."""
    completion_len = sequences.shape[1] - width
    full_mask = torch.cat([mask, mask.new_ones((mask.shape[0], completion_len))], dim=1)
    with torch.no_grad():
        logits = completion_logits(model, sequences, full_mask, completion_len)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    rank = (order == sequences[:, width:, None]).double().argmax(-1, keepdim=True)
    below = probs.cumsum(-1).gather(-1, rank) - probs.gather(-1, rank)
    noise = torch.rand(rank.shape, generator=generator, dtype=torch.double)
    return (below + noise * probs.gather(-1, rank)).flatten()


def _sampled_pit(tokenizer, backend, sampling_temperature, tested_temperature=0.7, seed=5):
    model = _peaked_tiny_model(tokenizer).eval()  # peaked distributions, so that the temperature matters
    prompts = torch.randint(5, len(tokenizer), (64, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=sampling_temperature, top_k=0, top_p=1.0,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    width = prompts.shape[1]
    if backend == "hf_static":
        prompts, mask = fixed_shape_prompts(prompts, mask, tokenizer.pad_token_id, bucket_width(width, None), 64)
        width = prompts.shape[1]
    torch.manual_seed(seed)
    samples = [model.generate(input_ids=prompts, attention_mask=mask,
                              generation_config=generation_config_for(backend, kwargs, True)) for _ in range(2)]
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([_randomized_pit(model, s, mask, width, tested_temperature, generator) for s in samples]).numpy()


def test_sampled_tokens_follow_the_tempered_policy_on_both_backends(tiny_tokenizer, eager_compile):
    """A KS test of 768 sampled tokens' randomized PIT against uniform, decode steps included; the same test
    rejects samples drawn at the wrong temperature, so it has the power to catch a backend that ignores it."""
    for backend in ("hf", "hf_static"):
        assert stats.kstest(_sampled_pit(tiny_tokenizer, backend, 0.7), "uniform").pvalue > 1e-3, backend
    ignored_temperature = _sampled_pit(tiny_tokenizer, "hf_static", 1.0)
    assert stats.kstest(ignored_temperature, "uniform").pvalue < 1e-6


# -- training: the same loss curve --------------------------------------------------------------------------------

def test_training_with_hf_static_gives_the_loss_curve_of_hf(tiny_tokenizer, tmp_path, eager_compile):
    def losses(**overrides):
        trainer = _trainer(tiny_tokenizer, tmp_path, model=_peaked_tiny_model(tiny_tokenizer),
                           gradient_checkpointing=True, **overrides)
        trainer.generation_config.do_sample = False  # greedy rollouts: both backends see the same completions
        trainer.train()
        # Gradient checkpointing was switched off and on around each rollout: one input-grad hook is left, not one
        # per step (a count that changed every step would recompile the decode step every step).
        hooks = trainer.model.model.embed_tokens._forward_hooks.values()
        assert [hook.__name__ for hook in hooks].count("make_inputs_require_grads") == 1
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    expected = losses()
    assert len(expected) == 3
    assert losses(rollout_backend="hf_static", rollout_compile=True) == pytest.approx(expected, rel=1e-4, abs=1e-6)
