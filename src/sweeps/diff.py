"""``python -m sweeps.diff RUN_A RUN_B``: what differs between two recorded runs.

    python -m sweeps.diff 3f2a9c... 9c1b4e...
    python -m sweeps.diff 3f2a9c... 9c1b4e... --metrics 'val/*' --metrics 'test/*'

Four sections: the resolved config as a tree of the keys that differ, the group choices,
code, data and environment (git commit and dirty flag, versions, data digest), and the final
value of every metric with B - A. The config is each run's ``config.yaml`` artifact (the
resolved config ``sweeps.run`` records); a run without one falls back to its params.

The helpers here (reading a run back, diffing two config trees, naming provenance changes)
are shared with ``sweeps.reproduce``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sweeps import stores
from sweeps.config import GROUPS, MlflowConf

ABSENT = object()  # a key present in one config only

# Tags that decide a run's numbers besides its config, by the cause they stand for.
PROVENANCE: dict[str, tuple[str, ...]] = {
    "code": ("git_commit", "git_dirty"),
    "data": ("data_digest",),
    "versions": ("sweeps_version", "python_version", "numpy_version", "platform"),
}

# Config keys that say where and how a run is recorded, not what it trains.
BOOKKEEPING = ("mlflow", "sweep_id", "experiment")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set, else the store ``sweeps.run`` writes to by default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or MlflowConf().tracking_uri


# -- config trees ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One leaf that differs: ``a`` or ``b`` is ``ABSENT`` when only the other has it."""

    path: tuple[str, ...]
    a: Any
    b: Any

    @property
    def key(self) -> str:
        return ".".join(self.path)


def config_changes(
    a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ()
) -> list[Change]:
    """Every leaf of two nested configs that differs, sorted by path. A mapping on one side
    against a value on the other counts as one change at that node. ``ignore`` drops
    top-level keys (e.g. ``BOOKKEEPING``)."""
    out: list[Change] = []

    def walk(x: Any, y: Any, path: tuple[str, ...]) -> None:
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y), key=str):
                if not path and k in ignore:
                    continue
                walk(x.get(k, ABSENT), y.get(k, ABSENT), (*path, str(k)))
        elif not _same(x, y):
            out.append(Change(path, x, y))

    walk(a, b, ())
    return out


def _same(x: Any, y: Any) -> bool:
    if x is ABSENT or y is ABSENT:
        return x is y
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type(x) is type(y) and x == y or (_number(x) and _number(y) and x == y)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A config value as YAML would show it."""
    if v is ABSENT:
        return "(absent)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def render_tree(changes: Sequence[Change], indent: str = "  ") -> str:
    """Changes as a nested tree, one leaf per line: ``name: a -> b``.

    optimizer
      lr: 0.01 -> 0.001
      beta1: (absent) -> 0.9
    seed: 0 -> 1
    """
    lines: list[str] = []
    shown: tuple[str, ...] = ()
    for c in sorted(changes, key=lambda c: c.path):
        *parents, leaf = c.path
        common = 0
        while common < min(len(parents), len(shown)) and parents[common] == shown[common]:
            common += 1
        for depth in range(common, len(parents)):
            lines.append(f"{indent * depth}{parents[depth]}")
        shown = tuple(parents)
        lines.append(f"{indent * len(parents)}{leaf}: {fmt(c.a)} -> {fmt(c.b)}")
    return "\n".join(lines)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"optimizer.lr": 0.1} -> {"optimizer": {"lr": 0.1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# -- reading a run back ------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What MLflow holds about one run, as plain values. ``metrics`` are final values (the
    value at the last step); ``config`` is the resolved config tree."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    start_time: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    config: dict[str, Any]
    config_source: str  # "config.yaml" or "params"
    overrides: list[str] = field(default_factory=list)

    @property
    def choices(self) -> dict[str, str | None]:
        return {
            **{g: self.tags.get(g) for g in GROUPS},
            "experiment": self.tags.get("experiment", "(none)"),
        }


def load_run(client, run_id: str) -> RunRecord:
    """Read a run: tags, params, final metrics, and its resolved config and overrides from
    the ``config.yaml`` and ``overrides.yaml`` artifacts."""
    run = client.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items()}
    params = dict(run.data.params)
    config_text = read_artifact_text(client, run_id, "config.yaml")
    if config_text is not None:
        config, source = yaml.safe_load(config_text) or {}, "config.yaml"
    else:
        config, source = unflatten({k: _parse(v) for k, v in params.items()}), "params"
    overrides_text = read_artifact_text(client, run_id, "overrides.yaml")
    if overrides_text is not None:
        overrides = [str(o) for o in (yaml.safe_load(overrides_text) or [])]
    else:
        overrides = tags.get("overrides", "").split()
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        experiment_id=run.info.experiment_id,
        start_time=run.info.start_time or 0,
        tags=tags,
        params=params,
        metrics=dict(run.data.metrics),
        config=config,
        config_source=source,
        overrides=overrides,
    )


def read_artifact_text(client, run_id: str, path: str) -> str | None:
    """The text of one artifact, or None if the run has no such file."""
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # MLflow raises several types for a missing artifact
            return None
        return Path(local).read_text()


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a progress bar on stderr for every download, even of one small file."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _parse(text: str) -> Any:
    """A param string back to a value ("0.01" -> 0.01, "[100, 100]" -> [100, 100])."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def provenance_changes(
    a: Mapping[str, str], b: Mapping[str, str]
) -> list[tuple[str, str, str, str]]:
    """(cause, tag, a, b) for every provenance tag that differs; a tag one side did not
    record shows as "(not recorded)"."""
    out = []
    for cause, keys in PROVENANCE.items():
        for k in keys:
            va, vb = a.get(k, "(not recorded)"), b.get(k, "(not recorded)")
            if va != vb:
                out.append((cause, k, va, vb))
    return out


# -- the diff ----------------------------------------------------------------------------------


@dataclass
class RunDiff:
    a: RunRecord
    b: RunRecord
    config: list[Change]
    choices: dict[str, tuple[str | None, str | None]]
    provenance: dict[str, tuple[str, str]]
    metrics: list[tuple[str, float | None, float | None]]

    def render(self) -> str:
        a, b = self.a, self.b
        out = [
            *(
                f"{side}  {r.run_id}  {r.name}  [{r.status}]  "
                f"overrides: {' '.join(r.overrides) or '(none)'}"
                for side, r in (("A", a), ("B", b))
            ),
            "",
            f"== config: {len(self.config)} key(s) differ (A -> B) ==",
            render_tree(self.config) if self.config else "(identical)",
        ]
        for rec in (a, b):
            if rec.config_source != "config.yaml":
                out.append(f"(run {rec.run_id} has no config.yaml; its params were used)")
        out += ["", "== group choices =="]
        width = max(len(g) for g in self.choices)
        for g, (va, vb) in self.choices.items():
            shown = fmt_opt(va) if va == vb else f"{fmt_opt(va)} -> {fmt_opt(vb)}"
            out.append(f"{g:<{width}}  {shown}")
        out += ["", "== code, data, versions =="]
        width = max(len(k) for k in self.provenance)
        for k, (va, vb) in self.provenance.items():
            shown = f"{va} (both)" if va == vb else f"{va} -> {vb}"
            out.append(f"{k:<{width}}  {shown}")
        out += ["", "== metrics: final values =="]
        if self.metrics:
            width = max(len(m) for m, _, _ in self.metrics)
            out.append(f"{'metric':<{width}}  {'A':>12}  {'B':>12}  {'B - A':>12}")
            for m, xa, xb in self.metrics:
                delta = xb - xa if xa is not None and xb is not None else None
                out.append(
                    f"{m:<{width}}  {_num(xa):>12}  {_num(xb):>12}  {_num(delta, signed=True):>12}"
                )
        else:
            out.append("(no metrics)")
        return "\n".join(out)


def fmt_opt(v: str | None) -> str:
    return "(not recorded)" if v is None else v


def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.6g}" if signed else f"{v:.6g}"


def diff_records(a: RunRecord, b: RunRecord, metrics: Sequence[str] = ("*",)) -> RunDiff:
    """Compare two loaded runs. ``metrics``: glob patterns of the metric keys to list."""
    choices = {g: (a.choices[g], b.choices[g]) for g in a.choices}
    keys = [k for keys in PROVENANCE.values() for k in keys]
    provenance = {
        k: (a.tags.get(k, "(not recorded)"), b.tags.get(k, "(not recorded)")) for k in keys
    }
    names = sorted(
        k
        for k in set(a.metrics) | set(b.metrics)
        if any(fnmatch.fnmatchcase(k, p) for p in metrics)
    )
    rows = [(k, a.metrics.get(k), b.metrics.get(k)) for k in names]
    return RunDiff(a, b, config_changes(a.config, b.config), choices, provenance, rows)


def diff_runs(
    run_a: str, run_b: str, tracking_uri: str | None = None, metrics: Sequence[str] = ("*",)
) -> RunDiff:
    """Load two runs from the store and diff them (for notebooks: ``print(d.render())``)."""
    from sweeps.tracking import get_client

    client = get_client(tracking_uri or default_tracking_uri())
    return diff_records(load_run(client, run_a), load_run(client, run_b), metrics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.diff",
        description="Config tree, group choices, code/data/versions and final-metric deltas "
        "of two MLflow runs.",
    )
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow store (default: $MLFLOW_TRACKING_URI or {MlflowConf().tracking_uri})",
    )
    parser.add_argument(
        "--metrics",
        action="append",
        default=None,
        metavar="GLOB",
        help="metric keys to list, e.g. 'val/*' (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    try:
        stores.check_tracking_store(
            args.tracking_uri or default_tracking_uri(), "--tracking-uri", read=True
        )
        d = diff_runs(args.run_a, args.run_b, args.tracking_uri, args.metrics or ("*",))
    except Exception as e:  # an unknown run id, an unreachable store
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(d.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
