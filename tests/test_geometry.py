"""Gradient-geometry diagnostics on synthetic divergences with hand-computed shares."""

import json

import pytest
import torch
from datasets import Dataset

from harness.plots import plot_geometry
from harness.world.arithmetic import generate_problems, problems_to_rows
from harness.world.tiny import build_tiny_model
from trl_opsd.geometry import (
    GeometryRecorder,
    answer_regions,
    flat_metrics,
    geometry_statistics,
    log_bucket_histogram,
    top_token_shares,
)

PIECES = ["12+7=19\n", "19-5=", "14", "\n#### ", "14"]  # a worked solution, encoded piece by piece
PIECE_VALUES = [0.1, 0.2, 2.0, 0.1, 1.0]  # the divergence of every token of each piece


def _solution_batch(tokenizer):
    """Row 0: the solution (+ EOS at 0 divergence, + padding at a huge one); row 1: fully masked."""
    ids, values, counts = [], [], []
    for piece, value in zip(PIECES, PIECE_VALUES):
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        values += [value] * len(piece_ids)
        counts.append(len(piece_ids))
    ids.append(tokenizer.eos_token_id)
    values.append(0.0)
    width = len(ids) + 2
    completion = torch.full((2, width), tokenizer.pad_token_id)
    completion[0, : len(ids)] = torch.tensor(ids)
    divergence = torch.full((2, width), 1e3)  # masked positions must not count
    divergence[0, : len(ids)] = torch.tensor(values)
    mask = torch.zeros(2, width, dtype=torch.bool)
    mask[0, : len(ids)] = True
    return completion, divergence, mask, counts


def test_region_shares_are_hand_computed(tiny_tokenizer):
    completion, divergence, mask, counts = _solution_batch(tiny_tokenizer)
    assert counts[2] == counts[4] == 2  # digits are single tokens
    total = sum(n * v for n, v in zip(counts, PIECE_VALUES))
    stats = geometry_statistics(divergence, mask, completion, tiny_tokenizer)
    assert stats["num_tokens"] == sum(counts) + 1
    assert stats["share_last_equation_line"] == pytest.approx((counts[1] * 0.2 + 2 * 2.0) / total, rel=1e-6)
    assert stats["share_last_equation_result"] == pytest.approx(2 * 2.0 / total, rel=1e-6)
    assert stats["share_final_answer"] == pytest.approx(2 * 1.0 / total, rel=1e-6)
    assert stats["gsm8k_like_fraction"] == 0.5  # the masked row has no text
    assert stats["kl_max_over_mean"] == pytest.approx(2.0 / (total / (sum(counts) + 1)), rel=1e-6)
    # "1": twice in "12+7=19" (0.1), once in "19-5=" (0.2), in the result (2.0) and the answer (1.0); "4": 2.0 + 1.0
    top = stats["top_tokens"]
    assert [(entry["token"], entry["count"]) for entry in top[:2]] == [("1", 5), ("4", 2)]
    assert [entry["share"] for entry in top[:2]] == pytest.approx([3.4 / total, 3.0 / total], rel=1e-6)


def test_answer_regions_of_text():
    text = "12+7=19\n19-5=14\n#### 14"
    regions = answer_regions(text)
    assert [text[a:b] for a, b in regions["last_equation_line"]] == ["19-5=14"]
    assert [text[a:b] for a, b in regions["last_equation_result"]] == ["14"]
    assert regions["last_equation_result"][0][0] == text.index("=14") + 1
    assert [text[a:b] for a, b in regions["final_answer"]] == ["14"]
    assert answer_regions("no arithmetic here") == {"last_equation_line": [], "last_equation_result": [],
                                                    "final_answer": []}
    gsm8k = "She has 3*4 = <<3*4=12>>12 apples.\nThe total is 12+1 = 13\n#### 13"
    assert [gsm8k[a:b] for a, b in answer_regions(gsm8k)["last_equation_result"]] == ["13"]


def test_log_bucket_histogram_fractions_and_shares():
    values = torch.tensor([5e-5, 5e-3, 0.5, 0.5, 20.0])
    histogram = log_bucket_histogram(values)
    assert [b["bucket"] for b in histogram][0] == "[0,1e-04)" and histogram[-1]["bucket"] == "[1e+01,inf)"
    assert [b["token_fraction"] for b in histogram] == pytest.approx([0.2, 0, 0.2, 0, 0.4, 0, 0.2])
    total = values.sum().item()
    assert [b["divergence_share"] for b in histogram] == pytest.approx(
        [5e-5 / total, 0, 5e-3 / total, 0, 1.0 / total, 0, 20.0 / total], rel=1e-5
    )
    assert log_bucket_histogram(torch.tensor([1.0]))[5]["token_fraction"] == 1.0  # edges are lower-inclusive


def test_top_token_shares_sum_per_token_id(tiny_tokenizer):
    ids = torch.tensor([[10, 11, 10, 12, 13]])
    divergence = torch.tensor([[1.0, 2.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    top = top_token_shares(divergence, mask, ids, tiny_tokenizer, k=2)
    assert [entry["token"] for entry in top] == [tiny_tokenizer.decode([12]), tiny_tokenizer.decode([10])]
    assert [entry["share"] for entry in top] == pytest.approx([5 / 11, 4 / 11])
    assert [entry["count"] for entry in top] == [1, 2]


def test_recorder_logs_flat_metrics_and_writes_jsonl(tiny_tokenizer, tmp_path):
    completion, divergence, mask, _ = _solution_batch(tiny_tokenizer)
    recorder = GeometryRecorder(tiny_tokenizer, tmp_path / "geometry.jsonl")
    metrics = recorder(7, divergence, mask, completion)
    assert metrics["geometry/share_last_equation_result"] > 0.3
    assert "geometry/tokens[1e+00,1e+01)" in metrics and "geometry/share[1e-01,1e+00)" in metrics
    record = json.loads((tmp_path / "geometry.jsonl").read_text().splitlines()[0])
    assert record["step"] == 7 and record["top_tokens"][0]["token"] in {"1", "4"}
    assert flat_metrics(record)["geometry/num_tokens"] == record["num_tokens"]


def test_plot_geometry_writes_a_png(tiny_tokenizer, tmp_path):
    completion, divergence, mask, _ = _solution_batch(tiny_tokenizer)
    opsd = geometry_statistics(divergence, mask, completion, tiny_tokenizer, keep_values=True)
    opd = geometry_statistics(torch.ones_like(divergence), mask, completion, tiny_tokenizer, keep_values=True)
    assert opd["kl_max_over_mean"] == pytest.approx(1.0) and opsd["kl_max_over_mean"] > 2
    path = plot_geometry(opd, opsd, tmp_path / "plots" / "geometry.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_unified_trainer_logs_geometry_every_step(tiny_tokenizer, tmp_path):
    from trl_opsd.unified import UnifiedConfig, UnifiedTrainer

    args = UnifiedConfig(output_dir=str(tmp_path), preset="opsd", reward_weight=0.0, per_device_train_batch_size=4,
                         max_steps=2, max_new_tokens=16, report_to="none", use_cpu=True, bf16=False, logging_steps=1,
                         save_strategy="no")
    rows = problems_to_rows(generate_problems(8, "train"))
    trainer = UnifiedTrainer(model=build_tiny_model(tiny_tokenizer, seed=1), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "geometry.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["num_tokens"] > 0 and len(r["top_tokens"]) == 5 for r in records)
    assert "geometry/kl_max_over_mean" in trainer.state.log_history[0]


def test_geometry_command_pipeline_on_tiny_models(tiny_tokenizer, tmp_path):
    from harness.world.geometry import opd_and_opsd_geometry

    paths = []
    for seed in (1, 2):
        path = tmp_path / f"model{seed}"
        build_tiny_model(tiny_tokenizer, seed=seed).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        paths.append(str(path))
    opd, opsd = opd_and_opsd_geometry(paths[0], paths[1], generate_problems(6, "validation"), beta=1.0,
                                      max_new_tokens=12, sample_seed=0)
    assert opd["num_tokens"] == opsd["num_tokens"] == len(opd["values"]) > 0
    # the external teacher is another random model; the self-teacher differs only by the hint
    assert sum(opd["values"]) > 10 * sum(opsd["values"])
