"""Read runs back from MLflow for the notebooks and the README figures.

The notebooks hold no training code. They name an experiment overlay and its sweep; this
module expands the sweep into jobs exactly as ``python -m sweeps.run -m`` does, finds each
job's run in the store (same experiment tag, same resolved config), launches the missing ones
through ``sweeps.run.execute`` and hands back pandas DataFrames:

    S = analysis.Setting.from_env()          # quick (CI) or full (MNIST), and which store
    runs = analysis.experiment_runs("optimizer_compare", ["seed=0,1,2"], S,
                                    quick=["trainer.iterations=40"])
    hist = analysis.metric_history(runs, "train/batch_loss", S)
    analysis.plot_band(ax, hist, by="optimizer", smooth=True)   # mean and 95% CI, n in the legend

The setting comes from the environment so one notebook serves CI and the full-size figures:
``SWEEPS_QUICK=1`` runs on synthetic data with the notebook's ``quick`` overrides;
``SWEEPS_TRACKING_URI`` (and ``SWEEPS_ARTIFACT_ROOT``) pick the store; ``SWEEPS_DATA``
(``mnist`` or ``synthetic``) overrides the data. ``SWEEPS_LAUNCH=0`` never trains: a missing
run is an error that prints the command producing it.

Two of the book's chapter-6 figures are not training runs and are computed here with the
package's own parts: the optimizer paths on f(x, y) = x^2/20 + y^2 (``sweeps.optim``) and the
per-layer activation histograms of a 5-layer net on random input (``sweeps.nn``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import logging
import os
import shlex
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeps.config import GROUPS, RunConfig, conf_dir, register_schemas, validate
from sweeps.nn import layers as L
from sweeps.nn.functional import smooth_curve
from sweeps.nn.init import Init
from sweeps.nn.model import ACTIVATIONS
from sweeps.optim import make_optimizer
from sweeps.tracking import FAILURE_TAG, sqlite_path
from sweeps.train import DivergedError

log = logging.getLogger(__name__)

ENV_QUICK = "SWEEPS_QUICK"
ENV_TRACKING_URI = "SWEEPS_TRACKING_URI"
ENV_ARTIFACT_ROOT = "SWEEPS_ARTIFACT_ROOT"
ENV_DATA = "SWEEPS_DATA"
ENV_LAUNCH = "SWEEPS_LAUNCH"

#: config keys that say where and how a run is recorded, not what it computes: a run found in
#: the store matches a job when every other resolved key is equal
IGNORED_KEYS = ("mlflow.", "sweep_id", "data.root")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) that holds
    ``mlruns/``; the working directory when there is none. Notebooks run from notebooks/, so
    this finds the project's store from there."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "mlruns").is_dir():
            return folder
    return here


@dataclass(frozen=True)
class Setting:
    """Where runs are read from and how missing ones are launched.

    ``quick``: synthetic data and each notebook's small ``quick`` overrides (CI);
    otherwise the overlays as written, on ``data`` (MNIST)."""

    quick: bool = False
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"
    data: str = "mnist"
    launch: bool = True
    experiment_name: str = "sweeps"
    #: false for the project's default store, which ``python -m sweeps.run`` uses unasked
    custom_store: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Setting:
        env = os.environ if environ is None else environ
        quick = _truthy(env.get(ENV_QUICK))
        uri = env.get(ENV_TRACKING_URI)
        custom = True
        if uri:
            artifacts = env.get(ENV_ARTIFACT_ROOT)
            if artifacts is None:
                local = sqlite_path(uri)
                artifacts = str(local.parent / "artifacts") if local else "mlruns/artifacts"
        elif quick:  # a throwaway store, so a quick notebook never mixes with real runs
            tmp = Path(tempfile.mkdtemp(prefix="sweeps-quick-"))
            uri, artifacts = f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "artifacts")
        else:
            root = project_root()
            uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
            artifacts = str(root / "mlruns" / "artifacts")
            custom = False
        data = env.get(ENV_DATA) or ("synthetic" if quick else "mnist")
        launch = _truthy(env.get(ENV_LAUNCH, "1"))
        return cls(quick, uri, artifacts, data, launch, custom_store=custom)

    @property
    def overrides(self) -> list[str]:
        """Overrides every job of this setting gets (store, data; no figures when quick)."""
        out = [f"data={self.data}"]
        if self.quick:
            out.append("mlflow.log_figures=false")
        return out

    @property
    def store_overrides(self) -> list[str]:
        return [
            f"mlflow.tracking_uri={self.tracking_uri}",
            f"mlflow.artifact_root={self.artifact_root}",
        ]

    def describe(self) -> str:
        kind = (
            "QUICK (synthetic data, tiny runs: the figures only prove the notebook runs)"
            if self.quick
            else "FULL"
        )
        return f"setting: {kind}; data={self.data}; store {self.tracking_uri}"

    def client(self):
        from sweeps import tracking

        return tracking.get_client(self.tracking_uri)


# -- sweeps: overlay + overrides -> jobs ------------------------------------------------------


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's Compose API over the package's configs (nested use is fine)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        yield


def _compose(overrides: Sequence[str], return_hydra_config: bool = False):
    from hydra import compose

    with _hydra():
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def _last_wins(overrides: Iterable[str]) -> dict[str, str]:
    """{key: value string} with later overrides replacing earlier ones of the same key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, str] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_sweep_override():
            out[key] = ",".join(o.sweep_string_iterator())
        else:
            out[key] = o.get_value_element_as_str()
    return out


def expand(experiment: str, overrides: Sequence[str] = ()) -> list[list[str]]:
    """The jobs of ``python -m sweeps.run -m experiment=<experiment> <overrides>``: the
    overlay's ``hydra.sweeper.params`` with the given overrides taking precedence (later
    ones win), expanded as Hydra's basic sweeper does (a product, in order)."""
    head = [f"experiment={experiment}"]
    hc = _compose(head, return_hydra_config=True)
    sweep = {str(k): str(v) for k, v in (hc.hydra.sweeper.params or {}).items()}
    merged = _last_wins([*head, *(f"{k}={v}" for k, v in sweep.items()), *overrides])
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in merged.items()])
    axes = []
    for o in parsed:
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        axes.append([f"{o.key_or_group}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)]


def command(experiment: str, overrides: Sequence[str] = (), setting: Setting | None = None) -> str:
    """The shell command that produces the runs of an experiment in this setting."""
    parts = ["python", "-m", "sweeps.run", "-m", f"experiment={experiment}", *overrides]
    if setting is not None:
        parts += [o for o in setting.overrides if o != "data=mnist"]
        if setting.custom_store:
            parts += setting.store_overrides
    return " ".join(shlex.quote(p) for p in parts)


@dataclass
class Job:
    """One configuration of a sweep, composed and validated."""

    overrides: list[str]
    cfg: RunConfig
    resolved: dict[str, Any]
    choices: dict[str, str]

    @property
    def key(self) -> dict[str, str]:
        """The resolved config as MLflow stores it (``str`` of each flattened value), minus
        the recording keys."""
        from sweeps import tracking

        flat = tracking.flatten(self.resolved)
        return {k: str(v)[:6000] for k, v in flat.items() if not k.startswith(IGNORED_KEYS)}


GROUP_KEYS = (*GROUPS, "experiment")


def compose_jobs(experiment: str, jobs: Sequence[Sequence[str]]) -> list[Job]:
    """Compose and validate each job. Hydra composes once per combination of config-group
    choices; the plain keys of a job (``seed=1``, ``init.std=0.5``) are then set on a copy,
    as a command-line override would set them after the defaults."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    parser = OverridesParser.create()
    bases: dict[tuple[str, ...], tuple[Any, dict[str, str]]] = {}
    out = []
    with _hydra():
        for job in jobs:
            parsed = parser.parse_overrides(list(job))
            groups = tuple(str(o.input_line) for o in parsed if o.key_or_group in GROUP_KEYS)
            if groups not in bases:
                hc = _compose(groups, return_hydra_config=True)
                choices = {g: str(hc.hydra.runtime.choices.get(g)) for g in GROUPS}
                with open_dict(hc):
                    del hc["hydra"]
                bases[groups] = (hc, choices)
            base, choices = bases[groups]
            dcfg = copy.deepcopy(base)
            for o in parsed:
                if o.key_or_group not in GROUP_KEYS:
                    OmegaConf.update(dcfg, o.key_or_group, o.value(), merge=False)
            cfg = validate(dcfg)
            cfg.experiment = experiment
            container = OmegaConf.to_container(dcfg, resolve=True)
            assert isinstance(container, dict)
            resolved = {str(k): v for k, v in container.items()}
            resolved["experiment"] = experiment
            out.append(Job(list(job), cfg, resolved, dict(choices)))
    return out


# -- finding and launching runs ---------------------------------------------------------------


def search_runs(setting: Setting, filter_string: str = "", finished: bool = True) -> pd.DataFrame:
    """``mlflow.search_runs`` over the setting's store and experiment (empty if none yet).
    ``finished``: only runs with a result, i.e. FINISHED ones and those FAILED because
    training diverged (a diverged run is an outcome: the book's no-BN nets at std 1 do too);
    they get ``diverged=True``."""
    import mlflow

    client = setting.client()
    exp = client.get_experiment_by_name(setting.experiment_name)
    if exp is None:
        return pd.DataFrame()
    mlflow.set_tracking_uri(setting.tracking_uri)
    df = mlflow.search_runs(
        experiment_ids=[exp.experiment_id], filter_string=filter_string, max_results=50000
    )
    assert isinstance(df, pd.DataFrame)
    if df.empty:
        return df
    failure = df.get(f"tags.{FAILURE_TAG}", pd.Series("", index=df.index)).fillna("")
    df["diverged"] = (df["status"] == "FAILED") & failure.str.startswith("diverged")
    if finished:
        df = df[(df["status"] == "FINISHED") | df["diverged"]]
    return df


def _match(found: pd.DataFrame, key: Mapping[str, str]) -> pd.Series | None:
    """The latest run of ``found`` whose params equal ``key``. A key the run has no param for
    (a config key added to the package after the run was recorded) is not compared."""
    if found.empty:
        return None
    mask = pd.Series(True, index=found.index)
    for k, v in key.items():
        col = f"params.{k}"
        if col in found:
            mask &= (found[col] == v) | found[col].isna()
    hits = found[mask]
    if hits.empty:
        return None
    return hits.sort_values("start_time").iloc[-1]


def experiment_runs(
    experiment: str,
    overrides: Sequence[str] = (),
    setting: Setting | None = None,
    *,
    quick: Sequence[str] = (),
    launch: bool | None = None,
) -> pd.DataFrame:
    """One row per job of the sweep (``mlflow.search_runs`` columns: ``run_id``,
    ``tags.*``, ``params.*``, ``metrics.*`` with each metric's last value), plus short
    columns for the group choices and ``seed``. ``quick`` overrides apply in the quick setting
    only, after ``overrides``. Missing runs are launched in this process when ``launch`` (by
    default the setting's) is true; otherwise LookupError names them and their command."""
    s = setting or Setting.from_env()
    launch = s.launch if launch is None else launch
    sweep = [*overrides, *(quick if s.quick else ()), *s.overrides]
    jobs = compose_jobs(
        experiment, [[*job, *s.store_overrides] for job in expand(experiment, sweep)]
    )
    found = search_runs(s, f"tags.experiment = '{experiment}'")
    matched = [_match(found, job.key) for job in jobs]
    missing = [job for job, m in zip(jobs, matched, strict=True) if m is None]
    if missing and not launch:
        raise LookupError(
            f"{len(missing)} of {len(jobs)} runs of {experiment} are not in {s.tracking_uri}; "
            f"produce them with:\n  {command(experiment, sweep, s)}"
        )
    if missing:
        log.info("launching %d missing runs of %s", len(missing), experiment)
        launch_jobs(missing)
        found = search_runs(s, f"tags.experiment = '{experiment}'")
        matched = [_match(found, job.key) for job in jobs]
        if any(m is None for m in matched):
            raise RuntimeError(
                f"launched runs of {experiment} were not found again in {s.tracking_uri}"
            )
    df = pd.DataFrame(matched).reset_index(drop=True)
    return with_short_columns(df)


def launch_jobs(jobs: Sequence[Job]) -> list[str | None]:
    """Run each job through ``sweeps.run.execute`` (what ``python -m sweeps.run`` calls),
    tagged with one sweep id. Returns the run ids."""
    from sweeps.run import execute

    sweep_id = "nb-" + hashlib.sha1(repr([j.overrides for j in jobs]).encode()).hexdigest()[:10]
    ids = []
    for job in jobs:
        job.cfg.sweep_id = sweep_id
        job.resolved["sweep_id"] = sweep_id
        try:
            outcome = execute(
                job.cfg, job.resolved, job.overrides, choices=job.choices, progress=False
            )
            ids.append(outcome.run_id)
        except DivergedError as e:  # recorded as FAILED with the reason: an outcome too
            log.info("%s: %s", " ".join(job.overrides), e)
            ids.append(None)
    return ids


SHORT_TAGS = (*GROUPS, "seed", "experiment", "sweep_id")


def with_short_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Copy ``tags.<group>`` to ``<group>`` (and ``seed`` as int) for grouping."""
    df = df.copy()
    for tag in SHORT_TAGS:
        if f"tags.{tag}" in df:
            df[tag] = df[f"tags.{tag}"]
    if "seed" in df:
        df["seed"] = df["seed"].astype(int)
    return df


def param(runs: pd.DataFrame, key: str, dtype=float) -> pd.Series:
    """A param column as numbers (params are stored as strings)."""
    return runs[f"params.{key}"].astype(dtype)


# -- metric histories ---------------------------------------------------------------------------


def metric_history(
    runs: pd.DataFrame,
    key: str,
    setting: Setting | None = None,
    columns: Sequence[str] = SHORT_TAGS,
) -> pd.DataFrame:
    """Long table of one metric over steps for every run: ``run_id, step, value`` plus the
    runs' ``columns`` (the group choices, seed...) for grouping."""
    s = setting or Setting.from_env()
    client = s.client()
    frames = []
    keep = [c for c in columns if c in runs]
    for _, row in runs.iterrows():
        points = client.get_metric_history(row["run_id"], key)
        f = pd.DataFrame({"step": [p.step for p in points], "value": [p.value for p in points]})
        f = f.sort_values("step").drop_duplicates("step", keep="last")
        f.insert(0, "run_id", row["run_id"])
        for c in keep:
            f[c] = row[c]
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=["run_id", "step", "value", *keep])
    return pd.concat(frames, ignore_index=True)


def t_critical(n: int, level: float = 0.95) -> float:
    """Two-sided Student t quantile for a mean over n runs (n - 1 degrees of freedom)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, n - 1)) if n > 1 else float("nan")


def mean_band(
    history: pd.DataFrame,
    *,
    x: str = "step",
    y: str = "value",
    smooth: bool = False,
    level: float = 0.95,
) -> pd.DataFrame:
    """Across the runs of ``history``: per ``x`` the mean, the ``level`` confidence interval of
    the mean (Student t over runs) and n. ``smooth`` applies the book's ``smooth_curve`` to
    each run first."""
    wide = history.pivot_table(index=x, columns="run_id", values=y, aggfunc="last").sort_index()
    if smooth:
        wide = wide.apply(
            lambda col: pd.Series(smooth_curve(col.dropna().to_numpy()), index=col.dropna().index)
        )
    n = wide.count(axis=1)
    mean = wide.mean(axis=1)
    sem = wide.std(axis=1, ddof=1) / np.sqrt(n)
    t = n.map(lambda k: t_critical(int(k), level))
    return pd.DataFrame({"mean": mean, "low": mean - t * sem, "high": mean + t * sem, "n": n})


def plot_band(
    ax,
    history: pd.DataFrame,
    by: str | Sequence[str],
    *,
    order: Sequence[Any] | None = None,
    labels: Mapping[Any, str] | None = None,
    smooth: bool = False,
    level: float = 0.95,
    styles: Mapping[Any, Mapping[str, Any]] | None = None,
    x: str = "step",
    y: str = "value",
) -> dict[Any, pd.DataFrame]:
    """One line per group of ``history`` (grouped by ``by``): the mean over its runs with a
    shaded ``level`` confidence band; the legend label says how many runs (``n=3``).
    Returns each group's ``mean_band`` table."""
    groups = dict(list(history.groupby(by, sort=False)))
    keys = list(order) if order is not None else list(groups)
    out = {}
    for k in keys:
        if k not in groups:
            continue
        band = mean_band(groups[k], x=x, y=y, smooth=smooth, level=level)
        n_runs = groups[k]["run_id"].nunique()
        name = (labels or {}).get(k, str(k))
        style = dict((styles or {}).get(k, {}))
        (line,) = ax.plot(band.index, band["mean"], label=f"{name} (n={n_runs})", **style)
        if n_runs > 1:
            ax.fill_between(
                band.index, band["low"], band["high"], color=line.get_color(), alpha=0.2, lw=0
            )
        out[k] = band
    return out


def band_note(level: float = 0.95) -> str:
    return f"mean over runs, band: {level:.0%} CI of the mean"


def summarize(runs: pd.DataFrame, by: str | Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation over runs of each ``metrics.<m>`` (last value), with n,
    per group."""
    cols = {m: runs[f"metrics.{m}"] for m in metrics if f"metrics.{m}" in runs}
    df = pd.DataFrame(cols).assign(
        **({by: runs[by]} if isinstance(by, str) else {b: runs[b] for b in by})
    )
    g = df.groupby(by, sort=False)
    table = g.agg(["mean", "std"])
    table.columns = [f"{m} {stat}" for m, stat in table.columns]
    table.insert(0, "n", g.size())
    return table


def value_at(history: pd.DataFrame, by: str, step: int, smooth: bool = False) -> pd.Series:
    """Mean over runs of each group at ``step`` (nearest logged step at or before it)."""
    out = {}
    for k, g in history.groupby(by, sort=False):
        band = mean_band(g, smooth=smooth)
        out[k] = band["mean"].loc[:step].iloc[-1]
    return pd.Series(out, name=f"step {step}")


# -- artifacts and models ----------------------------------------------------------------------


def download(run_id: str, path: str, setting: Setting | None = None) -> Path:
    s = setting or Setting.from_env()
    dst = tempfile.mkdtemp(prefix="sweeps-artifact-")
    return Path(s.client().download_artifacts(run_id, path, dst))


def run_config(run_id: str, setting: Setting | None = None) -> RunConfig:
    """The validated RunConfig a run trained with: its group choices (tags) composed, then
    its saved ``config.yaml`` merged on top."""
    from omegaconf import DictConfig, OmegaConf

    s = setting or Setting.from_env()
    tags = s.client().get_run(run_id).data.tags
    base = _compose([f"{g}={tags[g]}" for g in GROUPS if g in tags])
    saved = OmegaConf.load(download(run_id, "config.yaml", s))
    merged = OmegaConf.merge(base, saved)
    assert isinstance(merged, DictConfig)
    return validate(merged)


@dataclass
class RunModel:
    """A run's network rebuilt: ``initial`` holds the weights it started from (replayed from
    its seed), ``model`` the trained weights from ``model/params.npz``; ``splits`` its data."""

    cfg: RunConfig
    model: Any
    initial: dict[str, np.ndarray]
    splits: Any = field(repr=False)


def load_run_model(run_id: str, setting: Setting | None = None) -> RunModel:
    """Rebuild a run's model. The run drew its split and then its weights from one generator
    seeded by ``seed`` (``sweeps.experiment.train``); replaying those two draws gives exactly
    the weights it started from."""
    from sweeps.experiment import build_model, load_splits

    s = setting or Setting.from_env()
    cfg = run_config(run_id, s)
    rng = np.random.default_rng(cfg.seed)
    splits = load_splits(cfg, rng)
    model = build_model(cfg, rng, splits.train.x.shape[1:])
    initial = model.state_dict()
    with np.load(download(run_id, "model/params.npz", s)) as saved:
        model.load_state_dict(dict(saved))
    return RunModel(cfg, model, initial, splits)


def misclassified(model, x: np.ndarray, t: np.ndarray, limit: int = 20) -> pd.DataFrame:
    """The first ``limit`` test samples the model gets wrong: index, label, prediction."""
    pred = model.predict(x)
    wrong = np.flatnonzero(pred != t)[:limit]
    return pd.DataFrame({"index": wrong, "label": t[wrong], "prediction": pred[wrong]})


# -- the book's two non-training experiments ----------------------------------------------------

#: ch06/optimizer_compare_naive.py: learning rates tuned per optimizer for this function
BOOK_PATH_OPTIMIZERS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.95},
    "momentum": {"lr": 0.1},
    "adagrad": {"lr": 1.5},
    "adam": {"lr": 0.3},
}


def f_book(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """f(x, y) = x^2/20 + y^2 (book 6.1.3)."""
    return x**2 / 20.0 + y**2


def optimizer_paths(
    optimizers: Mapping[str, Mapping[str, float]] = BOOK_PATH_OPTIMIZERS,
    start: tuple[float, float] = (-7.0, 2.0),
    points: int = 30,
) -> dict[str, np.ndarray]:
    """Minimize f(x, y) = x^2/20 + y^2 from ``start`` with each optimizer of ``sweeps.optim``:
    ``points`` positions (the start and ``points - 1`` updates), as the book records them.
    Returns {name: (points, 2) array}."""
    paths = {}
    for name, hp in optimizers.items():
        opt = make_optimizer(name, **hp)
        p = np.array(start, dtype=np.float64)
        g = np.empty_like(p)
        trace = [p.copy()]
        for _ in range(points - 1):
            g[0], g[1] = p[0] / 10.0, 2.0 * p[1]  # grad f = (x/10, 2y)
            opt.step(p, g)
            trace.append(p.copy())
        paths[name] = np.array(trace)
    return paths


#: ch06/weight_init_activation_histogram.py: the six cases of the book's figures 6-10 to 6-14
BOOK_HISTOGRAM_CASES: list[tuple[str, str, Init]] = [
    ("sigmoid", "std 1", Init("std", std=1.0)),
    ("sigmoid", "std 0.01", Init("std", std=0.01)),
    ("sigmoid", "Xavier", Init("xavier")),
    ("relu", "std 0.01", Init("std", std=0.01)),
    ("relu", "Xavier", Init("xavier")),
    ("relu", "He", Init("he")),
]


def activation_experiment(
    activation: str,
    init: Init,
    *,
    samples: int = 1000,
    nodes: int = 100,
    layers: int = 5,
    seed: int = 0,
) -> list[np.ndarray]:
    """The book's histogram experiment: x ~ N(0, 1) of shape (samples, nodes) through
    ``layers`` layers a = x @ W (no bias), z = activation(a), W drawn by ``init``.
    Returns each layer's z, (samples, nodes)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, nodes))
    outs = []
    for _ in range(layers):
        W = init((nodes, nodes), nodes, nodes, rng, np.float64)
        x = ACTIVATIONS[activation]().forward(L.Affine(W).forward(x))
        outs.append(x)
    return outs


def activation_table(
    cases: Sequence[tuple[str, str, Init]] = BOOK_HISTOGRAM_CASES, **kw
) -> pd.DataFrame:
    """Per case and layer: mean, std, the fraction saturated (sigmoid: < 0.05 or > 0.95) or
    zero (ReLU), as the book's text describes the histograms."""
    rows = []
    for activation, label, init in cases:
        for i, z in enumerate(activation_experiment(activation, init, **kw), 1):
            extreme = (
                np.mean((z < 0.05) | (z > 0.95)) if activation == "sigmoid" else np.mean(z == 0)
            )
            rows.append(
                {
                    "activation": activation,
                    "init": label,
                    "layer": i,
                    "mean": z.mean(),
                    "std": z.std(),
                    "saturated or zero": extreme,
                }
            )
    return pd.DataFrame(rows)


# -- Optuna studies (python -m sweeps.optuna_search) ----------------------------------------------

ENV_OPTUNA_STORAGE = "SWEEPS_OPTUNA_STORAGE"
SPEC_ATTR = "sweeps.spec"
ROUNDS_ATTR = "sweeps.rounds"
PARENT_ATTR = "sweeps.mlflow_parent_run_id"


def study_storage(setting: Setting) -> str:
    """Where the setting's studies live: ``$SWEEPS_OPTUNA_STORAGE``, else a journal file next
    to the MLflow store (``mlruns/optuna/journal.log`` for the project store, the search's
    default)."""
    env = os.environ.get(ENV_OPTUNA_STORAGE)
    if env:
        return env
    local = sqlite_path(setting.tracking_uri)
    if local is not None:
        return str(local.parent / "optuna" / "journal.log")
    return str(project_root() / "mlruns" / "optuna" / "journal.log")


def load_study(name: str, setting: Setting):
    """The Optuna study ``name`` in the setting's storage, or None."""
    import optuna

    from sweeps import search

    storage_spec = study_storage(setting)
    if search.is_journal(storage_spec) and not Path(storage_spec).exists():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = search.open_storage(storage_spec, 20, 60)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def study_trials(study) -> pd.DataFrame:
    """One row per complete trial with a finite value: ``number, value, round``, each
    parameter under its own name, and the MLflow run id of the trial."""
    df = study.trials_dataframe(attrs=("number", "value", "params", "user_attrs", "state"))
    if df.empty:
        return df
    df = df[(df["state"] == "COMPLETE") & np.isfinite(df["value"].astype(float))].copy()
    df.columns = [c.removeprefix("params_").removeprefix("user_attrs_") for c in df.columns]
    df["round"] = df["round"].astype(int)
    return df.reset_index(drop=True)


def study_rounds(study) -> pd.DataFrame:
    """Each round's sampler and the range it sampled each numeric parameter from: round 1
    the configured ranges, later rounds the narrowed ones the search stored on the study."""
    attrs = study.user_attrs
    params = attrs[SPEC_ATTR]["params"]
    rows = []
    for r, conf in enumerate(attrs.get(ROUNDS_ATTR, [{"sampler": "?"}]), 1):
        ranges = attrs.get(f"sweeps.ranges.r{r}")
        if r == 1:
            ranges = {
                k: [p["low"], p["high"]]
                for k, p in params.items()
                if p.get("type") != "categorical"
            }
        if ranges is None:
            continue
        row: dict[str, Any] = {
            "round": r,
            "sampler": conf.get("sampler"),
            "n_trials": conf.get("n_trials"),
        }
        for k, (lo, hi) in ranges.items():
            row[f"{k}_low"], row[f"{k}_high"] = lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def study_view(study, spec: Mapping[str, Any] | None = None):
    """An in-memory copy of the complete trials with the original distributions (rounds
    sample narrowed ranges), so Optuna's importance evaluator sees one search space."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    spec = spec or study.user_attrs[SPEC_ATTR]
    dists: dict[str, Any] = {}
    for name, p in spec["params"].items():
        if p.get("type") == "categorical":
            dists[name] = CategoricalDistribution(list(p["choices"]))
        elif p.get("type") == "int":
            dists[name] = IntDistribution(int(p["low"]), int(p["high"]), log=p["log"])
        else:
            dists[name] = FloatDistribution(p["low"], p["high"], log=p["log"])
    view = optuna.create_study(direction=spec.get("direction", "maximize"))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.value is None or not np.isfinite(t.value):
            continue
        view.add_trial(
            optuna.trial.create_trial(
                params=dict(t.params), distributions={k: dists[k] for k in t.params}, value=t.value
            )
        )
    return view


def study_runs(study, setting: Setting, experiment_name: str = "sweeps-search") -> pd.DataFrame:
    """The study's MLflow runs: its parent run's children (one per trial), with the group
    choices as short columns and ``round`` from the trial."""
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None:
        return pd.DataFrame()
    s = Setting(
        setting.quick,
        setting.tracking_uri,
        setting.artifact_root,
        setting.data,
        setting.launch,
        experiment_name,
        setting.custom_store,
    )
    df = search_runs(s, f"tags.mlflow.parentRunId = '{parent}'", finished=False)
    rounds = {t.user_attrs.get("mlflow_run_id"): t.user_attrs.get("round") for t in study.trials}
    if not df.empty:
        df["round"] = df["run_id"].map(rounds)
    return with_short_columns(df)
