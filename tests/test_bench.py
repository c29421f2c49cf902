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


def test_a_workers_rate_leaves_out_the_cold_first_trials():
    trials = [_trial(7.0, 9.0), _trial(0.0, 5.0), _trial(5.0, 7.0)]
    assert bench.worker_rate(trials) == (2, 4.0)  # from the end of the first to the last
    assert bench.worker_rate([_trial(1.0, 4.0)]) == (1, 3.0)  # its only trial: timed whole
    # another worker's cold first trial ended at 6: this one's window starts at its 7
    warm = trials[0].datetime_complete - timedelta(seconds=3)
    assert bench.worker_rate(trials, warm) == (1, 2.0)
    # no trial of this worker ends after another's at 8.5: the window from its first end
    late = trials[0].datetime_complete - timedelta(seconds=0.5)
    assert bench.worker_rate(trials, late) == (2, 4.0)
    study = bench.StudyTiming({0: (2, 4.0), 1: (3, 3.0)}, wall=10.0)
    assert study.per_trial == pytest.approx(1 / (0.5 + 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("real_mnist", [False, True], ids=["synthetic", "and-real-mnist"])
def test_the_search_section_runs_every_contender_and_reports_its_rows(monkeypatch, real_mnist):
    from sweeps import data, writer

    if real_mnist and not data.mnist_cached():
        pytest.skip("real MNIST is not cached on this machine")
    monkeypatch.setattr(data, "mnist_cached", lambda root=None: real_mnist)
    # these tiny studies end before a helper starts: wait for it, so that it writes
    monkeypatch.setattr(writer, "WAIT_READY", True)
    report = bench.Report()
    tiny = ["trainer.epochs=2", "model.hidden_sizes=[8]"]
    bench.bench_search(report, repeats=1, trials=4, extra=tiny)

    rows = {t.label: t for t in report.timings}
    names = [*bench.SEARCH_CONTENDERS, *([bench.REAL_MNIST] if real_mnist else [])]
    assert len(rows) == len(names) + 1  # and the book's loop
    for name in names:
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
        "Search, 1 worker: MLflow calls per tracked trial (timed inside the trials: the drift "
        "between studies is not in it) / an untracked trial (same repeat)",
        "Search, 1 worker: the writer process's store work per tracked trial (made while the "
        "next trial trains, on another core) / an untracked trial (same repeat)",
    } | (
        {
            "Search, untracked, 1 worker: seconds per trial on real MNIST / on synthetic data "
            "(same repeat)"
        }
        if real_mnist
        else set()
    )
    assert any("no real-MNIST row" in note for note in report.notes) is not real_mnist
    assert all(len(r.values) == 1 and math.isfinite(r.values[0]) for r in ratios.values())
    inside = [r for label, r in ratios.items() if "MLflow calls per tracked trial" in label]
    assert inside[0].values[0] > 0  # the tracked study's trials made MLflow calls
    helper = [r for label, r in ratios.items() if "writer process's store work" in label]
    assert helper[0].values[0] > 0  # and handed writes to the writer process, which made them
    assert any(note.startswith("Search: MLflow calls per tracked trial") for note in report.notes)
    text = bench.format_report(report, ["header"])
    assert "| Search, 1 worker: tracking cost per trial" in text and "<= 10%" in text
    assert "search" in bench.SECTIONS


def _mlp_and_lean(extra=()):
    import numpy as np

    from sweeps.experiment import build_model

    cfg = bench.compose(
        ["model=mlp", "optimizer=adam", "init=he", "model.hidden_sizes=[7,5]", *extra]
    )
    model = build_model(cfg, np.random.default_rng(3), (12,))
    return cfg, model, bench.lean_mlp(cfg, model)


def test_the_lean_loop_computes_the_trainers_gradients_and_adam_steps():
    import numpy as np

    from sweeps.optim import make_optimizer

    cfg, model, lean = _mlp_and_lean()
    o = cfg.optimizer
    opt = make_optimizer("adam", lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps)
    start = [w.copy() for w in lean.W]
    rng = np.random.default_rng(0)
    x = rng.random((20, 12), dtype=np.float32)
    t = rng.integers(0, 10, 20)
    for batch in (slice(0, 8), slice(8, 16), slice(16, 20)):  # the last one short
        loss = model.gradient(x[batch], t[batch])
        assert lean.gradient(x[batch], t[batch]) == pytest.approx(loss, rel=1e-6)
        for k, layer in enumerate(model.layers[::2]):
            np.testing.assert_allclose(lean.gW[k], layer.grads["W"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(lean.gb[k], layer.grads["b"], rtol=1e-5, atol=1e-7)
        opt.step(model.flat_params, model.flat_grads)
        lean.step()
    for k, layer in enumerate(model.layers[::2]):
        np.testing.assert_allclose(lean.W[k], layer.params["W"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lean.b[k], layer.params["b"], rtol=1e-5, atol=1e-7)
    for w, w0 in zip(lean.W, start, strict=True):  # three steps moved every weight matrix
        assert np.abs(w - w0).max() > 1e-4


@pytest.mark.parametrize(
    "extra", [["activation=sigmoid"], ["optimizer=sgd"], ["weight_decay=l2"], ["batchnorm=on"]]
)
def test_the_lean_loop_refuses_a_net_it_does_not_mirror(extra):
    with pytest.raises(ValueError, match="LeanMLP mirrors"):
        _mlp_and_lean(extra)


def test_threads_limits_blas_inside_the_block_and_restores_it():
    before = bench.blas_threads()
    with bench.threads(1):
        assert bench.blas_threads() == 1
    assert bench.blas_threads() == before


def test_a_pass_without_targets_reports_its_ratios_unscored():
    n = 256
    cfg = bench.compose(bench.MLP_OVERRIDES)
    report = bench.Report()
    bench._versus_torch(
        report,
        1,
        "tiny MLP",
        cfg,
        bench.random_splits(n, (784,)),
        target=None,
        flops=bench.mlp_epoch_flops(n),
        gemm_target=None,
    )
    assert report.ratios and all(r.met is None for r in report.ratios)
    assert all(r.target.startswith("none") for r in report.ratios)
    rows = [line for line in bench.format_report(report, []).splitlines() if "| tiny MLP" in line]
    assert rows and not any(line.endswith(("| yes |", "| NO |")) for line in rows)
    labels = {t.label for t in report.timings}
    assert "tiny MLP: lean NumPy loop (LeanMLP), training iterations" in labels
    assert any(note.startswith("GEMM rate next to tiny MLP:") for note in report.notes)


def test_the_trial_clock_counts_outermost_mlflow_calls_inside_trials(monkeypatch):
    ticks = iter(range(1000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(ticks)))
    clock = bench.TrialClock()
    call = clock._call(lambda: None)
    nested = clock._call(lambda: call())  # an MLflow method calling another
    call()  # outside a trial: not counted
    assert clock.seconds == 0
    clock._trial(lambda: (call(), nested()))()
    assert clock.trials == 1 and clock.seconds == 2  # one tick each, the inner call not again
    assert clock.per_trial == 2


def test_the_trial_clock_wraps_mlflow_and_the_search_only_while_installed():
    from mlflow import MlflowClient

    from sweeps import search as S

    before = (MlflowClient.create_run, MlflowClient.log_batch, S.Search.run_trial)
    with bench.TrialClock().installed():
        assert MlflowClient.create_run.__wrapped__ is before[0]
        assert MlflowClient.log_batch.__wrapped__ is before[1]
        assert S.Search.run_trial.__wrapped__ is before[2]
    assert (MlflowClient.create_run, MlflowClient.log_batch, S.Search.run_trial) == before


@pytest.mark.parametrize("content", [None, "a README without the bench block\n"])
def test_a_readme_it_cannot_write_its_table_into_stops_it_before_any_work(
    monkeypatch, tmp_path, content
):
    def work(*_):
        raise AssertionError("a section ran")

    monkeypatch.setattr(bench, "SECTIONS", dict.fromkeys(bench.SECTIONS, work))
    monkeypatch.setattr(bench, "import_torch", lambda: pytest.fail("the bench started"))
    readme = tmp_path / "README.md"
    if content is not None:
        readme.write_text(content)
    expected = "no <!-- bench:start -->" if content else "cannot read"
    with pytest.raises(SystemExit, match=expected) as e:
        bench.main(["--sections", "mlp", "--readme", str(readme)])
    assert str(readme) in str(e.value)
    if content is not None:
        assert readme.read_text() == content


@pytest.mark.parametrize(
    ("until", "expected"),
    [(None, 4), (math.inf, 4), (-math.inf, 2)],
    ids=["no deadline", "deadline far off", "deadline passed"],
)
def test_alternate_stops_repeating_at_its_deadline_after_the_repeats_it_must_run(
    monkeypatch, until, expected
):
    monkeypatch.setattr(bench, "PAUSE", 0.0)
    calls: list[str] = []
    contenders = {name: lambda name=name: calls.append(name) or len(calls) for name in "abc"}

    results = bench.alternate(contenders, repeats=4, warmup=False, until=until, at_least=2)

    assert {len(v) for v in results.values()} == {expected}
    assert calls[:6] == ["a", "b", "c", "b", "c", "a"]  # the order rotates every repeat
    assert len(calls) == 3 * expected


@pytest.mark.parametrize("budget", ["-1", "nan", "five"])
def test_a_budget_that_is_not_seconds_stops_it_before_any_work(monkeypatch, capsys, budget):
    monkeypatch.setattr(bench, "SECTIONS", dict.fromkeys(bench.SECTIONS, pytest.fail))
    monkeypatch.setattr(bench, "import_torch", lambda: pytest.fail("the bench started"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--sections", "mlp", "--budget", budget])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--budget" in err and budget in err


def test_a_search_past_the_budget_runs_two_repeats_and_says_so(monkeypatch):
    from sweeps import data

    monkeypatch.setattr(bench, "PAUSE", 0.0)
    monkeypatch.setattr(data, "mnist_cached", lambda root=None: False)
    studies: list[tuple[int, bool]] = []

    def run_study(root, workers, tracked, n, extra):
        studies.append((workers, tracked))
        spans = {w: (n - 1, 0.4 * (n - 1)) for w in range(workers)}
        return bench.StudyTiming(spans, wall=10.0, mlflow_per_trial=0.01, writer_per_trial=0.05)

    monkeypatch.setattr(bench, "run_study", run_study)
    monkeypatch.setattr(bench, "book_loop_seconds", lambda cfg, trials, seed: 1.3)
    report = bench.Report(until=-math.inf)  # already past: only the repeats it must run

    bench.bench_search(report, repeats=3)

    assert len(studies) == 2 * len(bench.SEARCH_CONTENDERS)
    assert {len(t.seconds) for t in report.timings} == {2}
    assert {len(r.values) for r in report.ratios} == {2}
    (note,) = [n for n in report.notes if n.startswith("Search: 2 repeats")]
    assert "(of 3, 1 fewer to stay within --budget)" in note
