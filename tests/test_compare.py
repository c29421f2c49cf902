"""sweeps.compare: the statistics against hand computations and scipy, then the whole
command on runs logged straight into a throwaway MLflow store with known values."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from scipy import stats

from sweeps import tracking
from sweeps.compare import (
    Comparison,
    compare,
    describe,
    holm,
    infer_direction,
    main,
    summarize,
    sweep_keys,
    ttest_groups,
)

T_0975_DF4 = 2.7764451051977987  # Student t quantile, 97.5%, 4 degrees of freedom (tables)


def test_group_ci_matches_a_hand_computation():
    x = [0.90, 0.92, 0.94, 0.91, 0.93]
    g = describe("sgd", x)
    sd = math.sqrt(sum((v - 0.92) ** 2 for v in x) / 4)  # = sqrt(0.001 / 4)
    half = T_0975_DF4 * sd / math.sqrt(5)
    assert g.n == 5
    assert g.mean == pytest.approx(0.92, abs=1e-12)
    assert g.sd == pytest.approx(0.0158113883, rel=1e-9)
    assert (g.ci_low, g.ci_high) == pytest.approx((0.92 - half, 0.92 + half), rel=1e-12)
    assert half == pytest.approx(0.0196324, rel=1e-5)


def test_group_ci_matches_scipy_and_needs_two_values():
    x = np.array([0.5, 0.7, 0.65, 0.8])
    g = describe("a", x, confidence=0.9)
    low, high = stats.t.interval(0.9, 3, loc=x.mean(), scale=stats.sem(x))
    assert (g.ci_low, g.ci_high) == pytest.approx((low, high), rel=1e-12)
    one = describe("b", [0.7])
    assert one.n == 1 and one.mean == 0.7
    assert math.isnan(one.sd) and math.isnan(one.ci_low) and math.isnan(one.ci_high)


def test_shared_seeds_give_a_paired_test_matching_a_hand_computation():
    adam = {"0": 0.95, "1": 0.96, "2": 0.94, "3": 0.97, "4": 0.95}
    sgd = {"0": 0.90, "1": 0.93, "2": 0.90, "3": 0.92, "4": 0.91}
    r = ttest_groups("adam", adam, "sgd", sgd, maximize=True)
    d = np.array([adam[s] - sgd[s] for s in "01234"])  # 0.05 0.03 0.04 0.05 0.04
    t = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    p = 2 * stats.t.sf(abs(t), 4)
    assert r.test == "paired" and r.n == 5 and r.df == 4
    assert r.diff == pytest.approx(0.042, abs=1e-12)
    assert r.statistic == pytest.approx(t, rel=1e-10)
    assert r.p == pytest.approx(p, rel=1e-10)
    half = T_0975_DF4 * d.std(ddof=1) / math.sqrt(5)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.042 - half, 0.042 + half), rel=1e-10)
    assert r.verdict == "better"
    assert ttest_groups("sgd", sgd, "adam", adam, maximize=True).verdict == "worse"
    ref = stats.ttest_rel(list(adam.values()), list(sgd.values()))
    assert r.p == pytest.approx(ref.pvalue, rel=1e-12)


def test_different_seeds_give_welch_matching_scipy_and_the_formula():
    a = {"0": 0.91, "1": 0.95, "2": 0.90, "3": 0.97}
    b = {"5": 0.89, "6": 0.93, "7": 0.92, "8": 0.88, "9": 0.94}
    r = ttest_groups("a", a, "b", b, maximize=True)
    xa, xb = np.array(list(a.values())), np.array(list(b.values()))
    va, vb = xa.var(ddof=1) / 4, xb.var(ddof=1) / 5
    t = (xa.mean() - xb.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)  # Welch-Satterthwaite
    assert r.test == "welch" and r.n == 9
    assert r.statistic == pytest.approx(t, rel=1e-10)
    assert r.df == pytest.approx(df, rel=1e-10)
    assert r.p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-10)
    assert r.p == pytest.approx(stats.ttest_ind(xa, xb, equal_var=False).pvalue, rel=1e-12)
    assert r.verdict == "not distinguishable at 5%"


def test_partly_shared_seeds_are_not_paired():
    a = {"0": 1.0, "1": 2.0, "2": 3.0}
    b = {"0": 1.5, "1": 2.5}
    assert ttest_groups("a", a, "b", b, maximize=True).test == "welch"


def test_direction_decides_the_verdict_for_losses():
    assert infer_direction("val/loss") == "minimize"
    assert infer_direction("test/acc") == "maximize"
    with pytest.raises(ValueError, match="direction"):
        infer_direction("act/1/mean")
    low = {"0": 0.10, "1": 0.12, "2": 0.11}
    high = {"0": 0.30, "1": 0.33, "2": 0.31}
    assert ttest_groups("low", low, "high", high, maximize=False).verdict == "better"


def test_degenerate_groups():
    same = {"0": 0.5, "1": 0.5}
    r = ttest_groups("a", same, "b", dict(same), maximize=True)
    assert r.diff == 0 and r.verdict == "not distinguishable at 5%"
    r = ttest_groups("a", {"0": 0.5}, "b", same, maximize=True)
    assert r.test == "none" and r.verdict.startswith("too few runs")


def test_baseline_or_all_pairs():
    noise = [0.01, -0.02, 0.015]
    s = {
        g: {str(i): v + noise[i] * k for i in range(3)}
        for k, (g, v) in enumerate((("adam", 0.9), ("momentum", 0.8), ("sgd", 0.7)), 1)
    }
    groups, tests = summarize(s, maximize=True, baseline="sgd")
    assert [g.label for g in groups] == ["adam", "momentum", "sgd"]
    assert [(t.group, t.baseline) for t in tests] == [("adam", "sgd"), ("momentum", "sgd")]
    _, tests = summarize(s, maximize=True)
    assert [(t.group, t.baseline) for t in tests] == [
        ("adam", "momentum"),
        ("adam", "sgd"),
        ("momentum", "sgd"),
    ]
    with pytest.raises(ValueError, match="unknown baseline 'rmsprop'"):
        summarize(s, maximize=True, baseline="rmsprop")


def test_holm_matches_a_hand_computation():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> the
    # running maximum 0.06 keeps the order)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    # a test without a p-value is not in the family: m = 2
    adjusted = holm([0.01, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5 x 2 capped at 1, then the running maximum
    assert holm([0.03]) == [0.03] and holm([]) == []


# Two groups each a little better than the baseline on the same four seeds: both raw p-values
# are below 0.05, Holm's are not.
BASE = {"0": 0.90, "1": 0.92, "2": 0.91, "3": 0.93}
X = {s: round(BASE[s] + d, 4) for s, d in zip("0123", (0.02, 0.01, 0.03, 0.008), strict=True)}
Y = {s: round(BASE[s] + d, 4) for s, d in zip("0123", (0.03, 0.01, 0.02, 0.01), strict=True)}


def test_holm_decides_the_verdicts_of_several_tests():
    samples = {"base": BASE, "x": X, "y": Y}
    _, tests = summarize(samples, maximize=True, baseline="base")
    px = stats.ttest_rel([X[s] for s in "0123"], [BASE[s] for s in "0123"]).pvalue
    py = stats.ttest_rel([Y[s] for s in "0123"], [BASE[s] for s in "0123"]).pvalue
    assert py < px < 0.05  # both "better" without a correction
    by = {t.group: t for t in tests}
    assert (by["x"].p, by["y"].p) == pytest.approx((px, py), rel=1e-12)
    # by hand: py is the smaller, x2; px is the larger, x1, then the running maximum
    assert by["y"].p_adj == pytest.approx(2 * py, rel=1e-12)
    assert by["x"].p_adj == pytest.approx(max(2 * py, px), rel=1e-12)
    assert by["x"].p_adj > 0.05 and by["y"].p_adj > 0.05
    assert {t.verdict for t in tests} == {"not distinguishable at 5%"}
    _, raw = summarize(samples, maximize=True, baseline="base", correction="none")
    assert [(t.verdict, t.p_adj) for t in raw] == [("better", t.p) for t in raw]
    # one test: nothing to correct
    _, one = summarize({"base": BASE, "x": X}, maximize=True)
    assert one[0].p_adj == one[0].p and one[0].verdict == "worse"  # base vs x
    with pytest.raises(ValueError, match=r"unknown correction 'bonf'; choose from \['holm'"):
        summarize(samples, maximize=True, correction="bonf")


# -- against an MLflow store ---------------------------------------------------------------

# Final val/acc per (optimizer, seed); the curves rise linearly to it over 3 epochs.
FINAL = {
    "sgd": [0.80, 0.82, 0.81, 0.79, 0.83],
    "momentum": [0.90, 0.91, 0.89, 0.92, 0.90],
    "adam": [0.93, 0.90, 0.95, 0.91, 0.94],
}


def _log_run(
    client,
    exp_id,
    optimizer,
    seed,
    final,
    *,
    status="FINISHED",
    sweep="s1",
    extra_tags=None,
    lr="0.01",
):
    tags = {
        "optimizer": optimizer,
        "init": "he",
        "seed": str(seed),
        "sweep_id": sweep,
        **(extra_tags or {}),
    }
    run = client.create_run(exp_id, tags=tags)
    rid = run.info.run_id
    metrics = [
        m
        for epoch in (1, 2, 3)
        for m in (
            Metric("val/acc", final - 0.1 * (3 - epoch), epoch, epoch),
            Metric("val/loss", 1 - final + 0.1 * (3 - epoch), epoch, epoch),
        )
    ]
    client.log_batch(
        rid, metrics=metrics, params=[Param("optimizer.lr", lr), Param("seed", str(seed))]
    )
    client.set_terminated(rid, status)
    return rid


@pytest.fixture
def store(mlflow_store):
    client = tracking.get_client(mlflow_store["uri"])
    exp_id = tracking.ensure_experiment(
        client, "sweeps", mlflow_store["artifacts"], mlflow_store["uri"]
    )
    ids = {}
    for opt, finals in FINAL.items():
        for seed, v in enumerate(finals):
            ids[opt, seed] = _log_run(client, exp_id, opt, seed, v)
    return {**mlflow_store, "client": client, "exp_id": exp_id, "ids": ids}


def test_compare_recorded_runs_gives_the_known_statistics(store):
    c = compare(by=["optimizer"], baseline="sgd", tracking_uri=store["uri"], sweep_id="s1")
    assert [g.label for g in c.groups] == ["adam", "momentum", "sgd"]
    for g in c.groups:
        ref = describe(g.label, FINAL[g.label])
        assert (g.n, g.mean, g.sd, g.ci_low, g.ci_high) == pytest.approx(
            (5, ref.mean, ref.sd, ref.ci_low, ref.ci_high), rel=1e-12
        )
        assert g.seeds == ("0", "1", "2", "3", "4")
    by_group = {t.group: t for t in c.tests}
    for opt in ("adam", "momentum"):
        ref = stats.ttest_rel(FINAL[opt], FINAL["sgd"])
        assert by_group[opt].test == "paired"
        assert by_group[opt].p == pytest.approx(ref.pvalue, rel=1e-9)
        assert by_group[opt].verdict == "better"
    assert c.notes == []


def test_best_summary_and_a_loss_metric(store):
    c = compare(by=["optimizer"], metric="val/loss", summary="best", tracking_uri=store["uri"])
    assert not c.maximize
    means = {g.label: g.mean for g in c.groups}
    assert means["sgd"] == pytest.approx(1 - np.mean(FINAL["sgd"]))
    verdicts = {(t.group, t.baseline): t.verdict for t in c.tests}
    assert verdicts["adam", "sgd"] == "better"  # lower loss


def test_selection_leaves_out_and_reports(store):
    client, exp_id = store["client"], store["exp_id"]
    _log_run(client, exp_id, "sgd", 5, 0.1, status="FAILED")
    _log_run(client, exp_id, "sgd", 0, 0.5, extra_tags={"reproduces": store["ids"]["sgd", 0]})
    _log_run(client, exp_id, "adam", 0, 0.99, sweep="s2")  # a second sweep, same seed
    _log_run(client, exp_id, "momentum", 7, 0.9, sweep="s3", lr="0.5")
    c = compare(by=["optimizer"], tracking_uri=store["uri"], baseline="sgd")
    joined = "\n".join(c.notes)
    assert "left out 1 FAILED runs" in joined
    assert "left out 1 reproductions" in joined
    assert "1 run(s) repeat a group and seed already seen (adam seed 0); the newest" in joined
    assert "group momentum: its runs also differ in optimizer.lr" in joined
    n = {g.label: g.n for g in c.groups}
    assert n == {"adam": 5, "momentum": 6, "sgd": 5}
    t = {x.group: x for x in c.tests}
    assert t["momentum"].test == "welch"  # seeds 0-4 and 7 against 0-4
    assert t["adam"].test == "paired"
    # the tag filter narrows to one sweep again
    c = compare(by=["optimizer"], tracking_uri=store["uri"], tags={"sweep_id": "s1"})
    assert {g.label: g.n for g in c.groups} == {"adam": 5, "momentum": 5, "sgd": 5}


def test_group_by_two_keys_and_by_a_param(store):
    c = compare(by=["optimizer", "init"], tracking_uri=store["uri"], baseline="sgd,he")
    assert [g.label for g in c.groups] == ["adam,he", "momentum,he", "sgd,he"]
    c = compare(by=["optimizer.lr"], tracking_uri=store["uri"])
    assert [g.label for g in c.groups] == ["0.01"] and c.groups[0].n == 5  # seeds collide
    assert any(n.startswith("10 run(s) repeat a group and seed") for n in c.notes)


def test_outputs_table_csv_figure_and_comparison_run(store, tmp_path):
    c = compare(by=["optimizer"], baseline="sgd", tracking_uri=store["uri"])
    text = c.render()
    assert "95% CI" in text and "paired (n=5)" in text and "better" in text
    assert "p adj: Holm-Bonferroni over 2 tests; the verdicts use p adj" in text
    md = c.render(markdown=True)
    assert "| group | n | mean | sd | 95% CI |" in md
    assert "| p | p adj | verdict |" in md
    out = c.write(tmp_path / "cmp")
    groups = pd.read_csv(out / "groups.csv")
    assert list(groups["group"]) == ["adam", "momentum", "sgd"]
    assert groups.loc[2, "mean"] == pytest.approx(np.mean(FINAL["sgd"]))
    tests = pd.read_csv(out / "tests.csv")
    assert set(tests["verdict"]) == {"better"}
    assert list(tests["p_adj"]) == pytest.approx(holm(list(tests["p"])), rel=1e-9)
    assert set(tests["correction"]) == {"holm"}
    assert len(pd.read_csv(out / "runs.csv")) == 15
    assert (out / "curves.png").stat().st_size > 1000
    run_id = c.log(store["uri"], "sweeps")
    run = store["client"].get_run(run_id)
    assert run.data.tags["sweeps.kind"] == "comparison"
    assert run.data.tags["compare.correction"] == "holm"
    assert run.data.metrics["sgd/mean"] == pytest.approx(np.mean(FINAL["sgd"]))
    arts = {a.path for a in store["client"].list_artifacts(run_id)}
    assert {"groups.csv", "tests.csv", "runs.csv", "curves.png", "comparison.txt"} <= arts
    # a comparison run is never itself compared
    again = compare(by=["optimizer"], tracking_uri=store["uri"])
    assert len(again.runs) == 15


def test_cli(store, tmp_path, capsys):
    rc = main(
        [
            "--tracking-uri",
            store["uri"],
            "--by",
            "optimizer",
            "--baseline",
            "sgd",
            "--sweep-id",
            "s1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "val/acc (final value per run; higher is better), 15 runs grouped by optimizer" in out
    assert "comparison recorded as MLflow run" in out
    assert (tmp_path / "o" / "groups.csv").exists()
    assert (
        main(
            [
                "--tracking-uri",
                store["uri"],
                "--by",
                "optimizer",
                "--baseline",
                "rmsprop",
                "--no-log",
            ]
        )
        == 2
    )
    assert "unknown baseline 'rmsprop'" in capsys.readouterr().err
    rc = main(
        ["--tracking-uri", store["uri"], "--by", "optimizer", "--correction", "none", "--no-log"]
    )
    assert rc == 0
    assert "no correction for multiple comparisons (p adj = p)" in capsys.readouterr().out


def test_figure_has_one_band_per_group(store):
    c = compare(by=["optimizer"], tracking_uri=store["uri"])
    fig = c.figure()
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and len(ax.collections) == 3
    adam = next(line for line in ax.lines if line.get_label().startswith("adam"))
    assert list(adam.get_xdata()) == [1, 2, 3]
    assert adam.get_ydata()[-1] == pytest.approx(np.mean(FINAL["adam"]))


def test_sweep_keys():
    assert sweep_keys(["optimizer=sgd,adam", "trainer.epochs=2", "seed=range(0,3)"]) == [
        "optimizer",
        "seed",
    ]


def test_comparison_is_importable_for_notebooks():
    assert Comparison.groups_frame and Comparison.figure


@pytest.mark.slow
def test_seeds_launches_the_repeats_then_compares(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "sweeps.compare",
        "--tracking-uri",
        mlflow_store["uri"],
        "--seeds",
        "2",
        "--baseline",
        "sgd",
        "--no-log",
        "--",
        "optimizer=sgd,adam",
        "data=synthetic",
        "trainer.epochs=1",
        "model.hidden_sizes=[8]",
        "mlflow.log_figures=false",
        "mlflow.log_model=false",
        f"mlflow.artifact_root={mlflow_store['artifacts']}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 runs grouped by optimizer" in done.stdout
    assert "paired (n=2)" in done.stdout


@pytest.mark.parametrize("killed", [False, True], ids=["jobs stopped", "jobs killed"])
def test_ctrl_c_during_the_repeats_names_the_sweep_of_the_finished_ones(
    tmp_path, monkeypatch, capsys, killed
):
    """The jobs got the Ctrl-C too and ended their runs (``procs.run_child`` waits for them);
    compare stops without a traceback and says how to compare the seeds that finished. When
    the jobs had to be killed, it does not claim their run was ended."""
    from sweeps import compare, procs

    ran = []

    def interrupted(cmd, **kwargs):
        ran.append(cmd)
        e = KeyboardInterrupt()
        if killed:
            e.add_note(f"{procs.KILLED} {cmd[0]} did not stop within 60 s")
        raise e

    monkeypatch.setattr(procs, "run_child", interrupted)
    monkeypatch.setattr(compare, "compare", lambda **k: pytest.fail("the comparison ran"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["--seeds", "3", "--baseline", "sgd", "--tracking-uri", uri, "--no-log"]
    assert compare.main([*args, "--", "optimizer=sgd,adam"]) == 130
    [cmd] = ran
    sweep_id = next(a for a in cmd if a.startswith("sweep_id=")).split("=", 1)[1]
    err = capsys.readouterr().err
    assert f"the finished ones are kept under sweep id {sweep_id}. Compare them with:" in err
    assert ("the interrupted job's run is KILLED" in err) is not killed
    assert ("were killed: the interrupted job's run stays RUNNING" in err) is killed
    assert err.endswith(
        f"python -m sweeps.compare --sweep-id {sweep_id} --by optimizer --tracking-uri {uri} "
        "--experiment sweeps --baseline sgd\n"
    )


def test_an_out_folder_it_cannot_make_stops_it_before_the_repeats(tmp_path, monkeypatch, capsys):
    from sweeps import compare

    monkeypatch.setattr(compare, "launch_repeats", lambda *a: pytest.fail("the repeats ran"))
    monkeypatch.setattr(compare, "compare", lambda **k: pytest.fail("the comparison ran"))
    taken = tmp_path / "a-file"
    taken.write_text("")
    args = ["--by", "optimizer", "--seeds", "2", "--out", str(taken / "sub"), "--", "seed=1"]
    with pytest.raises(SystemExit) as e:
        compare.main(args)
    assert e.value.code == 2
    assert f"--out {taken / 'sub'}: cannot make the folder (Not a directory)" in (
        capsys.readouterr().err
    )
    made = tmp_path / "new" / "out"
    monkeypatch.setattr(compare, "compare", lambda **k: pytest.fail("compared"))
    db = tmp_path / "m.db"
    db.write_text("")  # a store that exists (compare is stubbed: never opened)
    with pytest.raises(pytest.fail.Exception, match="compared"):
        compare.main(["--by", "optimizer", "--out", str(made), "--tracking-uri", f"sqlite:///{db}"])
    assert made.is_dir()  # made up front
