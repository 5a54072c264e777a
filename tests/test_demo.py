"""`trl-opsd demo --quick`: the whole pipeline (warm start, arms, lm-eval, paired comparison, report) runs."""

import json

import pytest

from harness.world.demo import DemoSettings, run_demo


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(warm_world, tmp_path):
    summary = run_demo(tmp_path, DemoSettings.quick())
    for name in ("report.md", "report.json", "forest.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "report.json").read_text())
    section = report["comparison"]["sections"][0]
    runs = [row["run"] for row in section["runs"]]
    assert runs[0] == "start" and "opsd_reverse_kl" in runs and "opd_reverse_kl" in runs
    assert section["n"] == DemoSettings.quick().eval_limit
    assert set(summary["concentration"]) >= {"opsd_reverse_kl", "opd_reverse_kl"}


@pytest.mark.parametrize(
    ("jobs", "cores", "expected"),
    [(5, 2, (2, 1)), (1, 8, (1, 8)), (4, 16, (4, 4)), (3, 8, (3, 2)), (0, 4, (1, 4))],
)
def test_workers_share_the_cores_without_oversubscribing(jobs, cores, expected):
    from harness.world.parallel import plan_workers

    workers, threads = plan_workers(jobs, cores)
    assert (workers, threads) == expected and workers * threads <= cores
