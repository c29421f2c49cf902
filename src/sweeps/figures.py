"""The book's comparison figures, drawn from MLflow runs; ``python -m sweeps.figures`` writes
them to ``docs/`` for the README.

    python -m sweeps.figures                         # every figure, from the project store
    python -m sweeps.figures optimizer_mnist search  # some of them
    python -m sweeps.figures --run-missing           # first train what the store lacks (hours)
    SWEEPS_TRACKING_URI=sqlite:////tmp/full/mlflow.db python -m sweeps.figures

Each comparison is a ``Sweep``: an experiment overlay, the overrides of the full-size runs
(``python -m sweeps.run -m experiment=<name> <overrides>`` produces them) and the small
``quick`` overrides CI uses. The notebooks in ``notebooks/`` load the same sweeps and call
the same ``draw_*`` functions. Figures are matplotlib ``Figure`` objects made without pyplot,
so drawing never touches a global backend.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sweeps import analysis as A
from sweeps import procs

log = logging.getLogger("sweeps.figures")

#: quick runs use a smaller MLP of the same depth; every quick figure is a smoke test only
QUICK_MLP4 = "model.hidden_sizes=[32,32,32,32]"
QUICK_MLP5 = "model.hidden_sizes=[32,32,32,32,32]"
QUICK_MLP6 = "model.hidden_sizes=[32,32,32,32,32,32]"

NAMES = {
    "sgd": "SGD",
    "momentum": "Momentum",
    "nesterov": "Nesterov",
    "adagrad": "AdaGrad",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "std": "std=0.01",
    "xavier": "Xavier",
    "he": "He",
}


@dataclass(frozen=True)
class Sweep:
    """The runs of one comparison: ``python -m sweeps.run -m experiment=<experiment>
    <overrides>`` (plus ``quick`` in the quick setting)."""

    experiment: str
    overrides: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()

    def command(self, setting: A.Setting) -> str:
        extra = self.quick if setting.quick else ()
        return A.command(self.experiment, [*self.overrides, *extra], setting)

    def runs(self, setting: A.Setting, launch: bool | None = None) -> pd.DataFrame:
        return A.experiment_runs(
            self.experiment, self.overrides, setting, quick=self.quick, launch=launch
        )


SWEEPS: dict[str, Sweep] = {
    "optimizers": Sweep(
        "optimizer_compare",
        ("optimizer=sgd,momentum,nesterov,adagrad,rmsprop,adam", "seed=0,1,2"),
        ("trainer.iterations=30", "seed=0,1", QUICK_MLP4),
    ),
    "weight_init": Sweep(
        "weight_init_compare", ("seed=0,1,2",), ("trainer.iterations=30", "seed=0,1", QUICK_MLP4)
    ),
    "batchnorm": Sweep(
        "batchnorm_compare",
        ("seed=0,1,2",),
        (
            "init.std=1.0,0.1,0.01,0.001",
            "seed=0,1",
            "data.train_size=300",
            "trainer.epochs=4",
            QUICK_MLP5,
        ),
    ),
    # 300 training samples as the book, plus 75 held out so there is a per-epoch held-out curve
    "weight_decay": Sweep(
        "overfit_weight_decay",
        ("data.train_size=375", "data.val_fraction=0.2", "seed=0,1,2"),
        ("trainer.epochs=6", "seed=0,1", QUICK_MLP6),
    ),
    "dropout": Sweep(
        "overfit_dropout",
        ("data.train_size=375", "data.val_fraction=0.2", "seed=0,1,2"),
        ("trainer.epochs=6", "seed=0,1", QUICK_MLP6),
    ),
    # the book's 20 epochs (about 10 minutes with one BLAS thread per process on 2 cores)
    "cnn": Sweep(
        "simple_cnn",
        (),
        (
            "trainer.epochs=1",
            "data.train_size=200",
            "data.test_size=100",
            "model.filters=8",
            "model.hidden_size=16",
        ),
    ),
}


@dataclass(frozen=True)
class StudySpec:
    """An Optuna study of ``python -m sweeps.optuna_search search=<search> <overrides>``."""

    name: str
    search: str = "book"
    overrides: tuple[str, ...] = ()
    quick: tuple[str, ...] = (
        "search.rounds=[{n_trials:4,sampler:random},{n_trials:4,sampler:tpe}]",
        "trainer.epochs=3",
        "model.hidden_sizes=[32,32]",
        "evaluate_best=false",
    )

    def argv(self, setting: A.Setting) -> list[str]:
        own = list(self.overrides)
        if setting.quick:  # the quick overrides replace the full-size ones of the same key
            keys = {o.split("=", 1)[0] for o in self.quick}
            own = [o for o in own if o.split("=", 1)[0] not in keys]
            own += [*self.quick, *setting.overrides]
        where = []
        if setting.custom_store:  # else the CLI's defaults, run from the project root
            where = [
                f"storage={A.study_storage(setting)}",
                f"mlflow.tracking_uri={setting.tracking_uri}",
                f"mlflow.artifact_root={setting.artifact_root}",
            ]
        return [f"search={self.search}", f"study_name={self.name}", *where, *own]

    def command(self, setting: A.Setting) -> str:
        import shlex

        return "python -m sweeps.optuna_search " + " ".join(
            shlex.quote(a) for a in self.argv(setting)
        )

    def study(self, setting: A.Setting, launch: bool | None = None):
        """The study, run first (as a subprocess of the CLI) when it has no trials yet."""
        launch = setting.launch if launch is None else launch
        study = A.load_study(self.name, setting)
        if study is None or not study.trials:
            if not launch:
                raise LookupError(
                    f"study {self.name!r} not found; produce it with:\n  {self.command(setting)}"
                )
            argv = [*self.argv(setting), "progress=false"]
            cmd = [sys.executable, "-m", "sweeps.optuna_search", *argv]
            code = procs.run_child(cmd, cwd=A.project_root())  # Ctrl-C: it ends its study
            if code != 0:
                raise subprocess.CalledProcessError(code, cmd)
            study = A.load_study(self.name, setting)
        return study


#: The book samples 100 trials at random; here 30 at random, then 20 with TPE in the narrowed
#: ranges (50 trials keep the full-size search near an hour on a shared 2-core machine).
STUDY = StudySpec(
    "book", overrides=("search.rounds=[{n_trials:30,sampler:random},{n_trials:20,sampler:tpe}]",)
)


# -- drawing -------------------------------------------------------------------------------------


def _figure(w: float, h: float) -> Figure:
    return Figure(figsize=(w, h), layout="constrained", dpi=100)


def draw_optimizer_paths(paths: Mapping[str, np.ndarray]) -> Figure:
    """The book's figure 6-8: each optimizer's path on f(x, y) = x^2/20 + y^2 over its
    contour lines (2x2 for four optimizers)."""
    n = len(paths)
    cols = 2 if n <= 4 else 3
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    x, y = np.meshgrid(np.arange(-10, 10, 0.05), np.arange(-5, 5, 0.05))
    z = A.f_book(x, y)
    z[z > 7] = 0  # the book's contour trick: blank the outer area
    for ax, (name, p) in zip(axes, paths.items(), strict=False):
        ax.contour(x, y, z, levels=12, colors="0.75", linewidths=0.7)
        ax.plot(p[:, 0], p[:, 1], "o-", color="tab:red", ms=3, lw=1)
        ax.plot(0, 0, "+", color="k", ms=10)
        ax.set(
            xlim=(-10, 10),
            ylim=(-10, 10),
            title=f"{NAMES.get(name, name)}: end ({p[-1, 0]:.2f}, {p[-1, 1]:.2f})",
        )
        ax.set_xlabel("x", fontsize=8)
        ax.set_ylabel("y", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(
        f"f(x, y) = x²/20 + y², {len(next(iter(paths.values()))) - 1} updates from (-7, 2)"
    )
    return fig


def draw_loss_curves(
    history: pd.DataFrame, by: str, *, order: Sequence[str], ylim: tuple[float, float], title: str
) -> Figure:
    """Smoothed training loss per update (the book's ``smooth_curve``): mean over seeds
    with a 95% CI band, the run count in the legend."""
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    A.plot_band(ax, history, by, order=order, labels=NAMES, smooth=True)
    data = ", ".join(sorted(history["data"].unique())) if "data" in history else ""
    ax.set(
        xlabel="iterations", ylabel="training loss (smoothed)", ylim=ylim, title=f"{title} ({data})"
    )
    ax.legend(title=A.band_note(), fontsize=8, title_fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def draw_activation_histograms(cases=A.BOOK_HISTOGRAM_CASES, **kw) -> Figure:
    """The book's figures 6-10, 6-11, 6-13 and 6-14 in one grid: one row per (activation,
    init), one histogram (30 bins over 0..1, as the book) per layer of the 5-layer net on
    random input. ReLU rows clip the y axis at 7000 as the book does, so the huge bin of
    zeros does not flatten the rest; the panel says how many values are exactly 0."""
    fig = _figure(11, 1.55 * len(cases) + 0.4)
    axes = fig.subplots(len(cases), 5, sharex=True)
    for row, (activation, label, init) in enumerate(cases):
        acts = A.activation_experiment(activation, init, **kw)
        for i, (ax, z) in enumerate(zip(axes[row], acts, strict=True), 1):
            ax.hist(
                z.ravel(),
                bins=30,
                range=(0, 1),
                color="tab:blue" if activation == "sigmoid" else "tab:orange",
            )
            ax.tick_params(labelsize=6)
            if activation == "relu":
                ax.set_ylim(0, 7000)
                ax.text(
                    0.97,
                    0.9,
                    f"zeros {np.mean(z == 0):.0%}\nmean {z.mean():.3f}",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=6,
                )
            else:
                ax.text(
                    0.97,
                    0.9,
                    f"std {z.std():.3f}",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=6,
                )
            if row == 0:
                ax.set_title(f"layer {i}", fontsize=8)
            if i == 1:
                ax.set_ylabel(f"{activation}\n{label}", fontsize=8)
            else:
                ax.set_yticklabels([])
    fig.suptitle(
        "activations of a 5-layer net (100 units, no bias) on 1000 random inputs", fontsize=10
    )
    return fig


def draw_batchnorm_grid(history: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """The book's figure 6-19: training accuracy per epoch with (solid) and without (dashed)
    batch norm, one panel per weight-init std."""
    stds = sorted(A.param(runs, "init.std").unique(), reverse=True)
    std_of_runs = A.param(runs, "init.std")
    std_of = dict(zip(runs["run_id"], std_of_runs, strict=True))
    history = history.assign(std=history["run_id"].map(std_of))
    cols = 4
    rows = math.ceil(len(stds) / cols)
    fig = _figure(11, 2.3 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()
    styles = {"on": {"color": "tab:blue", "ls": "-"}, "off": {"color": "tab:gray", "ls": "--"}}
    labels = {"on": "batch norm", "off": "no batch norm"}
    for ax, std in zip(axes, stds, strict=False):
        A.plot_band(
            ax,
            history[history["std"] == std],
            "batchnorm",
            order=["on", "off"],
            styles=styles,
            labels=labels,
        )
        ax.set_title(f"W std {std:.3g}", fontsize=9)
        here = runs[std_of_runs == std]
        for i, (opt, g) in enumerate(here.groupby("batchnorm")):
            if "diverged" in g and g["diverged"].any():
                ax.text(
                    0.97,
                    0.5 - 0.12 * i,
                    f"{labels[opt]}: {int(g['diverged'].sum())}/{len(g)} diverged",
                    transform=ax.transAxes,
                    ha="right",
                    fontsize=7,
                    color="tab:red",
                )
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(stds) :]:
        ax.set_visible(False)
    full = max(axes[: len(stds)], key=lambda a: len(a.get_lines()))  # a panel with both lines
    full.legend(fontsize=7, loc="lower right")
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("training accuracy", fontsize=9)
    fig.suptitle(f"batch norm vs weight-init scale ({A.band_note()})", fontsize=10)
    return fig


def draw_train_vs_heldout(
    train: pd.DataFrame,
    val: pd.DataFrame,
    runs: pd.DataFrame,
    by: str,
    titles: Mapping[str, str],
    order: Sequence[str],
) -> Figure:
    """The book's figures 6-20 to 6-23: training (solid) and held-out (dashed) accuracy per
    epoch, one panel per option of ``by``; the final test accuracy (10000 images) as a dot."""
    fig = _figure(10, 3.8)
    axes = fig.subplots(1, len(order), sharey=True)
    for ax, opt in zip(np.atleast_1d(axes), order, strict=True):
        A.plot_band(
            ax,
            train[train[by] == opt].assign(curve="train"),
            "curve",
            styles={"train": {"color": "tab:blue"}},
        )
        A.plot_band(
            ax,
            val[val[by] == opt].assign(curve="validation"),
            "curve",
            styles={"validation": {"color": "tab:orange", "ls": "--"}},
        )
        sel = runs[runs[by] == opt]
        last = train["step"].max()
        test = sel["metrics.test/acc"]
        ax.errorbar(
            [last],
            [test.mean()],
            yerr=[[0], [0]],
            fmt="s",
            color="tab:red",
            label=f"test, end (n={len(test)}): {test.mean():.3f}",
        )
        ax.set(title=titles[opt], xlabel="epoch", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    fig.suptitle(A.band_note(), fontsize=9)
    return fig


def draw_search(trials: pd.DataFrame, rounds: pd.DataFrame, spec: Mapping) -> Figure:
    """The narrowing rounds: every trial on (lr, weight decay), coloured by the metric, one
    marker per round, each round's sampling range as a rectangle; and the metric against lr."""
    x, y = "lr", "weight_decay"
    fig = _figure(11, 4.3)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.25, 1])
    markers = ["o", "^", "s", "D", "v"]
    colors = ["tab:gray", "tab:red", "tab:green", "tab:purple"]
    metric = spec.get("metric", "value")
    sc = None
    for i, (r, g) in enumerate(trials.groupby("round")):
        sc = ax.scatter(
            g[x],
            g[y],
            c=g["value"],
            cmap="viridis",
            vmin=0,
            vmax=1,
            marker=markers[i % 5],
            edgecolors="k",
            linewidths=0.3,
            s=30,
            label=f"round {r} ({len(g)} trials)",
        )
        ax2.scatter(
            g[x],
            g["value"],
            marker=markers[i % 5],
            s=22,
            color=colors[i % 4],
            alpha=0.8,
            label=f"round {r}",
        )
    for i, row in rounds.reset_index(drop=True).iterrows():
        ax.add_patch(
            Rectangle(
                (row[f"{x}_low"], row[f"{y}_low"]),
                row[f"{x}_high"] - row[f"{x}_low"],
                row[f"{y}_high"] - row[f"{y}_low"],
                fill=False,
                lw=1.5,
                ls="-" if i == 0 else "--",
                edgecolor=colors[i % 4],
                label=f"round {row['round']} range ({row['sampler']})",
            )
        )
    p = spec["params"]
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(p[x]["low"] / 2, p[x]["high"] * 2),
        ylim=(p[y]["low"] / 2, p[y]["high"] * 2),
        xlabel="learning rate",
        ylabel="weight decay",
        title="trials and the range each round sampled",
    )
    if sc is not None:
        fig.colorbar(sc, ax=ax, label=metric)
    ax.legend(fontsize=7, loc="lower left")
    ax2.set(
        xscale="log",
        xlabel="learning rate",
        ylabel=metric,
        ylim=(0, 1),
        title=f"{metric} against learning rate",
    )
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return fig


def draw_importances(study, spec: Mapping) -> Figure:
    """Optuna's parameter-importance plot (fANOVA) over every complete trial of every round,
    seen in the original search space."""
    import warnings

    import optuna.visualization.matplotlib as vis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = vis.plot_param_importances(A.study_view(study, spec))
    fig = ax.get_figure(root=True)
    assert isinstance(fig, Figure)
    fig.set_size_inches(6, 2.6)
    fig.set_layout_engine("constrained")
    return fig


def draw_filters(before: np.ndarray, after: np.ndarray) -> Figure:
    """The book's figure 7-24: the first conv layer's filters (channel 0) before and after
    training, ``gray_r`` as in ``visualize_filter.py``."""
    n = before.shape[0]
    cols = min(n, 10)
    rows = math.ceil(n / cols)
    fig = _figure(cols * 0.75, 2 * rows * 0.8 + 0.7)
    subs = np.asarray(fig.subfigures(2, 1)).ravel()
    for sub, W, title in ((subs[0], before, "before training"), (subs[1], after, "after training")):
        axes = np.atleast_1d(sub.subplots(rows, cols)).ravel()
        for ax, w in zip(axes, W[:, 0], strict=False):
            ax.imshow(w, cmap="gray_r", interpolation="nearest")
        for ax in axes:
            ax.set_axis_off()
        sub.suptitle(title, fontsize=9)
    return fig


def draw_misclassified(images: np.ndarray, table: pd.DataFrame) -> Figure:
    """The book's ``misclassified_mnist.py``: the first misclassified test digits with
    label and prediction."""
    n = len(table)
    cols = 5
    rows = max(math.ceil(n / cols), 1)
    fig = _figure(cols * 1.3, rows * 1.45)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (_, r) in zip(axes, table.iterrows(), strict=False):
        ax.imshow(images[int(r["index"])].reshape(28, 28), cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{int(r['label'])} → {int(r['prediction'])}", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle("misclassified test digits: label → prediction", fontsize=10)
    return fig


# -- figures from a store -------------------------------------------------------------------------


def optimizer_paths(setting: A.Setting) -> Figure:
    return draw_optimizer_paths(A.optimizer_paths())


def optimizer_mnist(setting: A.Setting) -> Figure:
    runs = SWEEPS["optimizers"].runs(setting)
    hist = A.metric_history(runs, "train/batch_loss", setting)
    order = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]
    return draw_loss_curves(
        hist,
        "optimizer",
        order=order,
        ylim=(0, 1),
        title="784-100-100-100-100-10 ReLU, He init",
    )


def weight_init_mnist(setting: A.Setting) -> Figure:
    runs = SWEEPS["weight_init"].runs(setting)
    hist = A.metric_history(runs, "train/batch_loss", setting)
    return draw_loss_curves(
        hist,
        "init",
        order=["std", "xavier", "he"],
        ylim=(0, 2.5),
        title="784-100-100-100-100-10 ReLU, SGD lr 0.01",
    )


def activation_histograms(setting: A.Setting) -> Figure:
    return draw_activation_histograms()


def batchnorm_grid(setting: A.Setting) -> Figure:
    runs = SWEEPS["batchnorm"].runs(setting)
    return draw_batchnorm_grid(A.metric_history(runs, "train/acc", setting), runs)


def _overfit(
    setting: A.Setting, key: str, by: str, titles: Mapping[str, str], order: Sequence[str]
) -> Figure:
    runs = SWEEPS[key].runs(setting)
    train = A.metric_history(runs, "train/acc", setting)
    val = A.metric_history(runs, "val/acc", setting)
    return draw_train_vs_heldout(train, val, runs, by, titles, order)


def overfit_weight_decay(setting: A.Setting) -> Figure:
    return _overfit(
        setting,
        "weight_decay",
        "weight_decay",
        {"off": "no weight decay", "l2": "weight decay λ=0.1"},
        ["off", "l2"],
    )


def overfit_dropout(setting: A.Setting) -> Figure:
    return _overfit(
        setting, "dropout", "dropout", {"off": "no dropout", "on": "dropout 0.15"}, ["off", "on"]
    )


def search_rounds(setting: A.Setting) -> Figure:
    study = STUDY.study(setting)
    spec = study.user_attrs[A.SPEC_ATTR]
    return draw_search(A.study_trials(study), A.study_rounds(study), spec)


def search_importance(setting: A.Setting) -> Figure:
    study = STUDY.study(setting)
    return draw_importances(study, study.user_attrs[A.SPEC_ATTR])


def _cnn_model(setting: A.Setting) -> A.RunModel:
    runs = SWEEPS["cnn"].runs(setting)
    return A.load_run_model(runs["run_id"].iloc[0], setting)


def cnn_filters(setting: A.Setting) -> Figure:
    rm = _cnn_model(setting)
    return draw_filters(rm.initial["W1"], rm.model.params["W1"])


def cnn_misclassified(setting: A.Setting) -> Figure:
    rm = _cnn_model(setting)
    test = rm.splits.test
    return draw_misclassified(test.x, A.misclassified(rm.model, test.x, test.t))


FIGURES: dict[str, Callable[[A.Setting], Figure]] = {
    "optimizer_paths": optimizer_paths,
    "optimizer_mnist": optimizer_mnist,
    "weight_init_mnist": weight_init_mnist,
    "activation_histograms": activation_histograms,
    "batchnorm_grid": batchnorm_grid,
    "overfit_weight_decay": overfit_weight_decay,
    "overfit_dropout": overfit_dropout,
    "search_rounds": search_rounds,
    "search_importance": search_importance,
    "cnn_filters": cnn_filters,
    "cnn_misclassified": cnn_misclassified,
}


def save(fig: Figure, path: Path, dpi: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.figures",
        description="Draw the README figures from the runs in MLflow (store: $SWEEPS_TRACKING_URI, "
        "else mlruns/ of the project) into docs/.",
    )
    parser.add_argument(
        "names", nargs="*", help=f"figures to draw (default: all): {', '.join(FIGURES)}"
    )
    parser.add_argument("--out", default="docs", help="output folder (default: docs)")
    parser.add_argument(
        "--run-missing",
        action="store_true",
        help="train the runs the store lacks first (full size: hours on 2 cores)",
    )
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("sweeps.run", "alembic", "mlflow"):  # per-epoch lines of launched runs
        logging.getLogger(noisy).setLevel(logging.WARNING)
    unknown = sorted(set(args.names) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    env = dict(os.environ)
    env.setdefault(A.ENV_LAUNCH, "1" if args.run_missing else "0")
    setting = A.Setting.from_env(env)
    log.info(setting.describe())
    from sweeps.tracking import sigterm_as_interrupt

    failed = []
    try:
        # SIGTERM as Ctrl-C: a run training here ends KILLED, a search it runs is stopped
        with sigterm_as_interrupt():
            for name in args.names or list(FIGURES):
                try:
                    path = save(FIGURES[name](setting), Path(args.out) / f"{name}.png", args.dpi)
                except LookupError as e:
                    failed.append(name)
                    log.error("%s: %s", name, e)
                    continue
                log.info("wrote %s (%.0f KB)", path, path.stat().st_size / 1024)
    except KeyboardInterrupt as e:
        log.error("interrupted (%s); the figures written so far are kept", str(e) or "Ctrl-C")
        return 130
    if failed:
        log.error(
            "missing runs for %s: run the commands above, or add --run-missing", ", ".join(failed)
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
