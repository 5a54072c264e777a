"""The offline arithmetic world: determinism, disjoint splits, parseable gold, the warm start's hint gap,
the shipped world (used without building anything) and its rebuild from scratch."""

import json
import re

import pytest
import torch

from harness.verifiers import extract_answer
from harness.world.arithmetic import SPLITS, generate_problems, hinted_messages, split_of
from harness.world.tiny import build_tiny_model, build_tokenizer


def test_same_seed_same_problems_and_different_seed_different_problems():
    assert generate_problems(50, "train", seed=3) == generate_problems(50, "train", seed=3)
    assert generate_problems(50, "train", seed=3) != generate_problems(50, "train", seed=4)


def test_a_prefix_of_a_split_does_not_depend_on_how_many_were_asked_for():
    assert generate_problems(100, "test")[:20] == generate_problems(20, "test")


def test_splits_never_overlap():
    questions = {split: {p.question for p in generate_problems(n, split)} for split, n in
                 [("train", 3000), ("validation", 400), ("test", 400)]}
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    for split in SPLITS:
        assert all(split_of(p) == split for p in generate_problems(100, split))


def test_every_gold_solution_is_correct_arithmetic_and_parses():
    problems = generate_problems(500, "test")
    assert {p.difficulty for p in problems} == {1, 2, 3}
    for problem in problems:
        *equations, final = problem.solution.split("\n")
        assert len(equations) == problem.difficulty
        for line in equations:
            left, right = line.split("=")
            assert eval(left) == int(right), line  # noqa: S307 - our own generated digits and operators
        assert extract_answer(problem.solution, strict=True) == problem.answer == final.removeprefix("#### ")
        assert int(problem.answer) >= 0


def test_hinted_prompt_carries_the_answer_only_in_the_user_turn():
    problem = generate_problems(1, "test")[0]
    chat = hinted_messages(problem)
    assert chat[-1]["content"].startswith(problem.question)
    assert chat[-1]["content"].endswith(f"The final answer is {problem.answer}.")
    assert problem.answer not in problem.to_row()["messages"][-1]["content"].split("now?")[-1]


def test_tokenizer_is_deterministic_and_round_trips_text(tiny_tokenizer):
    fresh, shared = (json.loads(t.backend_tokenizer.to_str()) for t in (build_tokenizer(), tiny_tokenizer))
    # vocabulary, merges and special tokens; not padding state, which callers set on the shared fixture
    assert fresh["model"] == shared["model"] and fresh["added_tokens"] == shared["added_tokens"]
    problem = generate_problems(1, "validation")[0]
    text = tiny_tokenizer.apply_chat_template(problem.to_row(with_solution=True)["messages"], tokenize=False)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    # digits are one token each, so arithmetic is learnable token by token
    digits = [tok for tok in tiny_tokenizer.convert_ids_to_tokens(ids) if re.fullmatch(r"\d+", tok)]
    assert digits and all(len(tok) == 1 for tok in digits)


def test_chat_template_marks_exactly_the_assistant_reply(tiny_tokenizer):
    problem = generate_problems(1, "validation")[0]
    encoded = tiny_tokenizer.apply_chat_template(
        problem.to_row(with_solution=True)["messages"], return_dict=True, return_assistant_tokens_mask=True
    )
    marked = [tok for tok, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tiny_tokenizer.decode(marked) == problem.solution + tiny_tokenizer.eos_token


def test_tiny_model_round_trips_through_save_pretrained(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_model(tiny_tokenizer, seed=7)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tiny_tokenizer("Mia has 12 apples.")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)
    assert reloaded_tokenizer.chat_template == tiny_tokenizer.chat_template
    assert reloaded_tokenizer("Mia has 12 apples.")["input_ids"] == ids[0].tolist()
    assert not torch.equal(build_tiny_model(tiny_tokenizer, seed=8).lm_head.weight, model.lm_head.weight)


def test_warm_start_is_mediocre_without_the_hint_and_strong_with_it(warm_world):
    no_hint, hint, n = warm_world.no_hint_accuracy, warm_world.hint_accuracy, warm_world.num_eval_problems
    message = f"no-hint {no_hint:.1%}, hint {hint:.1%} on {n} held-out problems after {warm_world.steps} steps"
    assert n >= 200, message
    assert 0.10 <= no_hint <= 0.70, message
    assert hint - no_hint >= 0.25, message


def test_the_shipped_world_is_used_and_nothing_is_built(warm_world, tmp_path, monkeypatch):
    from harness.world import warm_start as world

    monkeypatch.setenv("TRL_OPSD_CACHE", str(tmp_path))
    monkeypatch.setattr(world, "_train_and_evaluate", lambda *a, **k: pytest.fail("the shipped world was rebuilt"))
    assert world.warm_start() == warm_world and world.checkpoint(world.WORLD_MODEL) == str(world.SHIPPED_DIR)
    assert warm_world.cache_key == world.WarmStartSettings().cache_key()
    assert list(tmp_path.iterdir()) == []  # no lock file, no cache folder
    model, tokenizer = world.load(world.WORLD_MODEL)
    assert model.config.hidden_size == 128 and tokenizer.eos_token == "<|im_end|>"
    # other settings are a custom world, which lives in the cache
    assert world.world_folder(world.WarmStartSettings(seed=1)) == world.cache_folder(world.WarmStartSettings(seed=1))


# Bit-identity needs the same torch/transformers/trl (kernels and trainer defaults change the trajectory of a
# 1000-step run); across versions the rebuild must still land close to the shipped world.
REBUILD_TOLERANCE = 0.05


@pytest.mark.slow
def test_rebuilding_the_world_reproduces_the_shipped_one(warm_world, tmp_path):
    """Builds the default world from scratch (many minutes on 2 cores): the only test that trains a world."""
    from harness.world.warm_start import WarmStartSettings, library_versions, warm_start

    rebuilt = warm_start(WarmStartSettings(), cache_dir=tmp_path, force=True)
    shipped_numbers = (warm_world.steps, warm_world.no_hint_accuracy, warm_world.hint_accuracy)
    rebuilt_numbers = (rebuilt.steps, rebuilt.no_hint_accuracy, rebuilt.hint_accuracy)
    running = library_versions()
    keys = ("torch", "transformers", "trl", "tokenizers")
    same_versions = all(running[k] == warm_world.built_with.get(k) for k in keys)
    message = (f"(steps, no-hint, hint): shipped {shipped_numbers} built with {warm_world.built_with}; "
               f"rebuilt {rebuilt_numbers} with {running}")
    assert rebuilt.reached_target, message
    if same_versions:
        assert rebuilt_numbers == shipped_numbers, "same library versions, different world: " + message
    else:
        assert abs(rebuilt.no_hint_accuracy - warm_world.no_hint_accuracy) <= REBUILD_TOLERANCE, (
            f"library versions differ from the shipped world's, and the rebuild drifted beyond "
            f"{REBUILD_TOLERANCE:.0%}: " + message)
        assert abs(rebuilt.hint_accuracy - warm_world.hint_accuracy) <= REBUILD_TOLERANCE, message
