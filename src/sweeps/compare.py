"""``python -m sweeps.compare``: multi-seed comparison of recorded runs, with confidence
intervals and t-tests.

    # runs already recorded: one sweep, grouped by optimizer, each group against SGD
    python -m sweeps.compare --by optimizer --sweep-id sweep-1a2b3c4d5e --baseline sgd
    # or launch the repeats first: 5 seeds of each optimizer, then compare them
    python -m sweeps.compare --seeds 5 --baseline sgd -- \
        optimizer=sgd,momentum,adam trainer.epochs=5

Selection: FINISHED runs of the given experiments, narrowed by ``--sweep-id``, ``--tag k=v``
and a raw MLflow ``--filter``. Comparison runs and reproductions (tag ``reproduces``) are
left out; other exclusions are listed under "notes".

Groups: runs with equal values of the ``--by`` keys (group choices such as ``optimizer`` are
tags; any config key such as ``optimizer.lr`` is read from the params). Each run contributes
one number, the metric's ``final`` value (at the last step) or its ``best`` over the steps.

Per group: n, mean, sample standard deviation and the confidence interval
mean +/- t(1 - alpha/2, n - 1) * sd / sqrt(n) (95% by default).

Tests: with ``--baseline``, every other group against the baseline; without, every pair.
Two groups that have runs for exactly the same set of seeds (n >= 2) get a paired t-test on
the per-seed differences (scipy.stats.ttest_rel); otherwise Welch's t-test
(scipy.stats.ttest_ind, equal_var=False). "diff" is group minus baseline (or first minus
second), with the test's confidence interval. The verdict reads from the group's side:
"better" or "worse" when the adjusted p < alpha (using the metric's direction: higher is
better for accuracies, lower for losses, or ``--direction``), else "not distinguishable at 5%".

Multiple comparisons: with two or more tests (three or more groups), the p-values are
adjusted with Holm's step-down method (Holm-Bonferroni, which controls the family-wise error
rate at alpha) over the tests that have a p-value, and the verdicts use the adjusted p.
The tables and tests.csv show the raw ``p`` and the adjusted ``p_adj``; the confidence
intervals of the differences are not adjusted. ``--correction none`` turns it off.

Outputs: the tables in the terminal (``--markdown`` for Markdown), ``--out DIR`` for
groups.csv, tests.csv, runs.csv and curves.png (the metric per step, per group: mean and
confidence band over seeds), and an MLflow comparison run holding the same files
(``--no-log`` to skip). In a notebook: ``c = compare(by=["optimizer"], sweep_id=...)``, then
``c.groups_frame()``, ``c.tests_frame()``, ``c.figure()``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import re
import shlex
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sweeps import procs, stores
from sweeps.diff import default_tracking_uri

log = logging.getLogger("sweeps.compare")

COMPARISON_KIND = "comparison"  # value of the ``sweeps.kind`` tag on a comparison run
# Params that vary between the repeats of one configuration by design.
PER_REPEAT = ("seed", "sweep_id", "experiment")
CORRECTIONS = ("holm", "none")


# -- statistics ------------------------------------------------------------------------------


def infer_direction(metric: str) -> str:
    """'maximize' for accuracies, 'minimize' for losses, errors and times."""
    name = metric.lower()
    if any(w in name for w in ("loss", "error", "time", "dead", "saturated")):
        return "minimize"
    if any(w in name for w in ("acc", "score", "f1", "auc", "precision", "recall")):
        return "maximize"
    raise ValueError(
        f"cannot tell whether {metric!r} should be high or low; "
        "pass direction='maximize' or 'minimize'"
    )


@dataclass(frozen=True)
class GroupStats:
    label: str
    n: int
    mean: float
    sd: float  # sample standard deviation (ddof=1); nan for n = 1
    ci_low: float
    ci_high: float
    seeds: tuple[str, ...] = ()


def describe(
    label: str, values: Sequence[float], confidence: float = 0.95, seeds: Sequence[str] = ()
) -> GroupStats:
    """n, mean, sd and the t-interval of the mean (nan bounds for n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError(f"group {label!r} has no values")
    mean = float(x.mean())
    if n < 2:
        return GroupStats(label, n, mean, math.nan, math.nan, math.nan, tuple(seeds))
    sd = float(x.std(ddof=1))
    from scipy import stats  # here: 0.6 s to import, which a single value does not need

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return GroupStats(label, n, mean, sd, mean - half, mean + half, tuple(seeds))


@dataclass(frozen=True)
class PairTest:
    group: str
    baseline: str
    test: str  # "paired" | "welch" | "none"
    n: int  # pairs for a paired test, runs in both groups for Welch
    diff: float  # mean(group) - mean(baseline)
    ci_low: float
    ci_high: float
    statistic: float
    df: float
    p: float
    verdict: str
    p_adj: float = math.nan  # p adjusted for multiple comparisons (= p for a single test)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979): sort the m p-values ascending, multiply the
    i-th smallest (i = 1..m) by m - i + 1, carry the running maximum so the order is kept,
    and cap at 1. NaN p-values (no test) are left out of m and stay NaN."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, (m - rank) * pvalues[i])
        out[i] = min(1.0, running)
    return out


def verdict(diff: float, p: float, maximize: bool, alpha: float) -> str:
    if not p < alpha:  # also p = nan: no variance and no difference
        return f"not distinguishable at {alpha * 100:g}%"
    return "better" if (diff > 0) == maximize else "worse"


def ttest_groups(
    label: str,
    a: Mapping[str, float],
    baseline: str,
    b: Mapping[str, float],
    *,
    maximize: bool,
    alpha: float = 0.05,
) -> PairTest:
    """Compare group ``a`` with group ``b`` (both {seed: value}).

    Same seed set (n >= 2): paired t-test on a[s] - b[s]. Otherwise Welch's t-test.
    """
    from scipy import stats

    confidence = 1 - alpha
    diff = float(np.mean(list(a.values())) - np.mean(list(b.values())))
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        res = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
        kind, n = "paired", len(seeds)
    elif len(a) >= 2 and len(b) >= 2:
        res = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
        kind, n = "welch", len(a) + len(b)
    else:
        nan = math.nan
        return PairTest(
            label, baseline, "none", len(a) + len(b), diff,
            ci_low=nan, ci_high=nan, statistic=nan, df=nan, p=nan,
            verdict="too few runs (need 2 per group)",
        )  # fmt: skip
    ci = res.confidence_interval(confidence)
    p = float(res.pvalue)
    return PairTest(
        label, baseline, kind, n, diff,
        ci_low=float(ci.low), ci_high=float(ci.high), statistic=float(res.statistic),
        df=float(res.df), p=p, verdict=verdict(diff, p, maximize, alpha), p_adj=p,
    )  # fmt: skip


def summarize(
    samples: Mapping[str, Mapping[str, float]],
    *,
    maximize: bool,
    baseline: str | None = None,
    alpha: float = 0.05,
    correction: str = "holm",
) -> tuple[list[GroupStats], list[PairTest]]:
    """Per-group statistics and the tests, from {group label: {seed: value}}.

    With ``baseline``: each other group against it. Without: every pair, in label order.
    ``correction="holm"``: the verdicts use Holm-adjusted p-values (``p_adj``)."""
    labels = sorted(samples)
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose from {list(CORRECTIONS)}")
    if baseline is not None and baseline not in samples:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {labels}")
    groups = [describe(g, list(samples[g].values()), 1 - alpha, list(samples[g])) for g in labels]
    if baseline is not None:
        pairs = [(g, baseline) for g in labels if g != baseline]
    else:
        pairs = list(itertools.combinations(labels, 2))
    tests = [
        ttest_groups(g, samples[g], h, samples[h], maximize=maximize, alpha=alpha) for g, h in pairs
    ]
    if correction == "holm":
        adjusted = holm([t.p for t in tests])
        tests = [
            t if t.test == "none" else replace(
                t, p_adj=q, verdict=verdict(t.diff, q, maximize, alpha)
            )
            for t, q in zip(tests, adjusted, strict=True)
        ]  # fmt: skip
    return groups, tests


# -- selecting runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunValue:
    run_id: str
    label: str
    seed: str
    value: float
    steps: tuple[int, ...]  # the metric's history, for the curves
    values: tuple[float, ...]


def summary_value(values: Sequence[float], summary: str, maximize: bool) -> float:
    if summary == "final":
        return float(values[-1])
    if summary == "best":
        return float(np.nanmax(values) if maximize else np.nanmin(values))
    raise ValueError(f"unknown summary {summary!r}; choose from ['final', 'best']")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _filter_string(sweep_id: str | None, tags: Mapping[str, str], extra: str) -> str:
    parts = [f"tags.sweep_id = {_quote(sweep_id)}"] if sweep_id else []
    parts += [f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()]
    if extra:
        parts.append(extra)
    return " and ".join(parts)


def _seed_key(seed: str) -> tuple[int, Any]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


# -- the comparison ----------------------------------------------------------------------------


@dataclass
class Comparison:
    metric: str
    summary: str
    maximize: bool
    by: tuple[str, ...]
    alpha: float
    baseline: str | None
    groups: list[GroupStats]
    tests: list[PairTest]
    runs: list[RunValue]
    selection: str  # how the runs were picked, in words
    experiment_id: str | None = None
    notes: list[str] = field(default_factory=list)
    correction: str = "holm"

    @property
    def confidence(self) -> float:
        return 1 - self.alpha

    @property
    def n_tested(self) -> int:
        """The size of the family the correction runs over: the tests with a p-value."""
        return sum(not math.isnan(t.p) for t in self.tests)

    def correction_text(self) -> str:
        if self.correction == "none":
            return "no correction for multiple comparisons (p adj = p)"
        if self.n_tested < 2:
            return "a single test, so no correction for multiple comparisons (p adj = p)"
        return (
            f"p adj: Holm-Bonferroni over {self.n_tested} tests; the verdicts use p adj, "
            "the CIs of the differences are not adjusted"
        )

    def groups_frame(self):
        import pandas as pd

        pct = f"{self.confidence * 100:g}"
        rows = [
            {
                "group": g.label,
                "n": g.n,
                "mean": g.mean,
                "sd": g.sd,
                f"ci{pct}_low": g.ci_low,
                f"ci{pct}_high": g.ci_high,
                "seeds": " ".join(g.seeds),
            }
            for g in self.groups
        ]
        return pd.DataFrame(rows)

    def tests_frame(self):
        import pandas as pd

        pct = f"{self.confidence * 100:g}"
        rows = [
            {
                "group": t.group,
                "baseline": t.baseline,
                "test": t.test,
                "n": t.n,
                "diff": t.diff,
                f"ci{pct}_low": t.ci_low,
                f"ci{pct}_high": t.ci_high,
                "t": t.statistic,
                "df": t.df,
                "p": t.p,
                "p_adj": t.p_adj,
                "correction": self.correction if self.n_tested >= 2 else "none",
                "verdict": t.verdict,
            }
            for t in self.tests
        ]
        return pd.DataFrame(rows)

    def runs_frame(self):
        import pandas as pd

        rows = [
            {"run_id": r.run_id, "group": r.label, "seed": r.seed, "value": r.value}
            for r in self.runs
        ]
        return pd.DataFrame(rows)

    def render(self, markdown: bool = False) -> str:
        pct = f"{self.confidence * 100:g}%"
        better = "higher" if self.maximize else "lower"
        out = [
            f"{self.metric} ({self.summary} value per run; {better} is better), "
            f"{len(self.runs)} runs grouped by {', '.join(self.by)}; {self.selection}",
            "",
        ]
        rows = [
            [g.label, str(g.n), _f(g.mean), _f(g.sd), f"[{_f(g.ci_low)}, {_f(g.ci_high)}]"]
            for g in self.groups
        ]
        out.append(table(["group", "n", "mean", "sd", f"{pct} CI"], rows, markdown))
        if self.tests:
            against = f"against baseline {self.baseline}" if self.baseline else "every pair"
            out += [
                "",
                f"tests, {against} (paired t-test on per-seed differences when both groups "
                "have the same seeds, else Welch's t-test; diff = group - vs);",
                self.correction_text() + ":",
                "",
            ]
            rows = [
                [
                    t.group,
                    t.baseline,
                    t.test + (f" (n={t.n})" if t.test == "paired" else ""),
                    _f(t.diff, signed=True),
                    f"[{_f(t.ci_low, signed=True)}, {_f(t.ci_high, signed=True)}]",
                    _p(t.p),
                    _p(t.p_adj),
                    t.verdict,
                ]
                for t in self.tests
            ]
            out.append(
                table(
                    ["group", "vs", "test", "diff", f"{pct} CI of diff", "p", "p adj", "verdict"],
                    rows,
                    markdown,
                )
            )
        if self.notes:
            out += ["", *[f"note: {n}" for n in self.notes]]
        return "\n".join(out)

    def figure(self):
        """The metric per step for each group: mean over seeds and its confidence band."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        import sweeps.plots  # noqa: F401  (selects the Agg backend)

        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        for g in self.groups:
            runs = [r for r in self.runs if r.label == g.label]
            steps = sorted({s for r in runs for s in r.steps})
            mean, low, high = [], [], []
            for s in steps:
                ys = [v for r in runs for st, v in zip(r.steps, r.values, strict=True) if st == s]
                d = describe(g.label, ys, self.confidence)
                mean.append(d.mean)
                low.append(d.ci_low)
                high.append(d.ci_high)
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{g.label} (n={g.n})")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, lw=0)
        ax.set(
            xlabel="iteration" if "batch" in self.metric else "epoch",
            ylabel=self.metric,
            title=f"{self.metric}: mean and {self.confidence * 100:g}% CI over seeds",
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        return fig

    def write(self, out_dir: str | Path) -> Path:
        """groups.csv, tests.csv, runs.csv, comparison.txt and curves.png in ``out_dir``."""
        from sweeps.plots import close

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.groups_frame().to_csv(d / "groups.csv", index=False)
        self.tests_frame().to_csv(d / "tests.csv", index=False)
        self.runs_frame().to_csv(d / "runs.csv", index=False)
        (d / "comparison.txt").write_text(self.render() + "\n")
        fig = self.figure()
        fig.savefig(d / "curves.png", dpi=120)
        close(fig)
        return d

    def log(self, tracking_uri: str, experiment_name: str) -> str:
        """Record this comparison as an MLflow run (tag ``sweeps.kind=comparison``): the
        tables as CSV artifacts, the figure, and per group ``<group>/mean``, ``/sd``,
        ``/ci_low``, ``/ci_high``, ``/n`` as metrics. Returns the run id."""
        from sweeps import tracking
        from sweeps.config import MlflowConf

        ids = ",".join(r.run_id for r in self.runs)
        tags = {
            "sweeps.kind": COMPARISON_KIND,
            "compare.metric": self.metric,
            "compare.summary": self.summary,
            "compare.by": ",".join(self.by),
            "compare.baseline": self.baseline or "(all pairs)",
            "compare.correction": self.correction if self.n_tested >= 2 else "none",
            "compare.selection": self.selection[:5000],
            "compare.runs": ids if len(ids) <= 5000 else f"{len(self.runs)} runs, see runs.csv",
        }
        name = f"compare-{self.metric}-by-{'-'.join(self.by)}"
        with tracking.open_run(
            tracking_uri, experiment_name, MlflowConf().artifact_root, run_name=name, tags=tags
        ) as run:
            for frame, path in (
                (self.groups_frame(), "groups.csv"),
                (self.tests_frame(), "tests.csv"),
                (self.runs_frame(), "runs.csv"),
            ):
                run.log_text(frame.to_csv(index=False), path)
            run.log_text(self.render() + "\n", "comparison.txt")
            run.log_figure(self.figure(), "curves.png")
            metrics = {}
            for g in self.groups:
                key = _metric_key(g.label)
                for stat in ("mean", "sd", "ci_low", "ci_high", "n"):
                    value = getattr(g, stat)
                    if not (isinstance(value, float) and math.isnan(value)):
                        metrics[f"{key}/{stat}"] = value
            run.log_metrics(metrics)
            return run.run_id


def _metric_key(label: str) -> str:
    return re.sub(r"[^\w\-. :/]", "_", label)


def _f(v: float, signed: bool = False) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool = False) -> str:
    """Aligned text columns (numbers right-aligned), or a Markdown table."""
    rows = [list(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    numeric = [all(_numeric(r[i]) for r in rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        )

    return "\n".join(line(r).rstrip() for r in [list(header), *rows])


def _numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+]?(\d+(\.\d*)?(e[-+]?\d+)?|-)", cell))


def compare(
    *,
    by: Sequence[str],
    metric: str = "val/acc",
    summary: str = "final",
    direction: str = "auto",
    baseline: str | None = None,
    alpha: float = 0.05,
    correction: str = "holm",
    tracking_uri: str | None = None,
    experiments: Sequence[str] = ("sweeps",),
    sweep_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    filter_string: str = "",
) -> Comparison:
    """Select runs, group them by ``by`` and compare ``metric`` across groups (see the
    module docstring). ``baseline`` is a group label: the value of the single ``by`` key
    (``"sgd"``), or values joined by commas for several keys (``"sgd,he"``)."""
    from sweeps.tracking import get_client, search_all_runs

    if not by:
        raise ValueError("group by at least one key, e.g. by=['optimizer']")
    if direction == "auto":
        direction = infer_direction(metric)
    if direction not in ("maximize", "minimize"):
        raise ValueError(
            f"unknown direction {direction!r}; choose from ['auto', 'maximize', 'minimize']"
        )
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; choose from {list(CORRECTIONS)}")
    maximize = direction == "maximize"
    client = get_client(tracking_uri or default_tracking_uri())
    exp_ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(
                f"no experiment named {name!r} in {tracking_uri or default_tracking_uri()}"
            )
        exp_ids.append(exp.experiment_id)
    filt = _filter_string(sweep_id, dict(tags or {}), filter_string)
    found = search_all_runs(client, exp_ids, filt)
    selection = f"experiment {', '.join(experiments)}" + (f", filter: {filt}" if filt else "")

    notes: list[str] = []
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    picked: dict[tuple[str, str], Any] = {}  # (label, seed) -> newest run
    duplicates: list[str] = []
    params_by_label: dict[str, list[dict[str, str]]] = {}
    for run in found:
        t, p = run.data.tags, run.data.params
        if t.get("sweeps.kind") == COMPARISON_KIND:
            continue
        if "reproduces" in t:
            skip("reproductions (tag reproduces)")
            continue
        if run.info.status != "FINISHED":
            skip(f"{run.info.status} runs")
            continue
        values = [t.get(k, p.get(k)) for k in by]
        if any(v is None for v in values):
            skip(f"runs without {'/'.join(by)}")
            continue
        seed = t.get("seed", p.get("seed"))
        if seed is None:
            skip("runs without a seed")
            continue
        if metric not in run.data.metrics:
            skip(f"runs without {metric}")
            continue
        label = ",".join(str(v) for v in values)
        key = (label, seed)
        if key in picked:
            duplicates.append(f"{label} seed {seed}")
            picked[key] = max(picked[key], run, key=lambda r: r.info.start_time)
        else:
            picked[key] = run
    for reason, count in sorted(skipped.items()):
        notes.append(f"left out {count} {reason}")
    if duplicates:
        shown = ", ".join(sorted(set(duplicates))[:5]) + (
            " ..." if len(set(duplicates)) > 5 else ""
        )
        notes.append(
            f"{len(duplicates)} run(s) repeat a group and seed already seen ({shown}); "
            "the newest run of each was used (narrow the selection, e.g. with --sweep-id)"
        )
    if not picked:
        raise ValueError(f"no runs with {metric} match ({selection})")

    runs: list[RunValue] = []
    for (label, seed), run in sorted(
        picked.items(), key=lambda kv: (kv[0][0], _seed_key(kv[0][1]))
    ):
        hist = sorted(
            client.get_metric_history(run.info.run_id, metric), key=lambda m: (m.step, m.timestamp)
        )
        steps = tuple(m.step for m in hist)
        vals = tuple(float(m.value) for m in hist)
        runs.append(
            RunValue(
                run.info.run_id, label, seed, summary_value(vals, summary, maximize), steps, vals
            )
        )
        params_by_label.setdefault(label, []).append(dict(run.data.params))
    notes += _mixed_configs(params_by_label)

    samples: dict[str, dict[str, float]] = {}
    for r in runs:
        samples.setdefault(r.label, {})[r.seed] = r.value
    groups, tests = summarize(
        samples, maximize=maximize, baseline=baseline, alpha=alpha, correction=correction
    )
    exp_of = {run.info.experiment_id for run in picked.values()}
    return Comparison(
        metric=metric,
        summary=summary,
        maximize=maximize,
        by=tuple(by),
        alpha=alpha,
        baseline=baseline,
        groups=groups,
        tests=tests,
        runs=runs,
        selection=selection,
        experiment_id=exp_of.pop() if len(exp_of) == 1 else None,
        notes=notes,
        correction=correction,
    )


def _mixed_configs(params_by_label: Mapping[str, list[dict[str, str]]]) -> list[str]:
    """A note per group whose runs differ in more than the seed: they are pooled anyway."""
    notes = []
    for label, plist in params_by_label.items():
        keys = sorted({k for p in plist for k in p})
        varying = [
            k
            for k in keys
            if k not in PER_REPEAT
            and not k.startswith("mlflow.")
            and len({p.get(k) for p in plist}) > 1
        ]
        if varying:
            shown = ", ".join(varying[:8]) + (" ..." if len(varying) > 8 else "")
            notes.append(
                f"group {label}: its runs also differ in {shown}; they are pooled as repeats"
            )
    return notes


# -- launching repeats -------------------------------------------------------------------------


def launch_repeats(overrides: Sequence[str], seeds: int, tracking_uri: str, experiment: str) -> str:
    """Run ``python -m sweeps.run -m <overrides> seed=range(0,seeds)`` under a new sweep id
    and return that id. One failed job does not stop the others (it is recorded FAILED)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if seeds < 2:
        raise ValueError(f"seeds must be >= 2 for a confidence interval, got {seeds!r}")
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.key_or_group in ("seed", "sweep_id", "mlflow.tracking_uri", "mlflow.experiment_name"):
            raise ValueError(
                f"{o.input_line!r}: compare sets {o.key_or_group} itself "
                "(use --seeds, --tracking-uri, --experiment)"
            )
    sweep_id = f"compare-{uuid.uuid4().hex[:10]}"
    cmd = [
        sys.executable,
        "-m",
        "sweeps.run",
        "-m",
        *overrides,
        f"seed=range(0,{seeds})",
        f"sweep_id={sweep_id}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment_name={experiment}",
    ]
    log.info("+ %s", " ".join(cmd[1:]))
    from sweeps.tracking import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # SIGTERM too: the jobs are stopped, not orphaned
            code = procs.run_child(cmd)  # on Ctrl-C each job ends its run KILLED first
    except KeyboardInterrupt as e:
        raise RepeatsInterrupted(sweep_id, str(e) or "Ctrl-C", procs.child_killed(e)) from None
    if code != 0:
        raise RuntimeError(f"the multirun failed with exit status {code}")
    return sweep_id


class RepeatsInterrupted(KeyboardInterrupt):
    """Ctrl-C while ``launch_repeats`` ran: the jobs that finished are recorded under
    ``sweep_id``."""

    def __init__(self, sweep_id: str, reason: str, killed: bool = False) -> None:
        super().__init__(sweep_id, reason)
        self.sweep_id, self.reason, self.killed = sweep_id, reason, killed


def sweep_keys(overrides: Sequence[str]) -> list[str]:
    """The keys an override list sweeps over (``optimizer=sgd,adam`` -> ``optimizer``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [
        o.key_or_group
        for o in OverridesParser.create().parse_overrides(list(overrides))
        if o.is_sweep_override()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.compare",
        description="Group MLflow runs by config choices and compare a metric across seeds "
        "(mean, sd, t confidence intervals, paired or Welch t-tests).",
    )
    sel = parser.add_argument_group("which runs")
    sel.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI or sweeps.run's)",
    )
    sel.add_argument(
        "--experiment",
        action="append",
        default=None,
        help="experiment name (repeatable; default: sweeps)",
    )
    sel.add_argument("--sweep-id", default=None, help="only runs of this sweep (tag sweep_id)")
    sel.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs with this tag (repeatable)",
    )
    sel.add_argument(
        "--filter",
        default="",
        help="an extra MLflow search filter, e.g. \"params.`trainer.epochs` = '5'\"",
    )
    what = parser.add_argument_group("what to compare")
    what.add_argument(
        "--by",
        action="append",
        default=None,
        metavar="KEY",
        help="group by this tag or config key, e.g. optimizer (repeatable or comma-separated)",
    )
    what.add_argument("--metric", default="val/acc", help="any logged metric (default: val/acc)")
    what.add_argument(
        "--summary",
        choices=("final", "best"),
        default="final",
        help="per run: the value at the last step, or the best over the steps",
    )
    what.add_argument(
        "--direction",
        choices=("auto", "maximize", "minimize"),
        default="auto",
        help="auto: maximize accuracies, minimize losses",
    )
    what.add_argument(
        "--baseline", default=None, help="compare every group against this one (default: all pairs)"
    )
    what.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="significance level; CIs are 1 - alpha (default: 0.05)",
    )
    what.add_argument(
        "--correction",
        choices=CORRECTIONS,
        default="holm",
        help="multiple-comparison adjustment of the p-values the verdicts use, when there are "
        "two or more tests (default: holm, Holm-Bonferroni)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write groups.csv, tests.csv, runs.csv, curves.png",
    )
    out.add_argument("--markdown", action="store_true", help="print Markdown tables")
    out.add_argument(
        "--no-log", action="store_true", help="do not record the comparison as an MLflow run"
    )
    rep = parser.add_argument_group("launch the repeats first")
    rep.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="run `python -m sweeps.run -m OVERRIDES seed=range(0,N)` first, "
        "then compare that sweep",
    )
    rep.add_argument("overrides", nargs="*", help="sweeps.run overrides for --seeds, after `--`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    uri = args.tracking_uri or default_tracking_uri()
    experiments = args.experiment or ["sweeps"]
    by = [k for b in (args.by or []) for k in b.split(",") if k]
    try:
        tags = dict(t.split("=", 1) for t in args.tag)
    except ValueError:
        parser.error(f"--tag takes KEY=VALUE, got {args.tag!r}")
    sweep_id = args.sweep_id
    if args.overrides and args.seeds is None:
        parser.error("overrides are only used with --seeds N")
    if args.out:  # before the repeats and the comparison, not after them
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"--out {args.out}: cannot make the folder ({e.strerror})")
        if not os.access(args.out, os.W_OK):
            parser.error(f"--out {args.out}: cannot write into the folder")
    try:
        stores.check_tracking_store(uri, "--tracking-uri", read=args.seeds is None)
        if args.seeds is not None:
            if not by:
                by = [k for k in sweep_keys(args.overrides) if k != "seed"]
            if not by:
                parser.error(
                    "--seeds: say what to compare with --by, or sweep a key (optimizer=sgd,adam)"
                )
            if len(experiments) != 1:
                parser.error("--seeds records into one --experiment")
            sweep_id = launch_repeats(args.overrides, args.seeds, uri, experiments[0])
        if not by:
            parser.error("--by KEY is required (e.g. --by optimizer)")
        result = compare(
            by=by,
            metric=args.metric,
            summary=args.summary,
            direction=args.direction,
            baseline=args.baseline,
            alpha=args.alpha,
            correction=args.correction,
            tracking_uri=uri,
            experiments=experiments,
            sweep_id=sweep_id,
            tags=tags,
            filter_string=args.filter,
        )
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RepeatsInterrupted as e:
        again = ["python", "-m", "sweeps.compare", "--sweep-id", e.sweep_id, "--by", ",".join(by)]
        again += ["--tracking-uri", uri, "--experiment", experiments[0]]
        if args.metric != "val/acc":
            again += ["--metric", args.metric]
        if args.baseline is not None:
            again += ["--baseline", args.baseline]
        ended = (
            f"the jobs did not stop within {procs.STOP_TIMEOUT:g} s and were killed: the "
            "interrupted job's run stays RUNNING until the next sweeps.run in this "
            "experiment on this machine ends it KILLED"
            if e.killed
            else "the interrupted job's run is KILLED"
        )
        print(
            f"interrupted ({e.reason}) while the repeats ran; {ended}, "
            f"the finished ones are kept under sweep id {e.sweep_id}. Compare them with:\n  "
            + shlex.join(again),
            file=sys.stderr,
        )
        return 130
    print(result.render(markdown=args.markdown))
    if args.out:
        print(
            f"\nwrote {result.write(args.out)}/"
            "{groups,tests,runs}.csv, comparison.txt, curves.png"
        )
    if not args.no_log:
        exp_name = experiments[0]
        if result.experiment_id is not None:
            from sweeps.tracking import get_client

            exp_name = get_client(uri).get_experiment(result.experiment_id).name
        run_id = result.log(uri, exp_name)
        print(f"\ncomparison recorded as MLflow run {run_id} (experiment {exp_name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
