"""`trl-opsd demo --quick`: the whole pipeline (warm start, arms, lm-eval, paired comparison, report) runs."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from harness.world.demo import DemoSettings, run_demo


class _Structure(HTMLParser):
    """Counts what the report page is made of, and every URL it would fetch or link to."""

    def __init__(self):
        super().__init__()
        self.tags, self.images, self.urls = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                (self.images if tag == "img" else self.urls).append(value)


def check_html_report(page):
    """Self-contained: tables, embedded PNG images only, no scripts, no external URLs."""
    text = page.read_text()
    structure = _Structure()
    structure.feed(text)
    assert structure.tags.count("table") >= 4, "paired table, buckets, concentration, samples"
    assert len(structure.images) == 3 and all(src.startswith("data:image/png;base64,") for src in structure.images)
    assert "script" not in structure.tags and not structure.urls
    assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}/", text.replace("data:image/png;base64,", ""))
    for heading in ("Held-out accuracy without the hint", "Per-token divergence concentration", "Sample completions"):
        assert heading in text, heading


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(warm_world, tmp_path):
    summary = run_demo(tmp_path, DemoSettings.quick())
    for name in ("report.md", "report.json", "forest.png", "report.html", "geometry.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    check_html_report(tmp_path / "report.html")
    # the curves come from the kept log_history (a 3-step run logs no "loss" row, only per-step statistics)
    assert {"kl_mean", "completion_length"} <= {key for row in summary["training"]["opsd_reverse_kl"] for key in row}
    # CI installs Python packages only; where Debian's chromium is present, the page must render headless
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        shot = tmp_path / "report.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1200,2400", (tmp_path / "report.html").as_uri()],
                       check=True, capture_output=True, timeout=120)
        assert shot.stat().st_size > 10_000
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
