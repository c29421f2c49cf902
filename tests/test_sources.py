"""The source-systems report (sweeps.sources) on runs with known values."""

from __future__ import annotations

import csv
import io
import shutil
import statistics

import pytest
from mlflow import MlflowClient

from sweeps import sources, tracking
from sweeps.config import conf_dir

OVERLAYS = {p.stem for p in (conf_dir() / "experiment").glob("*.yaml")}
SOURCE_OVERLAYS = {
    "book_ch04",
    "book_ch04_numerical",
    "book_ch05",
    "myonn",
    "myonn_notebook",
    "dlwp_naive",
    "keras_mlp",
    "keras_mlp_cookbook",
    "simple_cnn",
    "deep_cnn",
}


def test_every_source_system_is_an_overlay_and_in_the_report():
    assert {s.overlay for s in sources.SYSTEMS} == SOURCE_OVERLAYS
    assert SOURCE_OVERLAYS <= OVERLAYS
    for s in sources.SYSTEMS:
        for f in s.figures:
            assert f.value is None or 0 < f.value < 1
            assert f.source and f.text


def add_run(uri, artifacts, overlay, seed, metrics, status="FINISHED", history=None, extra=""):
    """A run as sweeps.run records it: the experiment and overrides tags, the seed param,
    final metrics."""
    overrides = f"seed={seed} experiment={overlay} mlflow.experiment_name=sources {extra}"
    tags = {"experiment": overlay, "overrides": overrides.strip()}
    ctx = tracking.open_run(uri, "sources", artifacts, tags=tags)
    if status == "FAILED":
        with pytest.raises(RuntimeError), ctx as run:
            run.log_params({"seed": seed})
            raise RuntimeError("boom")
        return
    with ctx as run:
        run.log_params({"seed": seed})
        for key, values in (history or {}).items():
            for step, v in enumerate(values, 1):
                run.log_metrics({key: v}, step=step)
        run.log_metrics(metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory, _mlflow_template):
    root = tmp_path_factory.mktemp("sources-store")
    shutil.copy(_mlflow_template, root / "mlflow.db")
    uri, art = f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")
    add_run(uri, art, "book_ch04", 0, {"test/acc": 0.95})
    add_run(uri, art, "book_ch04", 1, {"test/acc": 0.10})  # replaced by the rerun below
    add_run(uri, art, "book_ch04", 1, {"test/acc": 0.94})
    add_run(uri, art, "book_ch04", 2, {"test/acc": 0.96})
    add_run(
        uri, art, "book_ch04", 2, {"test/acc": 0.5}, extra="optimizer.lr=0.5"
    )  # not the overlay
    add_run(uri, art, "book_ch04", 3, {}, status="FAILED")
    add_run(uri, art, "book_ch05", 0, {"test/acc": 0.5})  # another overlay: not mixed in
    for overlay, times in (("book_ch04_numerical", [20.0, 30.0]), ("book_ch04", [4e-4, 2e-4])):
        add_run(uri, art, overlay, 7, {"test/acc": 0.9}, history={"time/step": times})
    add_run(
        uri,
        art,
        "keras_mlp_cookbook",
        0,
        {"test/acc": 0.97},
        history={"val/acc": [0.5] * 49 + [0.8] + [0.9] * 450},
    )
    return {"uri": uri}


def rows_by(store):
    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("sources")
    rows = sources.collect(client, exp.experiment_id)
    return {(r.system.overlay, r.figure.step): r for r in rows}


def test_mean_spread_and_difference_from_the_latest_finished_run_per_seed(store):
    row = rows_by(store)[("book_ch04", None)]
    # seeds 0, 1 (rerun), 2 and 7 (the timing run); the first seed-1 run, the FAILED one and
    # the one with a changed learning rate are left out
    assert row.got.seeds == [0, 1, 2, 7]
    values = [0.95, 0.94, 0.96, 0.9]
    assert row.got.values == pytest.approx(values)
    assert row.got.mean == pytest.approx(statistics.fmean(values))
    assert row.got.sd == pytest.approx(statistics.stdev(values))
    assert row.difference == pytest.approx(100 * (statistics.fmean(values) - 0.9465))
    assert rows_by(store)[("book_ch05", None)].got.values == [0.5]
    assert rows_by(store)[("myonn", None)].got.n == 0


def test_a_figure_at_an_epoch_reads_the_metric_history(store):
    rows = rows_by(store)
    assert rows[("keras_mlp_cookbook", 50)].got.values == [pytest.approx(0.8)]
    assert rows[("keras_mlp_cookbook", 500)].got.values == [pytest.approx(0.9)]
    assert rows[("keras_mlp_cookbook", 50)].difference == pytest.approx(100 * (0.8 - 0.7792))


def test_numerical_gradient_row_compares_mean_time_per_update_with_backprop(store):
    row = rows_by(store)[("book_ch04_numerical", None)]
    assert row.got.values == [pytest.approx(25.0)]  # mean over its epochs
    assert row.baseline.values == [pytest.approx(3e-4)]
    assert row.difference is None
    assert sources.reproduced_text(row) == "25.0 s per update; backprop 300 µs, 83,333x faster"


def test_table_csv_and_readme_block(store, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- sources:start -->\nold\n<!-- sources:end -->\nrest\n")
    out_csv = tmp_path / "t.csv"
    args = ["--tracking-uri", store["uri"], "--csv", str(out_csv), "--readme", str(readme)]
    assert sources.main(args) == 0
    table = capsys.readouterr().out
    line = next(x for x in table.splitlines() if "`book_ch04`" in x)
    assert "| 94.65: test 0.9465" in line and "93.75 ± 2.63 (n=4, 90.00–96.00)" in line
    assert "| -0.90 |" in line
    assert "| not run |" in next(x for x in table.splitlines() if "`myonn`" in x)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- sources:start -->\n| system |") and text.endswith(
        "<!-- sources:end -->\nrest\n"
    )
    assert "old" not in text
    by_overlay = {
        (r["overlay"], r["step"]): r for r in csv.DictReader(io.StringIO(out_csv.read_text()))
    }
    r = by_overlay[("book_ch04", "")]
    assert (r["n"], r["seeds"]) == ("4", "0 1 2 7")
    assert float(r["mean"]) == pytest.approx(0.9375)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ("experiment=myonn", True),
        (
            "seed=2 experiment=myonn mlflow.tracking_uri=sqlite\\:////x/m.db hydra.verbose=true",
            True,
        ),
        ("experiment=myonn optimizer.lr=0.3", False),
        ("experiment=myonn +trainer.foo=1", False),
        (None, False),
    ],
)
def test_only_runs_of_the_unmodified_overlay_count(overrides, expected):
    class Run:
        class data:
            tags = {} if overrides is None else {"overrides": overrides}

    assert sources.as_published(Run) is expected


def test_unknown_experiment_is_an_error_naming_what_exists(store, capsys):
    assert sources.main(["--tracking-uri", store["uri"], "--experiment-name", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "sources" in err


def test_a_readme_without_the_block_stops_the_report_before_it_reads_the_store(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(tracking, "get_client", lambda *_: pytest.fail("the store was read"))
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match=r"README\.md has no <!-- sources:start -->"):
        sources.main(["--readme", str(readme)])
    with pytest.raises(SystemExit, match=r"cannot read .*missing\.md"):
        sources.main(["--readme", str(tmp_path / "missing.md")])
    assert readme.read_text() == "no markers here\n"


def test_a_readme_without_the_block_is_an_error_and_left_alone(tmp_path):
    from sweeps.readme import replace_block

    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(
        SystemExit, match=r"has no <!-- sources:start --> \.\.\. <!-- sources:end --> block"
    ):
        replace_block(readme, "sources", "table")
    assert readme.read_text() == "no markers here\n"
