"""``python -m sweeps.reproduce RUN_ID [overrides]``: run a recorded run again and check
every metric against the original.

    python -m sweeps.reproduce 3f2a9c...                     # same config, seed and data
    python -m sweeps.reproduce 3f2a9c... trainer.epochs=3    # the same run with one change

The run is rebuilt from its recorded resolved config (the ``config.yaml`` artifact), which
holds the seed; conf/ only supplies the schemas, so edits to conf/ since then do not leak in.
Overrides given here change that config (a group override such as ``optimizer=adam`` replaces
the whole group). The new run goes to the original's store and experiment, tagged
``reproduces=<RUN_ID>``, with this report as ``reproduce.txt``.

Every metric history (step by step) is compared exactly; wall-clock metrics (``time/*``) are
listed but not expected to match. Differences are listed with the recorded causes that could
explain them: the config changed (overrides given here), the code changed (git commit, or
uncommitted changes at either time), the data digest changed, or the versions changed
(sweeps, Python, NumPy, platform). Separately, the run's recorded overrides are composed again
with today's conf/: if that no longer gives the recorded config, "conf/ changed" is flagged
(the rerun is unaffected, it uses the recorded config).

Exit status: 0 identical, 1 metrics differ, 2 error.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sweeps import stores
from sweeps.config import GROUPS, compose, conf_dir, validate
from sweeps.diff import (
    BOOKKEEPING,
    Change,
    RunRecord,
    config_changes,
    default_tracking_uri,
    fmt,
    load_run,
    provenance_changes,
    render_tree,
)

log = logging.getLogger("sweeps.reproduce")

WALL_CLOCK = ("time/",)  # metric prefixes that measure time, never expected to repeat


@dataclass(frozen=True)
class MetricCheck:
    """One metric's history in the original (a) and the reproduction (b)."""

    key: str
    status: str  # identical | differs | only in original | only in reproduction | wall clock
    steps: int = 0
    first_step: int | None = None  # first step whose value differs
    max_abs_diff: float | None = None
    final_a: float | None = None
    final_b: float | None = None


@dataclass(frozen=True)
class Cause:
    kind: str  # config | code | data | versions
    detail: str


@dataclass
class Reproduction:
    original: RunRecord
    new: RunRecord
    config: list[Change]  # recorded config -> the config that ran (training keys only)
    conf_drift: list[Change] | str | None  # recorded overrides composed today vs recorded
    metrics: list[MetricCheck]
    causes: list[Cause]
    diverged: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return all(m.status in ("identical", "wall clock") for m in self.metrics)

    def render(self) -> str:
        o, n = self.original, self.new
        out = [
            f"original      {o.run_id}  {o.name}  [{o.status}]",
            f"reproduction  {n.run_id}  {n.name}  [{n.status}]",
        ]
        if self.diverged:
            out.append(f"the reproduction diverged: {self.diverged}")
        out += ["", "== config =="]
        if self.config:
            out.append(
                f"changed by the overrides given ({len(self.config)} key(s), recorded -> rerun):"
            )
            out.append(render_tree(self.config, indent="  "))
        else:
            out.append("the recorded config (config.yaml), unchanged")
        if isinstance(self.conf_drift, str):
            out.append(f"conf/ check: {self.conf_drift}")
        elif self.conf_drift:
            out.append(
                "conf/ changed: the recorded overrides now compose to a different config "
                f"({len(self.conf_drift)} key(s), recorded -> composed today):"
            )
            out.append(render_tree(self.conf_drift, indent="  "))
        else:
            out.append("conf/ check: the recorded overrides still compose to the recorded config")
        compared = [m for m in self.metrics if m.status != "wall clock"]
        same = sum(m.status == "identical" for m in compared)
        clock = [m.key for m in self.metrics if m.status == "wall clock"]
        out += ["", f"== metrics: {same} of {len(compared)} identical at every step =="]
        if clock:
            out.append(f"not compared (wall clock): {', '.join(clock)}")
        differing = [m for m in compared if m.status != "identical"]
        if differing:
            w = max(len(m.key) for m in differing)
            out.append(
                f"{'metric':<{w}}  {'status':<20}  {'steps':>5}  {'first step':>10}  "
                f"{'max |diff|':>10}  {'original':>10}  {'rerun':>10}"
            )
            for m in differing:
                out.append(
                    f"{m.key:<{w}}  {m.status:<20}  {m.steps:>5}  {_opt(m.first_step):>10}  "
                    f"{_g(m.max_abs_diff):>10}  {_g(m.final_a):>10}  {_g(m.final_b):>10}"
                )
        out += ["", "== recorded causes =="]
        if self.causes:
            out += [f"{c.kind} changed: {c.detail}" for c in self.causes]
        else:
            out.append("none: same config, code, data and versions")
        out += [f"note: {x}" for x in self.notes]
        out.append("")
        if self.identical:
            out.append("verdict: IDENTICAL: every metric matches the original at every step")
        elif self.causes:
            out.append(
                "verdict: DIFFERENT; recorded causes: "
                + ", ".join(dict.fromkeys(c.kind for c in self.causes))
            )
        else:
            out.append(
                "verdict: DIFFERENT with no recorded cause: same config, code, data and versions "
                "(suspect nondeterminism, e.g. BLAS threads or hardware)"
            )
        return "\n".join(out)


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def _opt(v: Any) -> str:
    return "-" if v is None else str(v)


# -- rebuilding the config ---------------------------------------------------------------------


def _compose(overrides: Sequence[str], conf: Path):
    return compose(overrides, conf=conf)


def plain(dcfg) -> dict[str, Any]:
    """A DictConfig as resolved plain containers."""
    out = OmegaConf.to_container(dcfg, resolve=True)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def rebuild_config(
    original: RunRecord, overrides: Sequence[str] = (), conf: Path | None = None
) -> tuple[Any, dict[str, str]]:
    """The DictConfig of ``original`` with ``overrides`` on top, schema-checked, and the
    group choices it stands for.

    conf/ is composed with the run's group choices (for the schemas) and the overrides; the
    recorded config is merged over it, minus what the overrides set, so the recorded values
    win everywhere else. Unknown keys or wrong types (the code changed) raise."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if original.config_source != "config.yaml":
        raise ValueError(
            f"run {original.run_id} has no config.yaml artifact; was it recorded by sweeps.run?"
        )
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if any(o.is_sweep_override() for o in parsed):
        raise ValueError(
            "sweep overrides (a,b / range(...)) are not allowed: reproduce runs one configuration"
        )
    changed_groups = {o.key_or_group: str(o.value()) for o in parsed if o.key_or_group in GROUPS}
    choices: dict[str, str] = {}
    for g in GROUPS:
        choice = changed_groups.get(g, original.tags.get(g))
        if choice is None:
            raise ValueError(f"run {original.run_id} has no {g!r} tag (its group choice)")
        choices[g] = choice
    kept = [f"{g}={c}" for g, c in choices.items() if g not in changed_groups]
    base = _compose([*kept, *overrides], conf or conf_dir())
    recorded = copy.deepcopy({k: v for k, v in original.config.items() if k not in changed_groups})
    for o in parsed:
        if o.key_or_group not in GROUPS:
            _drop(recorded, o.key_or_group)
    return OmegaConf.merge(base, recorded), choices


def conf_drift(original: RunRecord, conf: Path | None = None) -> list[Change] | str:
    """Compose the run's recorded overrides with today's conf/ and diff the training keys
    against the recorded config. A string says why the check could not be made."""
    try:
        composed = _compose(original.overrides, conf or conf_dir())
    except Exception as e:  # an override that no longer composes is itself a finding
        first_line = str(e).splitlines()[0] if str(e) else ""
        return f"the recorded overrides no longer compose: {type(e).__name__}: {first_line}"
    return config_changes(original.config, plain(composed), ignore=BOOKKEEPING)


# -- comparing ---------------------------------------------------------------------------------


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) in logging order within a step."""
    hist = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def _equal(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def check_metrics(client, original: RunRecord, new: RunRecord) -> list[MetricCheck]:
    out = []
    for key in sorted(set(original.metrics) | set(new.metrics)):
        if key not in new.metrics:
            out.append(MetricCheck(key, "only in original", final_a=original.metrics[key]))
            continue
        if key not in original.metrics:
            out.append(MetricCheck(key, "only in reproduction", final_b=new.metrics[key]))
            continue
        a, b = metric_history(client, original.run_id, key), metric_history(client, new.run_id, key)
        fa, fb = (a[-1][1] if a else None), (b[-1][1] if b else None)
        if key.startswith(WALL_CLOCK):
            out.append(MetricCheck(key, "wall clock", len(a), final_a=fa, final_b=fb))
            continue
        first: int | None = None
        worst: float | None = 0.0  # None once the steps themselves disagree
        for (sa, va), (sb, vb) in zip(a, b, strict=False):
            if sa != sb or not _equal(va, vb):
                first = min(sa, sb) if first is None else first
                worst = None if sa != sb or worst is None else max(worst, abs(va - vb))
        if len(a) != len(b):
            longer = a if len(a) > len(b) else b
            first = first if first is not None else longer[min(len(a), len(b))][0]
            worst = None
        if first is None:
            out.append(MetricCheck(key, "identical", len(a), final_a=fa, final_b=fb))
        else:
            status = "differs" if len(a) == len(b) else f"steps {len(a)} vs {len(b)}"
            out.append(MetricCheck(key, status, len(a), first, worst, fa, fb))
    return out


def recorded_causes(original: RunRecord, new: RunRecord, config: list[Change]) -> list[Cause]:
    causes = []
    if config:
        causes.append(
            Cause("config", ", ".join(f"{c.key} {fmt(c.a)} -> {fmt(c.b)}" for c in config))
        )
    for kind, key, a, b in provenance_changes(original.tags, new.tags):
        causes.append(Cause(kind, f"{key} {a} -> {b}"))
    dirty = [
        who
        for who, rec in (("original", original), ("reproduction", new))
        if rec.tags.get("git_dirty") == "true"
    ]
    if dirty and not any(c.kind == "code" for c in causes):
        causes.append(
            Cause(
                "code",
                f"uncommitted changes in the checkout ({' and '.join(dirty)}): "
                "same commit, the code may differ",
            )
        )
    return causes


# -- the command -------------------------------------------------------------------------------


def reproduce(
    run_id: str,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
    *,
    experiment_name: str | None = None,
    conf: Path | None = None,
    progress: bool = True,
) -> Reproduction:
    """Rerun ``run_id`` (with ``overrides``) as a new run and compare every metric."""
    from sweeps import tracking
    from sweeps.run import execute
    from sweeps.train import DivergedError

    uri = tracking_uri or default_tracking_uri()
    client = tracking.get_client(uri)
    original = load_run(client, run_id)
    dcfg, choices = rebuild_config(original, overrides, conf)
    dcfg.sweep_id = None  # a reproduction is not a job of the original's sweep
    dcfg.mlflow.enabled = True
    dcfg.mlflow.tracking_uri = uri
    dcfg.mlflow.experiment_name = (
        experiment_name or client.get_experiment(original.experiment_id).name
    )
    dcfg.mlflow.run_name = f"reproduce-{original.name or original.run_id[:8]}"
    cfg = validate(dcfg)
    resolved = plain(dcfg)
    changed = config_changes(original.config, resolved, ignore=BOOKKEEPING)

    diverged = None
    new_id: str | None
    try:
        outcome = execute(
            cfg,
            resolved,
            [*original.overrides, *overrides],
            choices=choices,
            extra_tags={"reproduces": original.run_id},
            evaluate_test="test/acc" in original.metrics,
            progress=progress,
        )
        new_id = outcome.run_id
    except DivergedError as e:  # diverging again is a result to compare, not an error
        diverged = str(e)
        new_id = _latest_reproduction(client, original)
    assert new_id is not None
    new = load_run(client, new_id)

    result = Reproduction(
        original=original,
        new=new,
        config=changed,
        conf_drift=conf_drift(original, conf),
        metrics=check_metrics(client, original, new),
        causes=recorded_causes(original, new, changed),
        diverged=diverged,
    )
    if original.status != "FINISHED":
        result.notes.append(
            f"the original run is {original.status}; its metrics stop where it stopped"
        )
    client.set_tag(new_id, "reproduce.identical", str(result.identical).lower())
    client.log_text(new_id, result.render() + "\n", "reproduce.txt")
    return result


def _latest_reproduction(client, original: RunRecord) -> str | None:
    runs = client.search_runs(
        [original.experiment_id],
        f"tags.reproduces = '{original.run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.reproduce",
        description="Rerun a recorded MLflow run from its recorded config "
        "and compare every metric.",
    )
    parser.add_argument("run_id")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra-style changes to the recorded config (key=value)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI or sweeps.run's)",
    )
    parser.add_argument(
        "--experiment", default=None, help="experiment of the new run (default: the original's)"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        stores.check_tracking_store(
            args.tracking_uri or default_tracking_uri(), "--tracking-uri", read=True
        )
    except (ValueError, stores.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = reproduce(
            args.run_id,
            args.overrides,
            args.tracking_uri,
            experiment_name=args.experiment,
            progress=not args.quiet,
        )
    except (
        Exception
    ) as e:  # an unknown run, an invalid override, code that no longer accepts the config
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(result.render())
    return 0 if result.identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
