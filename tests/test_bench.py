"""The benchmark's sections run and report their rows. Timings are never asserted."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

from sweeps import bench


def _trial(start: float, end: float):
    t0 = datetime(2026, 1, 1)
    return SimpleNamespace(
        datetime_start=t0 + timedelta(seconds=start), datetime_complete=t0 + timedelta(seconds=end)
    )


def test_a_workers_rate_leaves_out_its_cold_first_trial():
    trials = [_trial(7.0, 9.0), _trial(0.0, 5.0), _trial(5.0, 7.0)]
    assert bench.worker_rate(trials) == (2, 4.0)  # from the end of the first to the last
    assert bench.worker_rate([_trial(1.0, 4.0)]) == (1, 3.0)  # its only trial: timed whole
    study = bench.StudyTiming({0: (2, 4.0), 1: (3, 3.0)}, wall=10.0)
    assert study.per_trial == pytest.approx(1 / (0.5 + 1.0))


@pytest.mark.slow
def test_the_search_section_runs_every_contender_and_reports_its_rows():
    report = bench.Report()
    tiny = ["trainer.epochs=2", "model.hidden_sizes=[8]"]
    bench.bench_search(report, repeats=1, trials=4, extra=tiny)

    rows = {t.label: t for t in report.timings}
    for name in bench.SEARCH_CONTENDERS:
        (label,) = [k for k in rows if f": {name}, seconds per trial" in k]
        assert len(rows[label].seconds) == 1 and rows[label].seconds[0] > 0, label
    (reference,) = [t for t in report.timings if "book's own loop" in t.label]
    assert len(reference.seconds) == 1 and reference.seconds[0] > 0
    ratios = {r.label: r for r in report.ratios}
    assert set(ratios) == {
        "Search, 1 worker: tracking cost per trial (tracked / untracked - 1)",
        "Search, 2 workers: tracking cost per trial (tracked / untracked - 1)",
        "Search, untracked: trials per minute, 2 workers / 1 worker",
        "Search, tracked: trials per minute, 2 workers / 1 worker",
        "Search, tracked, 1 worker: seconds per trial / the book's own loop (same repeat)",
    }
    assert all(len(r.values) == 1 and math.isfinite(r.values[0]) for r in ratios.values())
    text = bench.format_report(report, ["header"])
    assert "| Search, 1 worker: tracking cost per trial" in text and "<= 10%" in text
    assert "search" in bench.SECTIONS
