"""Optuna search over the run configs: spaces, narrowing rounds, pruning, storage, workers.

The book's protocol (6.5): sample widely on a log scale, train briefly, score on the
validation split, narrow the ranges to where the good trials are, repeat. Here:

- A search space is a config (``conf/search/<name>.yaml``, schema ``SearchSpaceConf``): Optuna
  parameter names mapped to config override keys, base overrides, the metric, and rounds.
- One Optuna study holds every round; each trial carries a ``round`` user attr. Round 1 samples
  over the configured ranges (RandomSampler, seeded); round r > 1 samples in ranges narrowed by
  ``narrow_ranges`` (a pure function) from the complete trials of rounds < r. The ranges of a
  round are computed once, by the first worker that opens the round, and stored in the study's
  user attrs, so every worker and every resume use the same ones. Trials of different rounds
  have different distributions for the same parameter: TPE builds its estimators from the
  values (observations outside the narrowed range are truncated away), and plots and
  importances use a copy of the trials with the original distributions (``original_view``).
- Every decision that must be exact across processes (is there budget left in this round?
  which ranges? is this parameter set new?) is taken under a per-study lock: an exclusive
  file lock for a journal or SQLite storage, ``pg_advisory_lock`` for PostgreSQL. Inside the
  lock a worker fails stale trials, counts, asks Optuna for a trial, samples its parameters,
  checks them for duplicates and records its own pid and host on the trial.
- Budget: a round is done when ``n_trials`` of its trials are COMPLETE, PRUNED, or FAIL by the
  trial itself (an exception, divergence, an invalid config: user attr ``outcome=failed``).
  Trials that FAIL because their worker was interrupted or died (``outcome`` interrupted or
  stale, or no ``outcome`` when Optuna's heartbeat failed them) and rejected duplicates
  (``outcome=duplicate``) do not count: their slot is run again.
- Stale trials: a worker records its host, pid, the pid's start time, its process id
  (``procs.process_id``: boot id, pid namespace, pid, start) and machine id on each trial.
  Any worker, under the lock (at start, and before each reservation), FAILs the RUNNING
  trials whose worker is gone (``procs.gone``): a dead pid of its own boot and pid
  namespace, or a process of an earlier boot of its machine (host name and machine id); a
  worker of another machine is not judged, even under the same host name where both have a
  machine id; one of another pid namespace on this kernel (most often this container before
  a restart) by host name and pid, as before (the journal storage has no heartbeat in
  Optuna 5). RDB storages also record heartbeats and fail trials silent for ``grace_period``
  seconds (other machines and containers).
  The MLflow runs of such trials are ended KILLED, and the launcher ends any child run left
  RUNNING whose trial is finished (``reconcile_runs``). A launcher also does this for the other
  studies of its storage, and ends KILLED the parent run of a study whose launcher died on this
  host with none of its trials running (``end_dead_studies``): a study that is never rerun
  after a SIGKILL is not left RUNNING.
- Duplicates: a sampled parameter set equal to one of a counted or running trial is not
  trained; that trial is told FAIL (``outcome=duplicate``, ``duplicate_of``), which does not
  count, and the sampler is asked again. After ``dedup_attempts`` duplicates in a row the
  round's space is taken as exhausted and the round ends early (recorded in the study).
  Samplers are seeded from (sampler_seed, round, trials so far, worker), so a resumed study
  does not replay its seeded sequence and two workers do not propose the same one.
- Pruning: the trial reports the metric each epoch (``Pruning`` callback). A pruned trial is
  PRUNED in Optuna and its MLflow run KILLED with ``trial_state=PRUNED`` and ``sweeps.pruned``
  (the reason); every child run carries ``trial_state`` (COMPLETE, PRUNED, FAIL).
- A trial is exactly ``python -m sweeps.run <its overrides>``: its config is composed from the
  same ``conf/`` with Hydra's Compose API and run by ``sweeps.run.execute`` with the study's
  parent MLflow run as parent, never evaluating the test set.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from sweeps import stores
from sweeps.config import (
    GROUPS,
    MlflowConf,
    compose,
    conf_dir,
    interrupts_unwrapped,
    register_schemas,
)
from sweeps.procs import gone, hostname, is_this_process, machine_id, process_id, process_start
from sweeps.stores import redact
from sweeps.tracking import sqlite_path
from sweeps.train import Callback

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

log = logging.getLogger("sweeps.search")

PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = ("random", "tpe", "qmc")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("maximize", "minimize")
DEFAULT_JOURNAL = "mlruns/optuna/journal.log"
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: trial_tracking -> what a trial's run records beyond the study's mlflow settings. A search
#: trial of the book's protocol trains in about 0.4 s; its three figures cost 0.25 s more to
#: draw, and its 1,050 detail metric rows (per-layer statistics, timings) about as much to
#: store. "lean" trials keep the params, tags, the loss and accuracy curves every epoch,
#: config, overrides and history.csv (every epoch's detail included), and the detail metrics
#: at the last epoch only; the best-test retrains record everything, as ``sweeps.run`` does.
TRIAL_TRACKING: dict[str, list[str]] = {
    "lean": [
        "mlflow.log_figures=false",
        "mlflow.log_model=false",
        "mlflow.detail_metrics_every=0",
    ],
    "full": [],
}
#: trial_writes: who makes a trial's MLflow store writes (params, metrics, tags, inputs, end).
#: "process": a helper process per worker (``sweeps.writer``), while the next trial trains;
#: "inline": the trial itself, before the next one starts.
TRIAL_WRITES = ("process", "inline")

# Trial user attrs written by this module.
ROUND, OUTCOME, REASON = "round", "outcome", "fail_reason"
HOST, PID, PID_START, WORKER = "worker_host", "worker_pid", "worker_started", "worker"
PROCESS = "worker_process"  # procs.process_id(): which process, unambiguous across machines
MACHINE = "worker_machine"  # procs.machine_id(): tells an earlier boot from another machine
OVERRIDES, RUN_ID, DUPLICATE_OF = "overrides", "mlflow_run_id", "duplicate_of"
UNSENT = "mlflow_unsent"  # the folder of a complete trial's MLflow records its store missed
# Study user attrs.
SPEC, PARENT_RUN, PARENT_URI, BEST_TEST, LAUNCHER = (
    "sweeps.spec",
    "sweeps.mlflow_parent_run_id",
    "sweeps.mlflow_tracking_uri",
    "sweeps.best_test",
    "sweeps.launcher",  # {host, pid, pid_start} of the launcher that opened the study last
)
#: study user attr: the number of the first trial that ``max_failures`` counts. Each launch
#: sets it: a rerun after the cause of the failures is fixed starts with the whole budget.
FAILURES_FROM = "sweeps.failures_from"
#: times in a row a locked section (``Search.locked``) may lose its lock before it gives up
LOCK_ATTEMPTS = 5
_T = TypeVar("_T")


def ranges_attr(r: int) -> str:
    return f"sweeps.ranges.r{r}"


def exhausted_attr(r: int) -> str:
    return f"sweeps.exhausted.r{r}"


class SearchError(RuntimeError):
    """The search cannot go on (bad config, incompatible study, failure limit)."""


# -- schemas ---------------------------------------------------------------------------------


@dataclass
class ParamConf:
    """One searched parameter. ``key``: the config override key it sets (default: its name),
    e.g. ``optimizer.lr`` or a group such as ``optimizer``. ``type``: float | int |
    categorical (default: categorical when ``choices`` is given, else float). ``when``: only
    sample it when earlier categorical parameters have these values (``{optimizer: sgd}`` or
    ``{optimizer: [momentum, nesterov]}``). A string choice is pasted into the override as is,
    so ``"[100,100]"`` sets a list. ``label``: its name in the book-style listing."""

    key: str | None = None
    type: str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None
    when: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def options(self) -> list[Any]:
        return list(self.choices or [])

    @property
    def bounds(self) -> Bounds:
        assert self.low is not None and self.high is not None, "a numeric parameter has bounds"
        return Bounds(float(self.low), float(self.high), self.log, self.type == "int")


@dataclass
class RoundConf:
    n_trials: int = MISSING
    sampler: str = "tpe"


@dataclass
class NarrowConf:
    """Between rounds each numeric range shrinks to the span of the best trials of the rounds
    so far (``top_k`` trials, or else the best ``top_fraction`` of them, at least one), widened
    on each side by ``margin`` times the original width (in log10 space for log parameters),
    and clipped to the original bounds."""

    top_k: int | None = None
    top_fraction: float = 0.2
    margin: float = 0.05


@dataclass
class TPEConf:
    """TPE settings, all explicit: Optuna 5 changed the defaults (multivariate, constant liar)."""

    n_startup_trials: int = 10
    multivariate: bool = True
    group: bool = True
    constant_liar: bool = True


@dataclass
class SearchSpaceConf:
    name: str = MISSING
    description: str = ""
    metric: str = "val/acc"
    direction: str = "maximize"
    base_overrides: list[str] = field(default_factory=list)
    params: dict[str, ParamConf] = field(default_factory=dict)
    rounds: list[RoundConf] = field(default_factory=list)
    narrow: NarrowConf = field(default_factory=NarrowConf)
    tpe: TPEConf = field(default_factory=TPEConf)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"unknown search.direction {self.direction!r}; choose from {list(DIRECTIONS)}"
            )
        if not self.params:
            raise ValueError("search.params is empty: name at least one parameter to search")
        if not self.rounds:
            raise ValueError(
                "search.rounds is empty: give at least one round, e.g. "
                "[{n_trials: 20, sampler: random}]"
            )
        for i, r in enumerate(self.rounds, 1):
            if not (isinstance(r.n_trials, int) and r.n_trials >= 1):
                raise ValueError(
                    f"search.rounds[{i}].n_trials must be an integer >= 1, got {r.n_trials!r}"
                )
            if r.sampler not in SAMPLERS:
                raise ValueError(
                    f"unknown search.rounds[{i}].sampler {r.sampler!r}; choose from "
                    f"{list(SAMPLERS)}"
                )
        n = self.narrow
        if n.top_k is not None and n.top_k < 1:
            raise ValueError(f"search.narrow.top_k must be null or >= 1, got {n.top_k!r}")
        if not 0.0 < n.top_fraction <= 1.0:
            raise ValueError(
                f"search.narrow.top_fraction must be in (0, 1], got {n.top_fraction!r}"
            )
        if not n.margin >= 0.0:
            raise ValueError(f"search.narrow.margin must be >= 0, got {n.margin!r}")
        if self.tpe.n_startup_trials < 0:
            raise ValueError(
                f"search.tpe.n_startup_trials must be >= 0, got {self.tpe.n_startup_trials!r}"
            )
        if self.tpe.group and not self.tpe.multivariate:
            raise ValueError("search.tpe.group=true needs search.tpe.multivariate=true")
        for o in self.base_overrides:
            _override_key(o)  # raises on a malformed override
        seen: dict[str, ParamConf] = {}
        for name, p in self.params.items():
            _check_param(name, p, seen)
            seen[name] = p
        keys = [str(p.key) for p in self.params.values() if not p.when]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(
                f"search.params: override key(s) {dup} set by more than one unconditional parameter"
            )


def _check_param(name: str, p: ParamConf, earlier: Mapping[str, ParamConf]) -> None:
    where = f"search.params.{name}"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise ValueError(f"{where}: invalid parameter name {name!r}")
    p.key = p.key or name
    p.label = p.label or name
    if p.type is None:
        p.type = "categorical" if p.choices is not None else "float"
    if p.type not in PARAM_TYPES:
        raise ValueError(f"{where}.type: unknown type {p.type!r}; choose from {list(PARAM_TYPES)}")
    if p.type == "categorical":
        if not p.choices:
            raise ValueError(
                f"{where}.choices must be a non-empty list for a categorical parameter, got "
                f"{p.choices!r}"
            )
        for c in p.choices:
            if c is not None and not isinstance(c, bool | int | float | str):
                raise ValueError(
                    f"{where}.choices: {c!r} is not a scalar (write a list value as a string: "
                    '"[100,100]")'
                )
        if p.low is not None or p.high is not None or p.log:
            raise ValueError(f"{where}: a categorical parameter takes choices, not low/high/log")
    else:
        if p.choices is not None:
            raise ValueError(
                f"{where}: choices given for a {p.type} parameter; drop them or set type: "
                "categorical"
            )
        if p.low is None or p.high is None:
            raise ValueError(
                f"{where}: a {p.type} parameter needs low and high, got low={p.low!r} "
                f"high={p.high!r}"
            )
        if not (math.isfinite(p.low) and math.isfinite(p.high)) or p.low > p.high:
            raise ValueError(f"{where}: need finite low <= high, got low={p.low!r} high={p.high!r}")
        if p.log and p.low <= 0:
            raise ValueError(f"{where}.low must be > 0 on a log scale, got {p.low!r}")
        if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
            raise ValueError(
                f"{where}: an int parameter needs integer bounds, got low={p.low!r} high={p.high!r}"
            )
    for cond, allowed in p.when.items():
        parent = earlier.get(cond)
        if parent is None or parent.type != "categorical":
            raise ValueError(
                f"{where}.when: {cond!r} must name a categorical parameter listed before {name!r}; "
                f"earlier ones: {[k for k, v in earlier.items() if v.type == 'categorical']}"
            )
        for value in allowed if isinstance(allowed, list | tuple) else [allowed]:
            if value not in parent.options:
                raise ValueError(
                    f"{where}.when: {cond}={value!r} is not one of its choices {parent.options}"
                )


@dataclass
class PrunerConf:
    """``none`` | ``median`` (MedianPruner: n_startup_trials, n_warmup_steps, interval_steps) |
    ``hyperband`` (HyperbandPruner: min_resource, max_resource (null: trainer.epochs of the
    trials, 'auto'), reduction_factor). Steps are epochs."""

    name: str = "none"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    min_resource: int = 1
    max_resource: int | None = None
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        if self.name not in PRUNERS:
            raise ValueError(f"unknown pruner {self.name!r}; choose from {list(PRUNERS)}")
        for key in ("n_startup_trials", "n_warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"pruner.{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("interval_steps", "min_resource"):
            if getattr(self, key) < 1:
                raise ValueError(f"pruner.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.reduction_factor < 2:
            raise ValueError(f"pruner.reduction_factor must be >= 2, got {self.reduction_factor!r}")


@dataclass
class TrialConf:
    """``overrides``: extra config overrides for every trial, after the search's base
    overrides (e.g. ``[trainer.epochs=5]``). Overrides on the command line whose key is not a
    key of this root config are appended here too."""

    overrides: list[str] = field(default_factory=list)


@dataclass
class SearchConfig:
    """The root config of ``python -m sweeps.optuna_search`` (conf/search_config.yaml)."""

    search: Any = MISSING
    study_name: str | None = None
    storage: str | None = None
    n_workers: int = 1
    sampler_seed: int = 0
    max_failures: int | None = 10
    dedup: bool = True
    dedup_attempts: int = 20
    heartbeat_interval: int = 20
    grace_period: int = 60
    poll_interval: float = 1.0
    report_top: int = 20
    evaluate_best: bool = True
    best_seeds: int = 1
    progress: bool = True
    trial_tracking: str = "lean"
    trial_writes: str = "process"
    pruner: PrunerConf = field(default_factory=PrunerConf)
    trial: TrialConf = field(default_factory=TrialConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    worker: int | None = None

    def __post_init__(self) -> None:
        if self.study_name is not None and not STUDY_NAME.match(self.study_name):
            raise ValueError(f"study_name must match {STUDY_NAME.pattern}, got {self.study_name!r}")
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {self.n_workers!r}")
        if self.sampler_seed < 0:
            raise ValueError(f"sampler_seed must be >= 0, got {self.sampler_seed!r}")
        if self.max_failures is not None and self.max_failures < 1:
            raise ValueError(
                f"max_failures must be null (no limit) or >= 1, got {self.max_failures!r}"
            )
        for key in ("dedup_attempts", "heartbeat_interval", "report_top"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period}) must exceed heartbeat_interval "
                f"({self.heartbeat_interval})"
            )
        if not self.poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {self.poll_interval!r}")
        if isinstance(self.best_seeds, bool) or not (
            isinstance(self.best_seeds, int) and self.best_seeds >= 1
        ):
            raise ValueError(
                f"best_seeds must be an integer >= 1 (how many seeds retrain the best "
                f"configuration), got {self.best_seeds!r}"
            )
        if self.best_seeds > 1 and not self.evaluate_best:
            raise ValueError(
                f"best_seeds={self.best_seeds} retrains the best configuration, which "
                "evaluate_best=false turns off; drop one of the two"
            )
        if self.trial_tracking not in TRIAL_TRACKING:
            raise ValueError(
                f"unknown trial_tracking {self.trial_tracking!r}; "
                f"choose from {list(TRIAL_TRACKING)}"
            )
        if self.trial_writes not in TRIAL_WRITES:
            raise ValueError(
                f"unknown trial_writes {self.trial_writes!r}; choose from {list(TRIAL_WRITES)}"
            )
        for o in self.trial.overrides:
            _override_key(o)
        searched = {p.key for p in self.search.params.values()}
        clash = sorted(searched & {_override_key(o) for o in self.trial.overrides})
        if clash:
            raise ValueError(
                f"trial overrides set {clash}, which the search space samples; drop them"
            )
        if self.study_name is None:
            self.study_name = self.search.name

    @property
    def total_trials(self) -> int:
        return sum(r.n_trials for r in self.search.rounds)


def register_search_schemas() -> None:
    """Store the search schemas in Hydra's ConfigStore (idempotent), beside the run schemas."""
    register_schemas()
    cs = ConfigStore.instance()
    cs.store(name="search_schema", node=SearchConfig)
    cs.store(group="schema/search", name="space", node=SearchSpaceConf)


def compose_search(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed root search config (conf/search_config.yaml + overrides)."""
    register_search_schemas()
    return compose(overrides, config_name="search_config")


def validate_search(dcfg: DictConfig) -> SearchConfig:
    """Typed SearchConfig from a composed config; ValueError naming the bad key and value."""
    try:
        obj = OmegaConf.to_object(dcfg)
    except Exception as e:  # OmegaConf wraps errors raised in __post_init__
        seen: BaseException | None = e
        while seen is not None:
            if isinstance(seen, ValueError) and not type(seen).__module__.startswith("omegaconf"):
                raise ValueError(str(seen)) from None
            seen = seen.__cause__ or seen.__context__
        raise
    assert isinstance(obj, SearchConfig)
    return obj


def search_spaces() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "search").glob("*.yaml"))


# -- overrides -------------------------------------------------------------------------------


def _override_key(override: str) -> str:
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form key=value")
    key = override.split("=", 1)[0].lstrip("+~")
    if not key:
        raise ValueError(f"override {override!r} has an empty key")
    return key


def merge_overrides(*lists: Sequence[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one
    (Hydra rejects two values for one group)."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for o in overrides:
            key = _override_key(o)
            merged.pop(key, None)
            merged[key] = o
    return list(merged.values())


def hydra_value(value: Any) -> str:
    """A sampled value as Hydra override text. Strings are pasted as is (choices are
    written by the search config's author: ``off``, ``adam``, ``[100,100]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def quoted(value: Any) -> str:
    """A config value (not a search choice) as override text, quoted when needed."""
    if not isinstance(value, str):
        return hydra_value(value)
    if re.fullmatch(r"[A-Za-z_][\w./:\-]*", value) and value.lower() not in (
        "null",
        "true",
        "false",
        "nan",
        "inf",
    ):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def param_overrides(space: SearchSpaceConf, values: Mapping[str, Any]) -> list[str]:
    return [f"{space.params[name].key}={hydra_value(v)}" for name, v in values.items()]


def mlflow_overrides(m: MlflowConf) -> list[str]:
    return [f"mlflow.{k}={quoted(v)}" for k, v in asdict(m).items()]


# -- sampling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float
    log: bool = False
    integer: bool = False


def original_bounds(space: SearchSpaceConf) -> dict[str, Bounds]:
    return {name: p.bounds for name, p in space.params.items() if p.type != "categorical"}


def is_active(p: ParamConf, values: Mapping[str, Any]) -> bool:
    for cond, allowed in p.when.items():
        if cond not in values:
            return False
        options = allowed if isinstance(allowed, list | tuple) else [allowed]
        if values[cond] not in options:
            return False
    return True


def suggest(trial, space: SearchSpaceConf, ranges: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Sample the active parameters, in order, within ``ranges`` (numeric params)."""
    values: dict[str, Any] = {}
    for name, p in space.params.items():
        if not is_active(p, values):
            continue
        if p.type == "categorical":
            values[name] = trial.suggest_categorical(name, p.options)
        elif p.type == "int":
            lo, hi = ranges[name]
            values[name] = trial.suggest_int(name, int(lo), int(hi), log=p.log)
        else:
            lo, hi = ranges[name]
            values[name] = trial.suggest_float(name, float(lo), float(hi), log=p.log)
    return values


# -- narrowing -------------------------------------------------------------------------------


def top_trials(
    trials: Sequence[tuple[Mapping[str, Any], float]],
    *,
    maximize: bool,
    top_k: int | None = None,
    top_fraction: float = 0.2,
) -> list[tuple[Mapping[str, Any], float]]:
    """The best trials (finite values only): ``top_k`` of them, or else the best
    ``ceil(top_fraction * n)`` (at least one)."""
    finite = [t for t in trials if t[1] is not None and math.isfinite(t[1])]
    ranked = sorted(finite, key=lambda t: t[1], reverse=maximize)
    k = top_k if top_k is not None else max(1, math.ceil(top_fraction * len(ranked)))
    return ranked[:k]


def narrow_ranges(
    bounds: Mapping[str, Bounds],
    trials: Sequence[tuple[Mapping[str, Any], float]],
    *,
    maximize: bool,
    top_k: int | None = None,
    top_fraction: float = 0.2,
    margin: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """The next round's range of each numeric parameter.

    For each parameter, among the trials where it was sampled (conditional parameters are
    ranked within their own trials), take the best ones (``top_trials``); the new range is
    their span widened on each side by ``margin`` times the original width, in log10 space
    for log parameters, and clipped to the original bounds; int parameters round outwards.
    A parameter no trial sampled keeps its original range. Pure: same input, same output.
    """
    out: dict[str, tuple[float, float]] = {}
    for name, b in bounds.items():
        have = [(params, value) for params, value in trials if name in params]
        best = top_trials(have, maximize=maximize, top_k=top_k, top_fraction=top_fraction)
        if not best:
            out[name] = (b.low, b.high)
            continue
        fwd = math.log10 if b.log else float
        lo0, hi0 = fwd(b.low), fwd(b.high)
        points = [fwd(params[name]) for params, _ in best]
        pad = margin * (hi0 - lo0)
        lo_t, hi_t = min(points) - pad, max(points) + pad
        low = b.low if lo_t <= lo0 else (10.0**lo_t if b.log else lo_t)
        high = b.high if hi_t >= hi0 else (10.0**hi_t if b.log else hi_t)
        low, high = max(low, b.low), min(high, b.high)
        if b.integer:
            low, high = float(math.floor(low)), float(math.ceil(high))
        out[name] = (low, high)
    return out


def format_ranges(space: SearchSpaceConf, ranges: Mapping[str, Sequence[float]]) -> str:
    parts = []
    for name, p in space.params.items():
        if name in ranges:
            lo, hi = ranges[name]
            parts.append(f"{p.label}: [{lo:.3g}, {hi:.3g}]{' log' if p.log else ''}")
        else:
            parts.append(f"{p.label}: {p.options}")
    return ", ".join(parts)


# -- storage and locking ---------------------------------------------------------------------


def is_journal(storage: str) -> bool:
    return "://" not in storage


def rdb_url(url: str) -> str:
    """``postgresql://`` uses psycopg (v3) unless psycopg2 is installed."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(storage: str, heartbeat_interval: int, grace_period: int):
    """An Optuna storage for a journal file path or a database URL. RDB storages get
    heartbeats, so trials of a dead worker on another machine are failed after
    ``grace_period`` seconds."""
    import optuna

    if is_journal(storage):
        from optuna.storages.journal import JournalFileBackend

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(storage))
    url = rdb_url(storage)
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {
        "engine_kwargs": engine_kwargs,
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if path is not None:  # a local file: no server to wait for
            return optuna.storages.RDBStorage(url, **kwargs)
        # A database server can restart or fail over under a study that runs for hours: its
        # calls wait for it (``stores.PATIENCE``).
        storage_class = _retrying_rdb_storage()
        for attempt in itertools.count(1):
            try:
                return stores.retrying(storage_class, "Optuna storage", url, **kwargs)
            except Exception as e:
                # Two processes opening a new database at once (two machines launching on an
                # empty one) both create Optuna's tables: one of them fails on the other's.
                # Opened again, it finds them.
                if attempt >= 5 or not _created_meanwhile(e):
                    raise
                time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _created_meanwhile(e: BaseException) -> bool:
    """Whether ``e`` is a table or type that another process created meanwhile (a unique
    key or an ``already exists`` error of a CREATE)."""
    import sqlalchemy.exc

    if isinstance(e, sqlalchemy.exc.IntegrityError):
        return True
    return isinstance(e, sqlalchemy.exc.ProgrammingError) and "already exists" in str(e)


#: RDBStorage's calls that _CachedStorage (what Optuna puts in front of it) makes besides its
#: public ones
_PRIVATE_CALLS = (
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
    "_get_trials",
    "_get_stale_trial_ids",
)


@functools.cache
def _retrying_rdb_storage() -> type:
    """RDBStorage whose every database call is ``retrying``. A subclass, so that Optuna
    still treats it as its own (the trial cache, heartbeats). Only a call that the server
    did not answer is made again: one whose commit was done but whose answer was lost is
    made twice, which for a new trial leaves an orphan RUNNING trial with no worker, failed
    as stale by the next reservation (``fail_stale``)."""
    import optuna

    base = optuna.storages.RDBStorage

    def wrap(name: str):
        method = getattr(base, name)

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            return stores.retrying(method, "Optuna storage", self, *args, **kwargs)

        return call

    names = [
        n
        for n in dir(base)
        if (not n.startswith("_") or n in _PRIVATE_CALLS)
        and callable(getattr(base, n))
        and not isinstance(inspect.getattr_static(base, n), (staticmethod, classmethod, property))
    ]
    return type("RetryingRDBStorage", (base,), {n: wrap(n) for n in names})


class FileLock:
    """An exclusive ``flock`` on a file beside the storage: released by the kernel when the
    holder dies, so a killed worker never leaves it held. Re-entrant within a process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd: int | None = None
        self._depth = 0
        self._thread_lock = threading.RLock()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None


class PgAdvisoryLock:
    """``pg_advisory_lock`` keyed by the study name, on a connection of its own: the server
    releases it when the holder's session ends (a killed worker, a lost machine).

    A restart of the server ends the holder's session too, and another process may take
    the lock while the holder still runs its section. So the section ends in
    ``stores.LockLost`` instead: at its first storage call that meets the outage (its
    ``stores.retrying`` asks ``_check`` before calling again), or at its end when the
    session turns out gone (``pg_advisory_unlock`` cannot run). ``Search.locked`` runs such
    a section again under a new lock."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.key = int.from_bytes(
            hashlib.sha256(f"sweeps:{name}".encode()).digest()[:8], "big", signed=True
        )
        self._conn: Any = None
        self._depth = 0
        self._thread_lock = threading.RLock()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._conn = stores.retrying(self._acquire, "Optuna storage (its study lock)")
            self._depth += 1
            ended: BaseException | None = None
            try:
                with stores.guarding(self._check):
                    yield
            except BaseException as e:
                ended = e
                raise
            finally:
                self._depth -= 1
                if self._depth == 0:
                    held = self._release()
                    # an error of the section itself may be the race (another process
                    # finished a trial it was reserving): the lost lock is the cause
                    not_interrupted = ended is None or isinstance(ended, Exception)
                    if not held and not_interrupted and not isinstance(ended, stores.LockLost):
                        raise stores.LockLost(
                            "the study lock's database session ended while it was held"
                        ) from ended

    def _check(self) -> None:
        """Raise ``stores.LockLost`` if the session holding the lock is gone (a session
        that answers still holds it: the lock is released only with its session)."""
        import sqlalchemy

        try:
            self._conn.execute(sqlalchemy.text("SELECT 1"))
        except Exception as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()
            raise stores.LockLost(
                "the study lock's database session ended while it was held"
                + (f" ({reason[0]})" if reason else "")
            ) from None

    def _release(self) -> bool:
        """Unlock and close the lock's connection; whether the lock was still held."""
        import sqlalchemy

        held = False
        with contextlib.suppress(Exception):  # a session gone meanwhile: nothing to unlock
            held = bool(
                self._conn.execute(
                    sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key}
                ).scalar()
            )
            self._conn.commit()
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None
        return held

    def _acquire(self):
        import sqlalchemy

        conn = self.engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn


class NoLock:
    """Other databases (MySQL...): no cross-process lock, so parallel workers may overshoot a
    round's budget by up to n_workers - 1 trials and may train a duplicate in a race."""

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        yield


def make_lock(storage: str, study_name: str):
    if is_journal(storage):
        return FileLock(Path(storage + ".sweeps.lock"))
    url = rdb_url(storage)
    path = sqlite_path(url)
    if path is not None:
        return FileLock(Path(str(path) + ".sweeps.lock"))
    if url.startswith("postgresql"):
        return PgAdvisoryLock(url, study_name)
    log.warning(
        "no cross-process lock for %s: parallel workers may overshoot the budget", redact(url)
    )
    return NoLock()


# -- trial bookkeeping -----------------------------------------------------------------------

COUNTED = ("complete", "pruned", "failed")
#: outcomes a worker records as it tells Optuna, once it has handed over the run's end
TOLD = (*COUNTED, "interrupted")


def outcome_of(t) -> str:
    """complete | pruned | failed | interrupted | stale | duplicate | running | waiting."""
    from optuna.trial import TrialState

    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.PRUNED:
        return "pruned"
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.WAITING:
        return "waiting"
    return t.user_attrs.get(OUTCOME) or "stale"  # FAIL without our mark: Optuna's heartbeat


@dataclass
class Tally:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: int = 0
    stale: int = 0
    duplicate: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def counted(self) -> int:
        return self.complete + self.pruned + self.failed

    def add(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)


def tally(trials, round_: int | None = None) -> Tally:
    out = Tally()
    for t in trials:
        if ROUND not in t.user_attrs or (round_ is not None and t.user_attrs[ROUND] != round_):
            continue
        out.add(outcome_of(t))
    return out


def best_value(trials, maximize: bool) -> float | None:
    values = [
        t.value
        for t in trials
        if outcome_of(t) == "complete" and t.value is not None and math.isfinite(t.value)
    ]
    if not values:
        return None
    return max(values) if maximize else min(values)


def derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


def make_sampler(name: str, seed: int, tpe: TPEConf):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=tpe.n_startup_trials,
            multivariate=tpe.multivariate,
            group=tpe.group,
            constant_liar=tpe.constant_liar,
        )


def make_pruner(p: PrunerConf):
    import optuna

    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials,
            n_warmup_steps=p.n_warmup_steps,
            interval_steps=p.interval_steps,
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource,
            max_resource=p.max_resource if p.max_resource is not None else "auto",
            reduction_factor=p.reduction_factor,
        )
    return optuna.pruners.NopPruner()


class Pruning(Callback):
    """Reports the metric to Optuna after each epoch; raises TrialPruned when told to."""

    def __init__(self, trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_epoch_end(self, epoch, metrics, model):
        import optuna

        if self.metric not in metrics:
            raise KeyError(
                f"metric {self.metric!r} is not among the epoch metrics {sorted(metrics)}"
            )
        value = float(metrics[self.metric])
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.metric} {value:.4f})")


def is_defaults_override(override) -> bool:
    """Whether a parsed override (Hydra's ``Override``) changes the defaults list (a config
    group's choice: ``optimizer=adam``, ``+experiment=quick``, ``hydra/launcher=...``) rather
    than a value (``optimizer.lr=0.1``, ``~mlflow.run_name``). Hydra's own settings
    (``hydra.job.chdir=...``) count as the former: they apply to the ``hydra`` node, which
    the cached config no longer has."""
    key = override.key_or_group
    return (
        override.package is not None
        or "/" in key
        or key in _config_groups()
        or key.split(".", 1)[0] == "hydra"
    )


@functools.cache
def _config_groups() -> frozenset[str]:
    return frozenset(p.name for p in conf_dir().iterdir() if p.is_dir())


@functools.lru_cache(maxsize=1024)
def _parsed_override(line: str) -> Override:
    """Hydra's parse of one override line (its ANTLR grammar: about 1 ms a line, and a
    trial's base overrides are the same every trial). Parsed overrides are only read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([line])
    return parsed


@functools.lru_cache(maxsize=64)
def _composed_defaults(defaults: tuple[str, ...]) -> tuple[DictConfig, dict[str, Any]]:
    """The config Hydra composes from the defaults list these group overrides give, without
    its ``hydra`` node, and the groups' choices. Cached: composing the defaults list (reading
    and merging every group's YAML and schema) is most of what Hydra's compose costs (0.3 s of
    a book-protocol trial on a loaded 2-core machine), and a study's trials share one or a few
    defaults lists."""
    dcfg = compose(defaults, return_hydra_config=True)
    choices = dict(dcfg.hydra.runtime.choices)
    with open_dict(dcfg):
        del dcfg["hydra"]
    return dcfg, choices


def compose_trial(overrides: Sequence[str]):
    """What ``python -m sweeps.run <overrides>`` composes: (RunConfig, resolved dict, choices).

    As Hydra does, the group overrides pick the defaults list and the config it composes,
    then the value overrides are applied to it (Hydra's own ``_apply_overrides_to_config``,
    same checks, same errors); only the first step is cached (``_composed_defaults``)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from sweeps.config import validate

    with interrupts_unwrapped():
        parsed = [_parsed_override(o) for o in overrides]
        if any(o.is_sweep_override() for o in parsed):
            compose(overrides)  # raises Hydra's own error (no sweeps in one config)
        defaults: list[Override] = []
        values: list[Override] = []
        for o in parsed:
            (defaults if is_defaults_override(o) else values).append(o)
        cached, runtime = _composed_defaults(tuple(o.input_line for o in defaults))
        dcfg = copy.deepcopy(cached)
        ConfigLoaderImpl._apply_overrides_to_config(values, dcfg)
    choices = {g: runtime.get(g) for g in GROUPS}
    experiment = runtime.get("experiment")
    cfg = validate(dcfg)
    cfg.experiment = experiment or cfg.experiment
    resolved = cast(dict[str, Any], OmegaConf.to_container(dcfg, resolve=True))
    resolved["sweep_id"] = cfg.sweep_id
    resolved["experiment"] = cfg.experiment
    return cfg, resolved, choices


def trial_run_end(e: BaseException):
    """How an exception ends a search trial's run: in the requests that end it
    (``tracking.open_run``'s ``ends``), or afterwards (``Search._finish_run``): a pruned
    trial's KILLED with its reason in ``sweeps.pruned``, an interrupted one KILLED, a
    failed one FAILED; each with its ``trial_state``."""
    import optuna

    from sweeps.tracking import RunEnd

    if isinstance(e, optuna.TrialPruned):
        return RunEnd("KILLED", {"trial_state": "PRUNED"}, "sweeps.pruned", str(e))
    if isinstance(e, KeyboardInterrupt):
        return RunEnd("KILLED", {"trial_state": "FAIL"})
    return RunEnd("FAILED", {"trial_state": "FAIL"})


def execute_overrides(overrides: Sequence[str], **kwargs: Any):
    """Compose ``overrides`` and train them as ``sweeps.run`` would (``kwargs`` go to
    ``sweeps.run.execute``); returns its Outcome. A Ctrl-C or SIGTERM that library code
    wrapped in an ordinary exception comes out as the interrupt, so a trial or a retrain
    hit by it is interrupted, never "failed"."""
    from sweeps.run import execute

    with interrupts_unwrapped():
        cfg, resolved, choices = compose_trial(overrides)
        return execute(cfg, resolved, overrides, choices=choices, **kwargs)


# -- the search ------------------------------------------------------------------------------


@dataclass
class Reservation:
    trial: Any
    round: int
    params: dict[str, Any]


class Wait:
    """Every slot of the open round is taken by running trials: poll again."""


@dataclass
class Stop:
    reason: str


class Done:
    """Every round has its budget."""


class Search:
    """One study, seen from one process (the launcher or a worker)."""

    def __init__(self, cfg: SearchConfig, worker: int = 0) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.cfg = cfg
        self.space: SearchSpaceConf = cfg.search
        self.name: str = cfg.study_name or self.space.name
        self.storage_spec = cfg.storage or DEFAULT_JOURNAL
        self.storage = open_storage(self.storage_spec, cfg.heartbeat_interval, cfg.grace_period)
        self.heartbeat = not is_journal(self.storage_spec)
        self.lock = make_lock(self.storage_spec, self.name)
        self.maximize = self.space.direction == "maximize"
        self.worker = worker
        self.host, self.pid = hostname(), os.getpid()
        self.pid_start = process_start(self.pid)
        self.process, self.machine = process_id(), machine_id()
        self.bounds = original_bounds(self.space)
        self._samplers: dict[int, Any] = {}
        self._client = None
        self._experiment_id: str | None = None
        self.label = ""  # in log lines: "" for its own study, "study 'x': " for another's
        self._asked: list[int] = []  # trial ids asked for by a reservation not yet returned
        self._created_parent: str | None = None
        self._in_locked = threading.local()
        self.study = optuna.create_study(
            study_name=self.name,
            storage=self.storage,
            direction=self.space.direction,
            load_if_exists=True,
            pruner=make_pruner(cfg.pruner),
        )

    def locked(self, fn: Callable[[], _T], what: str) -> _T:
        """``fn()`` under the study lock. Run again under a new lock when the lock was lost
        while it ran (``stores.LockLost``: the database server restarted), so ``fn`` must be
        safe to run twice; a section within another one is run again by the outer one."""
        if getattr(self._in_locked, "active", False):
            with self.lock():
                return fn()
        self._in_locked.active = True
        try:
            for attempt in itertools.count(1):
                try:
                    with self.lock():
                        return fn()
                except stores.LockLost as e:
                    if attempt >= LOCK_ATTEMPTS:
                        raise SearchError(
                            f"{what}: the study lock was lost {attempt} times in a row ({e}); "
                            "is the storage's database server restarting over and over?"
                        ) from e
                    log.warning("%s%s: %s; starting over under a new lock", self.label, what, e)
            raise AssertionError("unreachable")
        finally:
            self._in_locked.active = False

    # -- config of the study

    def spec(self) -> dict[str, Any]:
        """What defines the trials of this study: a rerun must match it to resume."""
        return {
            "search": self.space.name,
            "metric": self.space.metric,
            "direction": self.space.direction,
            "params": {k: asdict(v) for k, v in self.space.params.items()},
            "overrides": self.base_overrides(),
        }

    def check_spec(self) -> bool:
        """Store the spec on a new study (or one without trials yet); on a study with
        trials, refuse a different spec. Returns whether a spec was stored before."""
        current = json.loads(json.dumps(self.spec()))

        def stored_spec() -> Any:
            stored = self.study.user_attrs.get(SPEC)
            if stored is None or (stored != current and not self.study.get_trials(deepcopy=False)):
                self.study.set_user_attr(SPEC, current)
                self.study.set_user_attr("sweeps.rounds", [asdict(r) for r in self.space.rounds])
                return None
            return stored

        stored = self.locked(stored_spec, "storing the study's settings")
        if stored is None:
            return False
        if stored != current:
            diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            raise SearchError(
                f"study {self.name!r} in {redact(self.storage_spec)} was created with a different "
                f"{', '.join(diff)}: stored {json.dumps({k: stored.get(k) for k in diff})}, "
                f"now {json.dumps({k: current.get(k) for k in diff})}. Rerun with the same "
                "settings to resume it, or pick a new study_name."
            )
        return True

    def base_overrides(self) -> list[str]:
        return merge_overrides(self.space.base_overrides, self.cfg.trial.overrides)

    def trial_overrides(self, number: int, values: Mapping[str, Any]) -> list[str]:
        run_name = f"{self.name}-t{number}"
        return merge_overrides(
            self.space.base_overrides,
            mlflow_overrides(self.cfg.mlflow),
            TRIAL_TRACKING[self.cfg.trial_tracking],
            self.cfg.trial.overrides,
            [f"sweep_id={quoted(self.name)}", f"mlflow.run_name={quoted(run_name)}"],
            param_overrides(self.space, values),
        )

    def retrain_overrides(self, trial_overrides: Sequence[str], seed: int) -> list[str]:
        """A trial's overrides for a best-test retrain with ``seed``: the study's mlflow
        settings as they are (never a lean trial's), the trial overrides given now."""
        run_name = f"{self.name}-best-test-s{seed}"
        return merge_overrides(
            trial_overrides,
            mlflow_overrides(self.cfg.mlflow),
            self.cfg.trial.overrides,
            [f"seed={seed}", f"mlflow.run_name={quoted(run_name)}"],
        )

    def preflight(self) -> None:
        """Compose and validate a trial config before any trial runs, with each parameter at
        its lower bound / first choice: a typo in the base overrides fails here, once."""
        values: dict[str, Any] = {}
        for name, p in self.space.params.items():
            if is_active(p, values):
                if p.type == "categorical":
                    values[name] = p.options[0]
                else:
                    values[name] = int(p.bounds.low) if p.type == "int" else p.bounds.low
        try:
            cfg, _, _ = compose_trial(self.trial_overrides(0, values))
        except Exception as e:
            raise SearchError(f"the trial config does not compose: {e}") from None
        if self.space.metric.startswith("val/") and cfg.data.val_fraction <= 0:
            raise SearchError(
                f"metric {self.space.metric!r} needs a validation split: data.val_fraction > 0"
            )

    # -- MLflow

    @property
    def tracking(self) -> bool:
        return self.cfg.mlflow.enabled

    @property
    def pruning(self) -> bool:
        return self.cfg.pruner.name != "none"

    def client(self):
        from sweeps import tracking

        if self._client is None:
            m = self.cfg.mlflow
            self._client = tracking.get_client(m.tracking_uri)
            self._experiment_id = tracking.ensure_experiment(
                self._client, m.experiment_name, m.artifact_root, m.tracking_uri
            )
        return self._client

    def parent_run_id(self) -> str | None:
        """The id kept in the study (the launcher made sure it exists in this store)."""
        return self.study.user_attrs.get(PARENT_RUN) if self.tracking else None

    def _children(self, extra: str) -> list:
        """Runs under this study's parent run matching an MLflow filter ``extra``."""
        parent = self.parent_run_id()
        if parent is None:
            return []
        return self.client().search_runs(
            [self._experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.study = '{self.name}'"
            f" and {extra}",
        )

    def ensure_parent_run(self) -> str | None:
        """The study's parent MLflow run: created once (its id kept in the study's user
        attrs), reopened as RUNNING on a resume."""
        if not self.tracking:
            return None
        from sweeps import tracking

        client = self.client()

        def open_run() -> tuple[str, bool]:  # the run, and whether it is new
            run_id = self.parent_run_id()
            if run_id is not None and run_id != self._created_parent:
                try:
                    run = client.get_run(run_id)
                    if run.info.status != "RUNNING":
                        client.update_run(run_id, status="RUNNING")
                    if "sweeps.failure" in run.data.tags:  # why it was ended: no more
                        client.delete_tag(run_id, "sweeps.failure")
                    return run_id, False
                except stores.LockLost:
                    raise
                except Exception:
                    log.warning(
                        "parent run %s not found in %s; creating a new one",
                        run_id,
                        self.cfg.mlflow.tracking_uri,
                    )
            if self._created_parent is None:  # not by an earlier try that lost the lock
                tags = {
                    "sweeps.role": "study",
                    "study": self.name,
                    "search": self.space.name,
                    "sweep_id": self.name,
                    "storage": redact(self.storage_spec),
                    **tracking.environment_tags(),
                }
                run = client.create_run(
                    self._experiment_id, run_name=f"study-{self.name}", tags=tags
                )
                self._created_parent = run.info.run_id
            self.study.set_user_attr(PARENT_RUN, self._created_parent)
            self.study.set_user_attr(PARENT_URI, self.cfg.mlflow.tracking_uri)
            return self._created_parent, True

        run_id, new = self.locked(open_run, "opening the study's MLflow run")
        self._created_parent = None
        if not new:
            return run_id
        params = {
            "search": self.space.name,
            "study": self.name,
            "metric": self.space.metric,
            "direction": self.space.direction,
            "sampler_seed": self.cfg.sampler_seed,
            "rounds": ", ".join(f"{r.n_trials}x{r.sampler}" for r in self.space.rounds),
            "narrow": json.dumps(asdict(self.space.narrow)),
            "tpe": json.dumps(asdict(self.space.tpe)),
            "pruner": json.dumps(asdict(self.cfg.pruner)),
            "base_overrides": " ".join(self.base_overrides()),
            **{
                f"space.{k}": json.dumps(
                    {kk: vv for kk, vv in asdict(p).items() if vv not in (None, {}, False)}
                )
                for k, p in self.space.params.items()
            },
            "ranges.r1": format_ranges(
                self.space, {k: (b.low, b.high) for k, b in self.bounds.items()}
            ),
        }
        self._safe_log_params(run_id, params)
        client.log_text(
            run_id, OmegaConf.to_yaml(OmegaConf.structured(self.space)), "search/space.yaml"
        )
        return run_id

    def _safe_log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params are immutable in MLflow: on a resume, skip the ones already logged."""
        from mlflow.entities import Param

        try:
            have = self.client().get_run(run_id).data.params
            items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
            for i in range(0, len(items), 100):
                self.client().log_batch(run_id, params=items[i : i + 100], synchronous=True)
        except Exception as e:
            log.warning("could not log params to the parent run: %s", e)

    def _runs_of(self, number: int) -> list:
        return self._children(f"tags.trial_number = '{number}'")

    def _end_runs(self, number: int, state: str, reason: str, status: str = "KILLED") -> None:
        """Mark the MLflow run(s) of a trial that ended without its worker's help."""
        if not self.tracking:
            return
        try:
            for run in self._runs_of(number):
                if run.info.status == "RUNNING":
                    self.client().set_tag(run.info.run_id, "sweeps.failure", reason[:5000])
                    self.client().set_terminated(run.info.run_id, status=status)
                self.client().set_tag(run.info.run_id, "trial_state", state)
        except Exception as e:
            log.warning("could not end the MLflow run of trial %d: %s", number, e)

    def tracking_down(self) -> stores.StoreError | None:
        """Why this study's tracking store does not answer now (a tracking server's health
        check, a database server's connection: 2 s at most), or None: it answers, or the
        study is not tracked."""
        if not self.tracking:
            return None
        from sweeps import tracking

        return stores.server_down(tracking.portable_uri(self.cfg.mlflow.tracking_uri))

    def send_kept(self) -> int:
        """Send this study's MLflow records that a store refused and this machine's workers
        kept (in ``writer.UNSENT_ROOT`` under the working directory: a trial's run never
        created, or writes refused for one created), now that the store answers: each run is
        created if need be and ended as its worker meant (``sweeps.resend``), with its
        trial's state as ``trial_state`` (and ``sweeps.pruned``, as ``_finish_run`` would
        have set). A launcher calls it at its start and its end, before ``reconcile_runs``.
        Returns how many folders it sent; a store that does not answer leaves them all."""
        if not self.tracking:
            return 0
        from sweeps import resend, tracking, writer

        folders = resend.kept_folders(Path(writer.UNSENT_ROOT))
        if not folders:
            return 0
        uri = tracking.portable_uri(self.cfg.mlflow.tracking_uri)
        # a tracking server that is down: at once, not through MLflow's retries
        if (down := stores.server_down(uri)) is not None:
            log.warning("%sthe kept MLflow records stay kept: %s", self.label, down)
            return 0
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        sent = 0
        for folder in folders:
            try:
                sent += self._send_kept(folder, uri, trials)
            except Exception as e:  # this one stays kept (the study's end names the folder)
                log.warning("%scould not send %s: %s", self.label, folder, e)
        if sent:
            log.info("%ssent %d folder(s) of kept MLflow records", self.label, sent)
        return sent

    def _send_kept(self, folder: Path, uri: str, trials: Mapping[int, Any]) -> int:
        """Send one kept folder if it is this study's (see ``send_kept``): 1 if sent."""
        from optuna.trial import TrialState

        from sweeps import resend

        try:
            kept = resend.read_kept(folder)
        except ValueError:  # sent meanwhile, or not readable: left to a resend by hand
            return 0
        if kept["tracking_uri"] != uri:
            return 0
        tags = (
            kept["create"].get("tags") or {}
            if kept["run_id"] is None
            else self.client().get_run(kept["run_id"]).data.tags
        )
        if tags.get("study") != self.name or "trial_number" not in tags:
            return 0
        try:
            run_id, ended = resend.resend(folder)
        except ValueError:  # another process sent it first
            return 0
        trial = trials.get(int(tags["trial_number"]))
        if trial is not None and trial.state != TrialState.RUNNING:
            state = trial.state.name
            status = "KILLED" if state == "PRUNED" else ended
            reason = str(trial.user_attrs.get(REASON, ""))
            now = self.client().get_run(run_id).data.tags  # a kept failure, for one
            self._settle_run(run_id, ended, status, state, reason, now)
        return 1

    def _settle_run(
        self, run_id: str, ended: str, status: str, state: str, reason: str, tags: Mapping
    ) -> None:
        """Give a trial's ended run (``ended``: its status now; ``tags``: its tags now) its
        final ``status`` and tags: ``trial_state``, and a pruned trial's reason in place of
        the failure its run ended with."""
        client = self.client()
        if ended != status:
            client.set_terminated(run_id, status=status)
        if state == "PRUNED":
            if "sweeps.failure" in tags:
                client.delete_tag(run_id, "sweeps.failure")
            client.set_tag(run_id, "sweeps.pruned", reason)
        client.set_tag(run_id, "trial_state", state)

    def reconcile_runs(self) -> int:
        """End every MLflow child run left RUNNING whose Optuna trial is no longer running
        (a SIGKILLed worker): KILLED, with the trial's state as ``trial_state``."""
        if not self.tracking or self.parent_run_id() is None:
            return 0
        from optuna.trial import TrialState

        client = self.client()
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        states = {n: t.state for n, t in by_number.items()}
        claim = self.study.user_attrs.get(BEST_TEST) or {}
        ended = 0
        try:
            runs = self._children("attributes.status = 'RUNNING'")
        except Exception as e:
            log.warning("could not list the study's MLflow runs: %s", e)
            return 0
        for run in runs:
            number = run.data.tags.get("trial_number")
            if run.data.tags.get("sweeps.role") == "best-test":
                if not record_gone(claim):
                    continue  # its launcher may still be evaluating
                state = "-"
            elif (
                number is None
                or states.get(int(number)) in (TrialState.RUNNING, None)
                or (
                    _end_on_its_way(by_number[int(number)])
                    and _kept_writes(run.info.run_id) is None  # its end, refused, is kept
                )
            ):
                continue
            else:
                state = states[int(number)].name
            attrs = by_number[int(number)].user_attrs if number is not None else {}
            unsent = attrs.get(UNSENT)
            if unsent:
                reason = (
                    f"its store did not answer at its end; its records are kept in {unsent} "
                    f"(python -m sweeps.resend {unsent} sends them and ends it FINISHED; so "
                    "does the study's command, run again)"
                )
            elif (kept := _kept_writes(run.info.run_id)) is not None:
                reason = (
                    f"its trial ended ({state}, in the Optuna study) and the store refused some "
                    f"of its run's writes, kept in {kept} (python -m sweeps.resend {kept} "
                    "sends them and ends the run; so does the study's command, run again)"
                )
            elif attrs.get(OUTCOME) in TOLD:
                reason = (
                    f"its trial ended ({state}, in the Optuna study) and its worker handed over "
                    "the run's end, which the store has not recorded: the store refused its "
                    "last writes, or its writer process died (its worker's log says which)"
                )
            else:
                reason = "its worker stopped without ending it"
            client.set_tag(run.info.run_id, "sweeps.failure", reason)
            client.set_tag(run.info.run_id, "trial_state", state)
            client.set_terminated(run.info.run_id, status="KILLED")
            ended += 1
        if ended:
            log.info("%smarked %d MLflow run(s) of finished trials KILLED", self.label, ended)
        return ended

    def record_launcher(self) -> None:
        """Record this process as the study's launcher (``end_dead_studies`` judges it),
        and count failures from here on: the trials failed before this launch are no
        longer held against the study (``failure_limit_reason``)."""

        def record() -> None:
            self.study.set_user_attr(LAUNCHER, self.identity())
            self.study.set_user_attr(FAILURES_FROM, len(self.study.get_trials(deepcopy=False)))

        self.locked(record, "recording the launcher")

    def identity(self) -> dict[str, Any]:
        """This process, as a launcher's or a best-test claim's record names it
        (``record_gone`` judges it)."""
        return {
            "host": self.host,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "process": self.process,
            "machine": self.machine,
        }

    def end_dead_studies(self) -> list[str]:
        """For every other study in this storage: FAIL its RUNNING trials whose worker died on
        this host and end their MLflow runs (as ``fail_stale`` and ``reconcile_runs`` do for
        this study at each start), then end its parent run KILLED if the launcher that
        opened it last died on this host and none of its trials is running. A study whose
        launcher was SIGKILLed (or OOM-killed) and is never rerun would otherwise stay
        RUNNING in both stores; a rerun reopens it either way. Trials of other hosts are
        left to their own workers and Optuna's heartbeat. Returns the studies it touched."""
        from optuna.trial import TrialState

        running_runs = self._studies_with_running_runs()
        touched = []
        for summary in self.storage.get_all_studies():
            if summary.study_name == self.name:
                continue
            # Nothing RUNNING in either store: nothing to end, and no full check (about ten
            # storage round trips and two MLflow requests a study; 1.5 s for 30 finished
            # studies on PostgreSQL on loopback, before each launch)
            running = self.storage.get_all_trials(
                summary._study_id, deepcopy=False, states=(TrialState.RUNNING,)
            )
            if not running and running_runs is not None and summary.study_name not in running_runs:
                continue
            try:
                other = self._other_study(summary.study_name)
                failed = other.locked(other.fail_stale, "failing dead workers' trials")
                ended = other.reconcile_runs() + other._end_dead_parent()
            except Exception as e:  # another study's trouble must not stop this one
                log.warning("could not check study %r for dead workers: %s", summary.study_name, e)
                continue
            if failed or ended:
                touched.append(summary.study_name)
        return touched

    def _studies_with_running_runs(self) -> set[str] | None:
        """The studies with a RUNNING trial run or parent run in this MLflow store, in any
        experiment (one search); an empty set untracked (another study's runs are then left
        alone), None if the store could not say."""
        if not self.tracking:
            return set()
        from sweeps import tracking

        try:
            client = self.client()
            experiments: list[str] = []
            token = None
            while True:
                found = client.search_experiments(max_results=1000, page_token=token)
                experiments += [e.experiment_id for e in found]
                token = found.token
                if not token:
                    break
            running = tracking.search_all_runs(client, experiments, "attributes.status = 'RUNNING'")
            return {
                r.data.tags["study"]
                for r in running
                if r.data.tags.get("sweeps.role") in ("trial", "study") and "study" in r.data.tags
            }
        except Exception as e:
            log.warning("could not list the RUNNING runs of other studies: %s", e)
            return None

    def _other_study(self, name: str) -> Search:
        """This search's view of another study of its storage: its trials, its lock and (if
        it was tracked in this MLflow store) its parent run's experiment. No heartbeat
        judgment: that study's workers may beat at another interval than this config's."""
        import optuna

        other = copy.copy(self)
        other.name = name
        other.label = f"study {name!r}: "
        other.study = optuna.load_study(study_name=name, storage=self.storage)
        # A journal or SQLite storage has one lock file (a second flock of it would wait on
        # this process's own); PostgreSQL locks each study by its name.
        other.lock = (
            self.lock if isinstance(self.lock, FileLock) else make_lock(self.storage_spec, name)
        )
        other.heartbeat = False
        other._samplers = {}
        other._asked, other._created_parent, other._in_locked = [], None, threading.local()
        attrs = other.study.user_attrs
        other._experiment_id = None
        same_store = attrs.get(PARENT_URI) == self.cfg.mlflow.tracking_uri
        if self.tracking and attrs.get(PARENT_RUN) and same_store:
            with contextlib.suppress(Exception):  # a parent run deleted from the store
                run = self.client().get_run(attrs[PARENT_RUN])
                other._client, other._experiment_id = self._client, run.info.experiment_id
        if other._experiment_id is None:  # untracked, or tracked elsewhere: its trials only
            other.cfg = replace(self.cfg, mlflow=replace(self.cfg.mlflow, enabled=False))
        return other

    def _end_dead_parent(self) -> int:
        """End this study's parent run KILLED if its launcher died on this host and none of
        its trials is running. Returns 1 if it ended it."""
        from optuna.trial import TrialState

        launcher = self.study.user_attrs.get(LAUNCHER)
        parent = self.parent_run_id()
        if (
            parent is None
            or not launcher
            or not record_gone(launcher)
            or self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        ):
            return 0
        client = self.client()
        if client.get_run(parent).info.status != "RUNNING":
            return 0
        reason = f"its launcher (pid {launcher.get('pid')}) died without ending it"
        client.set_tag(parent, "sweeps.failure", reason)
        client.set_terminated(parent, status="KILLED")
        log.warning("study %r: %s; its MLflow run is marked KILLED", self.name, reason)
        return 1

    # -- stale trials

    def _mark_stale(self, trial_id: int, number: int, reason: str) -> bool:
        """FAIL a RUNNING trial as not counted (``stale``): its slot runs again. False if it
        had finished already."""
        import optuna
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_user_attr(trial_id, OUTCOME, "stale")
            self.storage.set_trial_user_attr(trial_id, REASON, reason)
            self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        log.warning(
            "%strial %d: %s; marked FAIL (not counted: its slot runs again)",
            self.label,
            number,
            reason,
        )
        return True

    def _abandon_asked(self) -> None:
        """FAIL the trials an earlier try of ``reserve`` asked for before it lost the lock:
        another process may have reserved the same slot meanwhile."""
        from optuna.trial import TrialState

        while self._asked:
            t = self.storage.get_trial(self._asked[0])
            if t.state == TrialState.RUNNING:
                reason = "reserved while its worker lost the study lock (a storage outage)"
                self._mark_stale(t._trial_id, t.number, reason)
            self._asked.pop(0)

    def fail_stale(self, include_own: bool = False) -> list[int]:
        """FAIL the RUNNING trials whose worker is gone: on this host, a dead pid or a
        process of an earlier boot (``procs.gone``; or, under the lock, no pid recorded at
        all: its reservation never finished); elsewhere,
        Optuna's heartbeat (RDB storages). ``include_own``: also this process's own RUNNING
        trials (it calls this when it runs none any more). Call with the lock held."""
        import optuna
        from optuna.trial import TrialState

        failed: list[int] = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = t.user_attrs
            if PID in attrs:
                host, pid, process = attrs.get(HOST, ""), int(attrs[PID]), attrs.get(PROCESS, "")
                if include_own and is_this_process(process, host, pid):
                    reason = "its worker was interrupted before recording it"
                elif not gone(process, host, pid, attrs.get(PID_START, ""), attrs.get(MACHINE, "")):
                    continue
                else:
                    reason = f"worker pid {pid} on {host} died while running it"
            elif isinstance(self.lock, NoLock):
                continue
            else:  # reserved under the lock, which its worker no longer holds
                reason = "its reservation never finished (its worker died, or lost the study lock)"
            if self._mark_stale(t._trial_id, t.number, reason):
                failed.append(t.number)
        # After a wait for the storage, the other workers' heartbeats are as late as the
        # outage was long: not judged until a grace period has passed since.
        if self.heartbeat and not stores.waited_within(self.cfg.grace_period):
            before = {
                t.number
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            after = {
                t.number
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            }
            for number in sorted(before - after):
                t = self.study.trials[number]
                if t.state == TrialState.FAIL and OUTCOME not in t.user_attrs:
                    log.warning(
                        "%strial %d: no heartbeat for %ss; marked FAIL by Optuna",
                        self.label,
                        number,
                        self.cfg.grace_period,
                    )
                    failed.append(number)
        for number in failed:
            self._end_runs(number, "FAIL", "its worker died while running it")
        return failed

    # -- rounds

    def ranges_for(self, r: int, trials) -> dict[str, tuple[float, float]]:
        """Round r's numeric ranges: the original bounds for round 1; later, narrowed once
        from the complete trials of rounds < r and stored in the study. Call with the lock."""
        if r == 1:
            return {k: (b.low, b.high) for k, b in self.bounds.items()}
        stored = self.study.user_attrs.get(ranges_attr(r))
        if stored is not None:
            return {k: (float(v[0]), float(v[1])) for k, v in stored.items()}
        done = [
            (t.params, t.value)
            for t in trials
            if outcome_of(t) == "complete" and t.user_attrs.get(ROUND, 0) < r
        ]
        n = self.space.narrow
        ranges = narrow_ranges(
            self.bounds,
            done,
            maximize=self.maximize,
            top_k=n.top_k,
            top_fraction=n.top_fraction,
            margin=n.margin,
        )
        self.study.set_user_attr(ranges_attr(r), {k: list(v) for k, v in ranges.items()})
        text = format_ranges(self.space, ranges)
        log.info(
            "round %d (%s): narrowed from %d complete trials to %s",
            r,
            self.space.rounds[r - 1].sampler,
            len(done),
            text,
        )
        parent = self.parent_run_id()
        if parent is not None:
            self._safe_log_params(parent, {f"ranges.r{r}": text})
        return ranges

    def sampler_for(self, r: int, n_existing: int):
        """One sampler per round and worker, seeded from the sampler seed, the round, the
        trials already in the study and the worker: a fresh single-worker study is
        reproducible, and a resumed one does not replay the sequence it already tried."""
        if r not in self._samplers:
            key = (
                self.worker
                if is_journal(self.storage_spec) or sqlite_path(self.storage_spec)
                else f"{self.host}/{self.worker}"
            )
            seed = derive_seed(self.cfg.sampler_seed, r, n_existing, key)
            self._samplers[r] = make_sampler(self.space.rounds[r - 1].sampler, seed, self.space.tpe)
        return self._samplers[r]

    def failure_limit_reason(self, trials=None) -> str | None:
        """Why the study must stop (``max_failures`` trials failed since it was last
        launched, on any machine), or None."""
        limit = self.cfg.max_failures
        if limit is None:
            return None
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        first = self.study.user_attrs.get(FAILURES_FROM, 0)
        failed = [t for t in trials if t.number >= first and outcome_of(t) == "failed"]
        if len(failed) < limit:
            return None
        last = failed[-1].user_attrs.get(REASON, "?")
        return (
            f"{len(failed)} trials failed since the study was last launched "
            f"(max_failures={limit}); the last one: {last}. Fix the cause (or raise "
            "max_failures) and rerun the same command to resume: each launch counts only "
            "its own failures."
        )

    def reserve(self) -> Reservation | Wait | Stop | Done:
        """Take the next free slot: everything under the lock, so the budget and the
        duplicate check hold across processes. A lock lost meanwhile (the database server
        restarted) starts it over under a new one; a trial asked for before is then
        failed, not trained (another process may have counted or failed it meanwhile)."""
        try:
            return self.locked(self._reserve, "reserving a trial")
        finally:
            self._asked.clear()

    def _reserve(self) -> Reservation | Wait | Stop | Done:
        self._abandon_asked()
        self.fail_stale()
        trials = self.study.get_trials(deepcopy=False)
        attrs = self.study.user_attrs
        for r, rc in enumerate(self.space.rounds, 1):
            c = tally(trials, r)
            if c.counted >= rc.n_trials or attrs.get(exhausted_attr(r)):
                if c.running:
                    return Wait()  # the next round's ranges need every trial of this one
                continue
            if c.counted + c.running >= rc.n_trials:
                return Wait()
            stop = self.failure_limit_reason(trials)  # only when there is work left
            if stop is not None:
                return Stop(stop)
            ranges = self.ranges_for(r, trials)
            self.study.sampler = self.sampler_for(r, len(trials))
            res = self._ask_unique(r, ranges, trials)
            if res is None:
                msg = (
                    f"round {r}: the sampler proposed only parameter sets already tried "
                    f"({self.cfg.dedup_attempts} times in a row); the space looks exhausted, "
                    f"so the round ends with {c.counted} of {rc.n_trials} trials"
                )
                log.warning(msg)
                self.study.set_user_attr(exhausted_attr(r), msg)
                if c.running:
                    return Wait()
                continue
            return res
        return Done()

    def _ask_unique(self, r: int, ranges, trials) -> Reservation | None:
        from optuna.trial import TrialState

        taken: dict[str, int] = {}
        if self.cfg.dedup:
            for t in trials:
                if outcome_of(t) in (*COUNTED, "running") and ROUND in t.user_attrs:
                    taken.setdefault(_params_key(t.params), t.number)
        for _ in range(self.cfg.dedup_attempts):
            with warnings.catch_warnings():  # heartbeats are recorded here, not by optimize()
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = self.study.ask()
            self._asked.append(trial._trial_id)
            for key, value in (
                (ROUND, r),
                (HOST, self.host),
                (PID, self.pid),
                (PID_START, self.pid_start),
                (PROCESS, self.process),
                (MACHINE, self.machine),
                (WORKER, self.worker),
            ):
                trial.set_user_attr(key, value)
            if self.heartbeat:
                self.storage.record_heartbeat(trial._trial_id)
            try:
                values = suggest(trial, self.space, ranges)
            except BaseException as e:
                trial.set_user_attr(OUTCOME, "interrupted")
                trial.set_user_attr(REASON, f"sampling failed: {type(e).__name__}: {e}")
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            dup = taken.get(_params_key(values))
            if dup is None:
                trial.set_user_attr(OVERRIDES, self.trial_overrides(trial.number, values))
                return Reservation(trial, r, values)
            trial.set_user_attr(OUTCOME, "duplicate")
            trial.set_user_attr(DUPLICATE_OF, dup)
            trial.set_user_attr(REASON, f"same parameters as trial {dup}; not trained, resampled")
            self.study.tell(trial, state=TrialState.FAIL)
            log.info("trial %d: same parameters as trial %d; resampling", trial.number, dup)
        return None

    # -- running a trial

    def run_trial(self, res: Reservation, parent_run_id: str | None) -> str:
        """Train one reserved trial and tell Optuna; returns its outcome. KeyboardInterrupt
        (Ctrl-C, SIGTERM) ends the trial as FAIL (``outcome=interrupted``) and propagates."""
        import optuna
        from optuna.trial import TrialState

        from sweeps.tracking import TrackingLost

        trial, number = res.trial, res.trial.number
        overrides = self.trial_overrides(number, res.params)
        tags = {
            "study": self.name,
            "trial_number": number,
            "round": res.round,
            "sweeps.role": "trial",
        }
        beat = (
            _Heartbeat(self.storage, trial._trial_id, self.cfg.heartbeat_interval)
            if self.heartbeat
            else None
        )
        try:
            outcome = execute_overrides(
                overrides,
                extra_tags=tags,
                parent_run_id=parent_run_id,
                # Per-epoch reports only feed a pruner: each is a storage write (a journal
                # append under its lock, 2-4 ms; 50 per book-protocol trial).
                callbacks=[Pruning(trial, self.space.metric)] if self.pruning else [],
                evaluate_test=False,
                progress=False,
                # with the run's last metrics, not a request of its own; a value that turns
                # out non-finite below replaces it with FAIL (_finish_run)
                end_tags={"trial_state": "COMPLETE"},
                run_ends=trial_run_end,  # a pruned or failed trial's too (_finish_run)
            )
            value = outcome.history.last(self.space.metric)
            if not math.isfinite(value):
                raise ValueError(f"metric {self.space.metric} is {value}")
        except TrackingLost as e:  # training finished; its store is gone, or never made its run
            if e.outcome is None or not math.isfinite(
                value := e.outcome.history.last(self.space.metric)
            ):
                raise
            # The value is the trial's own: Optuna gets it. Its MLflow records wait in
            # e.kept for sweeps.resend, which ends the run FINISHED (trial_state COMPLETE,
            # as kept); calling the store now would wait through its retries.
            run = (
                f"its MLflow run {e.outcome.run_id} is left RUNNING (the store does not answer)"
                if e.outcome.run_id
                else "the store did not create its MLflow run"
            )
            log.warning(
                "trial %d: complete, but %s; its records are in %s: python -m sweeps.resend %s",
                number,
                run,
                e.kept,
                e.kept,
            )
            trial.set_user_attr(UNSENT, str(e.kept))
            outcome = e.outcome
        except optuna.TrialPruned as e:
            self._finish_run(trial, str(e), e)
            trial.set_user_attr(OUTCOME, "pruned")
            trial.set_user_attr(REASON, str(e))
            self._tell(trial, state=TrialState.PRUNED)
            return "pruned"
        except KeyboardInterrupt as e:
            with _signals_ignored():
                reason = f"interrupted: {type(e).__name__} {e}".strip()
                trial.set_user_attr(OUTCOME, "interrupted")
                trial.set_user_attr(REASON, reason)
                self._finish_run(trial, reason, e)
                self._tell(trial, state=TrialState.FAIL)
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            log.warning("trial %d failed: %s", number, reason)
            trial.set_user_attr(OUTCOME, "failed")
            trial.set_user_attr(REASON, reason[:2000])
            self._finish_run(trial, reason, e)
            self._tell(trial, state=TrialState.FAIL)
            return "failed"
        finally:
            if beat is not None:
                beat.stop()
        if outcome.run_id:
            trial.set_user_attr(RUN_ID, outcome.run_id)
        trial.set_user_attr(OUTCOME, "complete")
        self._tell(trial, values=value)
        return "complete"

    def _finish_run(self, trial, reason: str, ended: BaseException) -> None:
        """Give the run of a trial that ``ended`` stopped (its run already ended) the status
        and ``trial_state`` that ``trial_run_end`` gives it. A run that ``open_run`` ended so
        already is only named in the trial: a worker whose writer process makes its requests
        then neither waits for it nor reads the store (nor imports MLflow: about 2 s of CPU,
        and 40 ms and a wait for the writer each pruned trial, measured)."""
        if not self.tracking:
            return
        from sweeps import tracking, writer

        if (run_id := tracking.ended_run(ended)) is not None:
            trial.set_user_attr(RUN_ID, run_id)
            return
        end = trial_run_end(ended)
        state, status = end.tags["trial_state"], end.status

        writer.drain_all()  # the run's end, sent to this worker's writer, is in the store
        number = trial.number
        try:
            for run in self._runs_of(number):
                trial.set_user_attr(RUN_ID, run.info.run_id)
                info = run.info
                self._settle_run(info.run_id, info.status, status, state, reason, run.data.tags)
        except Exception as e:
            log.warning("could not update the MLflow run of trial %d: %s", number, e)

    def _tell(self, trial, **kw) -> None:
        import optuna

        for attempt in range(5):
            try:
                self.study.tell(trial, **kw)
                return
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning("trial %d was already finished (failed as stale?)", trial.number)
                return
            except Exception as e:  # a busy database: retry a few times
                if attempt == 4:
                    raise
                log.warning("could not record trial %d (%s); retrying", trial.number, e)
                time.sleep(0.5 * 2**attempt)

    def work(self, parent_run_id: str | None, on_trial: Callable[[], None] | None = None) -> str:
        """Run trials until every round has its budget. Returns 'done'; raises SearchError
        at the failure limit; KeyboardInterrupt propagates. With ``trial_writes=process`` the
        trials' store writes go through a helper process (``sweeps.writer``), which has made
        them all when this returns or raises."""
        with self.trial_writes():
            while True:
                res = self.reserve()
                if isinstance(res, Done):
                    return "done"
                if isinstance(res, Stop):
                    raise SearchError(res.reason)
                if isinstance(res, Wait):
                    time.sleep(self.cfg.poll_interval)
                    continue
                self.run_trial(res, parent_run_id)
                if on_trial is not None:
                    on_trial()

    def trial_writes(self) -> contextlib.AbstractContextManager[Any]:
        """Deferred store writes for this worker's trials (``trial_writes=process``)."""
        from sweeps import writer

        return self._with_writer(writer.deferred_writes)

    def trial_writer_started(self) -> contextlib.AbstractContextManager[Any]:
        """Start the trials' writer process now, for ``work`` in this block to take: it
        imports MLflow while this process sets up (``writer.started_early``)."""
        from sweeps import writer

        return self._with_writer(writer.started_early)

    def _with_writer(self, manager) -> contextlib.AbstractContextManager[Any]:
        """``manager(tracking URI)`` when trials hand their writes to a writer process."""
        if not self.tracking or self.cfg.trial_writes != "process":
            return contextlib.nullcontext()
        return manager(self.cfg.mlflow.tracking_uri)

    # -- results

    def is_complete(self, trials=None) -> bool:
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        attrs = self.study.user_attrs
        for r, rc in enumerate(self.space.rounds, 1):
            c = tally(trials, r)
            if c.running or (c.counted < rc.n_trials and not attrs.get(exhausted_attr(r))):
                return False
        return True

    def report(self) -> Report:
        trials = self.study.get_trials(deepcopy=False)
        attrs = self.study.user_attrs
        rounds = []
        for r, rc in enumerate(self.space.rounds, 1):
            in_round = [t for t in trials if t.user_attrs.get(ROUND) == r]
            stored = (
                attrs.get(ranges_attr(r))
                if r > 1
                else {k: [b.low, b.high] for k, b in self.bounds.items()}
            )
            best = _best_trial(in_round, self.maximize)
            rounds.append(
                RoundReport(
                    r,
                    rc.sampler,
                    rc.n_trials,
                    tally(trials, r),
                    {k: tuple(v) for k, v in stored.items()} if stored is not None else None,
                    best.value if best else None,
                    best.number if best else None,
                )
            )
        complete = [
            t
            for t in trials
            if outcome_of(t) == "complete" and t.value is not None and math.isfinite(t.value)
        ]
        ranked = sorted(complete, key=lambda t: t.values[0], reverse=self.maximize)
        return Report(
            self.name, self.space, rounds, ranked, tally(trials), self.is_complete(trials)
        )


#: Seconds after its trial ended that a run may still be RUNNING because its worker's writer
#: process (trial_writes=process) has not made its end yet; the writer is behind by a trial's
#: writes at most, tens of milliseconds.
RUN_END_GRACE = 60.0


def record_gone(record: dict[str, Any]) -> bool:
    """``procs.gone`` for a launcher's or a best-test claim's record (host, pid, pid_start,
    process, machine); a record without a pid is not known to be gone."""
    if "pid" not in record:
        return False
    return gone(
        record.get("process", ""),
        record.get("host", ""),
        int(record["pid"]),
        record.get("pid_start", ""),
        record.get("machine", ""),
    )


def _kept_writes(run_id: str) -> Path | None:
    """The folder where this machine's worker kept the writes the store refused for run
    ``run_id`` (``writer.StoreWriter._keep``), if there is one not yet sent."""
    from sweeps import writer

    folder = Path(writer.UNSENT_ROOT) / run_id
    return folder.resolve() if (folder / writer.UNSENT_FILE).is_file() else None


def _end_on_its_way(trial) -> bool:
    """Whether a finished trial's run may be RUNNING only until its worker's writer process
    makes the end its worker sent before telling Optuna the outcome (``reconcile_runs``
    leaves it alone). A trial failed as stale has no such end coming, nor has a trial whose
    records its store missed (``UNSENT``: only sweeps.resend ends that run)."""
    import datetime

    if trial.user_attrs.get(OUTCOME) not in TOLD:
        return False
    if trial.user_attrs.get(UNSENT):
        return False
    ended = trial.datetime_complete
    age = (datetime.datetime.now() - ended).total_seconds() if ended is not None else 0.0
    return age < RUN_END_GRACE


def _params_key(params: Mapping[str, Any]) -> str:
    return json.dumps(sorted(params.items()), default=repr)


def _best_trial(trials, maximize: bool):
    complete = [
        t
        for t in trials
        if outcome_of(t) == "complete" and t.value is not None and math.isfinite(t.value)
    ]
    if not complete:
        return None
    return (
        max(complete, key=lambda t: t.values[0])
        if maximize
        else min(complete, key=lambda t: t.values[0])
    )


class _Heartbeat:
    """Records an RDB heartbeat for a running trial every ``interval`` seconds."""

    def __init__(self, storage, trial_id: int, interval: int) -> None:
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as e:
                    log.warning("heartbeat failed: %s", e)

        self._thread = threading.Thread(target=beat, daemon=True, name="optuna-heartbeat")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While recording an interruption, a second Ctrl-C or SIGTERM must not cut it short."""
    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- report ----------------------------------------------------------------------------------


@dataclass
class RoundReport:
    round: int
    sampler: str
    budget: int
    tally: Tally
    ranges: dict[str, tuple[float, float]] | None
    best_value: float | None
    best_number: int | None


@dataclass
class Report:
    study: str
    space: SearchSpaceConf
    rounds: list[RoundReport]
    ranked: list  # complete FrozenTrials, best first
    tally: Tally
    complete: bool

    @property
    def best(self):
        return self.ranked[0] if self.ranked else None

    def metric_label(self) -> str:
        return self.space.metric.replace("/", " ").replace("_", " ")

    def best_k(self, k: int) -> list[str]:
        """The book's listing: ``Best-1 (val acc 0.87) | lr: 0.0088, weight decay: 7.4e-06``."""
        lines = []
        for i, t in enumerate(self.ranked[:k], 1):
            params = ", ".join(
                f"{self.space.params[name].label}: {_fmt(value)}"
                for name, value in t.params.items()
            )
            lines.append(
                f"Best-{i} ({self.metric_label()} {t.value:.4f}) | {params}  [trial {t.number}, "
                f"round {t.user_attrs.get(ROUND)}]"
            )
        return lines

    def text(self, k: int) -> str:
        t = self.tally
        lines = [
            f"study {self.study}: {t.counted} trials counted (complete {t.complete}, pruned "
            f"{t.pruned}, "
            f"failed {t.failed}); not counted: interrupted {t.interrupted}, stale {t.stale}, "
            f"duplicate {t.duplicate}" + ("" if self.complete else "  [INCOMPLETE]"),
        ]
        for rr in self.rounds:
            best = (
                f"{rr.best_value:.4f} (trial {rr.best_number})"
                if rr.best_value is not None
                else "-"
            )
            ranges = (
                format_ranges(self.space, rr.ranges)
                if rr.ranges is not None
                else "(not opened yet)"
            )
            lines.append(
                f"round {rr.round} ({rr.sampler}, {rr.tally.counted}/{rr.budget}): best "
                f"{self.metric_label()} {best} | {ranges}"
            )
        lines.append("=" * 20 + " Hyper-Parameter Optimization Result " + "=" * 20)
        lines.extend(self.best_k(k))
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def original_view(search: Search):
    """An in-memory copy of the finished trials with the original distributions, so that
    Optuna's importance and slice/contour plots see one search space across rounds."""
    import optuna
    from optuna.distributions import (
        BaseDistribution,
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    dists: dict[str, BaseDistribution] = {}
    for name, p in search.space.params.items():
        if p.type == "categorical":
            dists[name] = CategoricalDistribution(p.options)
        elif p.type == "int":
            dists[name] = IntDistribution(int(p.bounds.low), int(p.bounds.high), log=p.log)
        else:
            dists[name] = FloatDistribution(p.bounds.low, p.bounds.high, log=p.log)
    view = optuna.create_study(directions=[search.study.direction])
    for t in search.study.get_trials(deepcopy=False):
        if outcome_of(t) != "complete" or t.value is None or not math.isfinite(t.value):
            continue
        view.add_trial(
            optuna.trial.create_trial(
                params=dict(t.params),
                distributions={k: dists[k] for k in t.params},
                value=t.value,
                user_attrs={ROUND: t.user_attrs.get(ROUND)},
            )
        )
    return view


def study_figures(search: Search) -> dict[str, Any]:
    """Optuna's matplotlib plots; a plot that cannot be drawn (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    import optuna.visualization.matplotlib as vis

    figures: dict[str, Any] = {}
    view = original_view(search)
    if not view.trials:
        return figures
    numeric = [n for n, p in search.space.params.items() if p.type != "categorical" and not p.when]
    plots: list[tuple[str, Callable[[], Any]]] = [
        ("optimization_history", lambda: vis.plot_optimization_history(view)),
        ("slice", lambda: vis.plot_slice(view)),
        ("param_importances", lambda: vis.plot_param_importances(view)),
    ]
    if len(numeric) >= 2:
        plots.append(("contour", lambda: vis.plot_contour(view, params=numeric[:2])))
    for name, make in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = make()
            first = ax.flat[0] if hasattr(ax, "flat") else ax
            figures[name] = first.figure
        except Exception as e:
            log.warning("could not draw %s: %s", name, e)
    return figures
