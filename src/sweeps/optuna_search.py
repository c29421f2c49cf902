"""``python -m sweeps.optuna_search [overrides]``: the book's hyperparameter search, driven by
Optuna 5 over the same configs as ``python -m sweeps.run``.

    python -m sweeps.optuna_search search=book
    python -m sweeps.optuna_search search=book study_name=book-2 n_workers=2
    python -m sweeps.optuna_search search=optimizers pruner=median trainer.epochs=5
    python -m sweeps.optuna_search search=book best_seeds=5   # the best config, 5 seeds
    python -m sweeps.optuna_search search=book storage=postgresql://user:pw@db/optuna \\
        mlflow.tracking_uri=http://mlflow:5000          # the same command on every machine

Overrides whose key belongs to the search's root config (conf/search_config.yaml: ``search``,
``study_name``, ``storage``, ``n_workers``, ``sampler_seed``, ``max_failures``, ``pruner``,
``mlflow``, ``trial``, ...) configure the search; every other override (``trainer.epochs=5``,
``data=synthetic``, ``seed=1``) is appended to each trial's overrides. ``pruner=median`` is
short for ``pruner.name=median``. Rerunning the same command resumes the study and runs only
what is left of its budget.

After the study, the best configuration is trained again and evaluated on the test set
(``evaluate_best``), with ``best_seeds=N`` seeds: the trial's own seed and the N - 1 after it
(0..N-1 by default; the seed also draws the validation split). Each is a child run of the
study's parent run tagged ``sweeps.role=best-test``; the parent gets the mean, sample std and
95% t-interval of the metric, ``val/acc`` and ``test/acc`` over the seeds
(``best/test_acc_mean``, ``best/test_acc_std``, ``best/test_acc_ci_low``, ...). Finished seeds
are recorded in the study: a rerun, or a larger N, trains only the missing ones.

Each trial is an MLflow child run. ``trial_tracking=lean`` (the default) records its params,
tags, loss and accuracy curves, config, overrides and history.csv, and the detail metrics
(per-layer statistics, timings) of the last epoch, with no figures and no weights;
``trial_tracking=full`` records every trial as ``sweeps.run`` does. The best-test runs always
record everything. ``trial_writes=process`` (the default) has a helper process per worker
write the trials' runs to the store while the next trial trains (``sweeps.writer``);
``trial_writes=inline``: each trial writes its own.

Hydra stops here: below, ``sweeps.search`` takes typed dataclasses.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import open_dict

from sweeps import procs, stores, tracking
from sweeps import search as S

if TYPE_CHECKING:
    from sweeps.compare import GroupStats

log = logging.getLogger("sweeps.optuna_search")

ROOT_KEYS = {f.name for f in dataclasses.fields(S.SearchConfig)}
EXIT_FAILURES, EXIT_INTERRUPTED = 3, 130


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides of the search's root config, overrides appended to every trial)."""
    root: list[str] = []
    trial: list[str] = []
    for a in argv:
        key = a.split("=", 1)[0].lstrip("+~")
        head = key.split(".", 1)[0]
        if key == "pruner" and "=" in a:
            root.append("pruner.name=" + a.split("=", 1)[1])
        elif head in ROOT_KEYS:
            root.append(a)
        else:
            trial.append(a)
    return root, trial


def load_config(argv: Sequence[str]) -> S.SearchConfig:
    """Compose conf/search_config.yaml with the overrides and validate it."""
    root, trial = split_overrides(argv)
    dcfg = S.compose_search(root)
    if trial:
        with open_dict(dcfg):
            dcfg.trial.overrides = [*dcfg.trial.overrides, *trial]
    return S.validate_search(dcfg)


# -- progress --------------------------------------------------------------------------------


class StudyProgress:
    """Trials counted/pruned/failed, the best value so far and the elapsed time: a tqdm bar
    on a terminal, a log line per change otherwise."""

    def __init__(self, search: S.Search, enabled: bool = True) -> None:
        self.search = search
        self.total = search.cfg.total_trials
        self.start = time.monotonic()
        self.bar = None
        self._last: tuple | None = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="trial", dynamic_ncols=True)

    def update(self) -> None:
        trials = self.search.study.get_trials(deepcopy=False)
        t = S.tally(trials)
        best = S.best_value(trials, self.search.maximize)
        state = (t.counted, t.pruned, t.failed, t.running, best)
        if state == self._last:
            return
        self._last = state
        best_text = f"{best:.4f}" if best is not None else "-"
        elapsed = time.monotonic() - self.start
        if self.bar is not None:
            self.bar.n = min(t.counted, self.total)
            self.bar.set_postfix(
                pruned=t.pruned, failed=t.failed, running=t.running, best=best_text, refresh=False
            )
            self.bar.refresh()
        else:
            log.info(
                "trials %d/%d | complete %d, pruned %d, failed %d, running %d | best %s %s | %.0fs",
                t.counted,
                self.total,
                t.complete,
                t.pruned,
                t.failed,
                t.running,
                self.search.space.metric,
                best_text,
                elapsed,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- workers ---------------------------------------------------------------------------------


LAUNCHER_PID = "SWEEPS_SEARCH_LAUNCHER_PID"


def _die_with_parent() -> bool:
    """In a worker (Linux): get SIGTERM when the launcher dies, so no worker outlives it.
    False when the launcher is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    launcher = os.environ.get(LAUNCHER_PID)
    return launcher is None or os.getppid() == int(launcher)


def blas_threads(n_workers: int, writers: bool = False) -> int:
    """BLAS threads for each worker: the cores shared among the workers. With ``writers``
    (trial writer processes: tracked, ``trial_writes=process``), one core fewer, rounded to
    the nearest: their MLflow writes run while the trials train, and a BLAS thread whose
    core they take stalls its GEMM's other threads. At least 1."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    if writers and cores > 1:
        return max(1, math.floor((cores - 1) / n_workers + 0.5))
    return max(1, cores // n_workers)


def trial_threads(cfg: S.SearchConfig) -> int:
    """``blas_threads`` for this search's workers."""
    writers = cfg.mlflow.enabled and cfg.trial_writes == "process"
    return blas_threads(cfg.n_workers, writers)


def _fewer_blas_threads(limit: int) -> contextlib.AbstractContextManager[Any]:
    """BLAS limited to ``limit`` threads within, unless it runs on fewer already (a user's
    ``OPENBLAS_NUM_THREADS``...): never more threads than it was given."""
    from threadpoolctl import threadpool_info, threadpool_limits

    now = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    if not now or limit >= max(now):
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def run_workers(cfg: S.SearchConfig, argv: Sequence[str], progress: StudyProgress) -> list[int]:
    """Start n_workers processes running this same command as workers; wait for them."""
    threads = str(trial_threads(cfg))
    env = dict(os.environ)
    env[LAUNCHER_PID] = str(os.getpid())
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        env[var] = threads
    base = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in ("worker", "progress")]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeps.optuna_search", *base, f"worker={i}", "progress=false"],
            env=env,
        )
        for i in range(cfg.n_workers)
    ]
    log.info(
        "started %d workers (pids %s), %s BLAS thread(s) each",
        len(workers),
        [p.pid for p in workers],
        threads,
    )
    try:
        while any(p.poll() is None for p in workers):
            progress.update()
            time.sleep(cfg.poll_interval)
    except KeyboardInterrupt as e:  # SIGTERM (tracking.Terminated) is passed on
        procs.stop_children(workers, getattr(e, "signum", signal.SIGINT))
        raise
    progress.update()
    return [p.returncode for p in workers]


def worker_main(cfg: S.SearchConfig) -> int:
    from threadpoolctl import threadpool_limits

    if not _die_with_parent():
        log.warning("the launcher is gone; worker %s stops", cfg.worker)
        return EXIT_INTERRUPTED
    search = S.Search(cfg, worker=cfg.worker or 0)
    with (
        search.trial_writer_started(),  # its start overlaps this process's opening the store
        threadpool_limits(limits=trial_threads(cfg)),
        tracking.sigterm_as_interrupt(),
    ):
        try:
            search.work(search.parent_run_id())
        except S.SearchError as e:
            log.error("%s", e)
            return EXIT_FAILURES
        except KeyboardInterrupt:
            log.warning("worker %s interrupted; its trial is marked FAIL (not counted)", cfg.worker)
            return EXIT_INTERRUPTED
    return 0


# -- the best configuration, retrained ---------------------------------------------------------


def best_seed_list(trial_seed: int, n: int) -> list[int]:
    """The seeds the best configuration is retrained with: the trial's own seed and the n - 1
    after it (0..n-1 with the default seed 0, like ``sweeps.compare --seeds n``). The first
    retrain reproduces the trial itself, so ``best_seeds=1`` is the single retrain of old."""
    return [trial_seed + k for k in range(n)]


@dataclass
class BestSeeds:
    """The best trial's configuration retrained with several seeds and evaluated on the test
    set. ``records``: one per requested seed, in order, as stored in the study:
    ``{"seed", "outcome": "complete", "run_id", "values": {metric name: value}}`` or
    ``{"seed", "outcome": "failed", "reason"}``."""

    trial: int
    value: float  # the trial's own score, on its seed
    metric: str
    records: list[dict[str, Any]]

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["outcome"] == "complete"]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["outcome"] != "complete"]

    def stats(self) -> dict[str, GroupStats]:
        """Per metric over the finished seeds: n, mean, sample sd, 95% t-interval (the same
        numbers ``sweeps.compare`` gives for these runs)."""
        from sweeps.compare import describe  # scipy: only once there is something to describe

        out = {}
        for name in dict.fromkeys((self.metric, "val/acc", "test/acc", "test/loss")):
            runs = [r for r in self.finished if r["values"].get(name) is not None]
            if runs:
                out[name] = describe(
                    name, [r["values"][name] for r in runs], seeds=[str(r["seed"]) for r in runs]
                )
        return out

    def metrics(self) -> dict[str, float]:
        """For the parent run: ``best/<metric>_mean``, ``_std``, ``_ci_low``, ``_ci_high``
        (std and CI from two seeds on), ``best/seeds_finished``, ``best/seeds_failed``, and
        the names of the single retrain (``best/test_acc``, ``best/test_loss``,
        ``best/retrained_value``), now the means over the seeds."""
        stats = self.stats()
        out: dict[str, float] = {
            "best/seeds_finished": len(self.finished),
            "best/seeds_failed": len(self.failed),
        }
        for name, g in stats.items():
            key = "best/" + name.replace("/", "_")
            out[f"{key}_mean"] = g.mean
            if g.n >= 2:
                out.update(
                    {f"{key}_std": g.sd, f"{key}_ci_low": g.ci_low, f"{key}_ci_high": g.ci_high}
                )
        for name, key in (
            (self.metric, "best/retrained_value"),
            ("test/acc", "best/test_acc"),
            ("test/loss", "best/test_loss"),
        ):
            if name in stats:
                out[key] = stats[name].mean
        return out

    def text(self) -> str:
        seeds = [r["seed"] for r in self.records]
        head = f"best configuration (trial {self.trial}, {self.metric} {self.value:.4f}"
        if len(self.records) == 1:
            r = self.records[0]
            if r["outcome"] != "complete":
                return f"{head}): its retrain failed: {r['reason']}"
            return (
                f"{head}, retrained {r['values'][self.metric]:.4f}): test acc "
                f"{r['values']['test/acc']:.4f} (reported once, never used for selection)"
            )
        lines = [
            f"{head}) retrained with {len(seeds)} seeds ({', '.join(map(str, seeds))}); the test "
            "set is reported only, never used for selection:"
        ]
        stats = self.stats()
        width = max(len(n) for n in [*stats, "metric"])
        for name, g in stats.items():
            spread = (
                f"  std {g.sd:.4f}  95% CI [{g.ci_low:.4f}, {g.ci_high:.4f}]" if g.n >= 2 else ""
            )
            lines.append(f"  {name:<{width}}  mean {g.mean:.4f}{spread}  (n={g.n})")
        for r in self.records:
            if r["outcome"] == "complete":
                values = "  ".join(
                    f"{n} {r['values'][n]:.4f}" for n in stats if r["values"].get(n) is not None
                )
                lines.append(f"  seed {r['seed']}: {values}")
            else:
                lines.append(f"  seed {r['seed']}: failed: {r['reason']}")
        if self.failed:
            lines.append(
                f"  {len(self.failed)} of {len(seeds)} seeds failed; the statistics are over the "
                f"{len(self.finished)} that finished"
            )
        lines.append(
            f"  (seed {seeds[0]} is the seed the trial was selected on: its {self.metric} is "
            "optimistic, the other seeds' are not)"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "value": self.value,
            "metric": self.metric,
            "seeds": self.records,
            "metrics": self.metrics(),
        }


def _stored_records(
    claim: dict, trial: int, trial_seed: int, metric: str
) -> dict[str, dict[str, Any]]:
    """The finished seeds of ``trial`` in the study's best-test attr, by seed. A study
    evaluated by an older version holds one finished retrain (``done``), on the trial's seed."""
    if claim.get("trial") != trial:
        return {}
    if "seeds" in claim:
        return dict(claim["seeds"])
    if claim.get("done"):
        values = {"test/acc": claim.get("test_acc"), "test/loss": claim.get("test_loss")}
        values[metric] = claim.get("retrained_value")
        record = {"seed": trial_seed, "outcome": "complete", "run_id": claim.get("run_id")}
        return {str(trial_seed): {**record, "values": values}}
    return {}


def _claim_best(
    search: S.Search, trial: int, value: float, seeds: list[int], trial_seed: int
) -> dict[str, dict[str, Any]] | None:
    """Under the lock: the seeds of ``trial`` already finished, with this process recorded
    as the one retraining the rest; None when another live process is doing that."""

    def claim() -> dict[str, dict[str, Any]] | None:
        claimed = search.study.user_attrs.get(S.BEST_TEST) or {}
        records = _stored_records(claimed, trial, trial_seed, search.space.metric)
        if all(str(s) in records for s in seeds):
            return records
        if claimed.get("trial") == trial and "pid" in claimed:
            process, host = claimed.get("process", ""), claimed.get("host", "")
            mine = S.is_this_process(process, host, claimed["pid"])
            if not mine and not S.record_gone(claimed):
                log.info("another process retrains trial %d for the test set", trial)
                return None
        search.study.set_user_attr(
            S.BEST_TEST,
            {"trial": trial, "value": value, **search.identity(), "seeds": records},
        )
        return records

    return search.locked(claim, "claiming the best trial's retrains")


def _retrain(search: S.Search, best, seed: int, parent: str | None) -> dict[str, Any]:
    """One retrain of the best trial's overrides with ``seed``, evaluated on the test set.
    A failure is a record (its run is FAILED); Ctrl-C propagates (its run is KILLED)."""
    overrides = search.retrain_overrides(best.user_attrs[S.OVERRIDES], seed)
    tags = {"study": search.name, "sweeps.role": "best-test", "best_trial_number": best.number}
    try:
        outcome = S.execute_overrides(
            overrides,
            extra_tags=tags,
            parent_run_id=parent,
            evaluate_test=True,
            progress=False,
        )
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        log.warning("the best configuration failed with seed %d: %s", seed, reason)
        return {"seed": seed, "outcome": "failed", "reason": reason[:2000]}
    values = {
        search.space.metric: outcome.history.last(search.space.metric),
        "val/acc": outcome.val_acc,
        **outcome.test,
    }
    return {
        "seed": seed,
        "outcome": "complete",
        "run_id": outcome.run_id,
        "values": {k: float(v) for k, v in values.items() if v is not None},
    }


def evaluate_best(search: S.Search, report: S.Report, parent: str | None) -> BestSeeds | None:
    """Retrain the best configuration with ``best_seeds`` seeds and evaluate each on the
    test set, as child runs of the study's parent run (tag ``sweeps.role=best-test``). Each
    finished seed is recorded in the study's user attrs at once, so a rerun, or a larger
    ``best_seeds``, trains only the seeds not recorded yet; one launcher of many does it."""
    best = report.best
    if best is None or S.OVERRIDES not in best.user_attrs:
        return None
    trial_seed = S.compose_trial(best.user_attrs[S.OVERRIDES])[0].seed
    seeds = best_seed_list(trial_seed, search.cfg.best_seeds)
    records = _claim_best(search, best.number, best.value, seeds, trial_seed)
    if records is None:
        return None
    for seed in seeds:
        if str(seed) in records:
            continue
        records[str(seed)] = _retrain(search, best, seed, parent)

        def record(seed: int = seed) -> None:
            claim = dict(search.study.user_attrs.get(S.BEST_TEST) or {})
            claim["seeds"] = {**claim.get("seeds", {}), str(seed): records[str(seed)]}
            search.study.set_user_attr(S.BEST_TEST, claim)

        search.locked(record, "recording a retrain of the best trial")
    return BestSeeds(best.number, best.value, search.space.metric, [records[str(s)] for s in seeds])


def _print_sent(sent: int) -> None:
    """Say how many folders of MLflow records a store had refused ``Search.send_kept`` sent."""
    from sweeps import writer

    if sent:
        root = Path(writer.UNSENT_ROOT).resolve()
        print(f"sent {sent} folder(s) of MLflow records a store had refused ({root})", flush=True)


def _print_kept(sent: int) -> None:
    """Say how many folders of MLflow records a store had refused the study's end sent,
    and name those not sent yet (any study's), if any."""
    from sweeps import resend, writer

    _print_sent(sent)
    root = Path(writer.UNSENT_ROOT).resolve()
    kept = resend.kept_folders(root)
    if kept:
        print(
            f"{len(kept)} folder(s) in {root} hold MLflow records a store refused; once it "
            f"answers, python -m sweeps.resend {root} sends them (and this command, run "
            "again, this study's)",
            flush=True,
        )


def tracking_down_message(
    search: S.Search, parent: str | None, down: Exception, retrain: bool
) -> str:
    """What a study whose tracking store stopped answering by its end left undone, and how
    to finish it."""
    skipped = ["its trials' runs were not checked against their trials"]
    if retrain:
        skipped.append("the best configuration was not retrained")
    if parent is not None:
        skipped.append(f"its parent run {parent} holds no results and stays RUNNING")
    return (
        f"the study's trials are done, but {down}: "
        + "; ".join(skipped)
        + ". Once the store answers, run the same command again: it sends the kept records, "
        "ends each trial's run as its trial ended, retrains and logs the results"
    )


def compare_command(search: S.Search) -> str:
    """The ``sweeps.compare`` command that reads the best configuration's seed runs back."""
    m = search.cfg.mlflow
    return (
        f"python -m sweeps.compare --tracking-uri {m.tracking_uri} --experiment "
        f"{m.experiment_name} --tag sweeps.role=best-test --tag study={search.name} --by study "
        "--metric test/acc"
    )


def log_results(
    search: S.Search,
    parent: str | None,
    report: S.Report,
    best_test: BestSeeds | None,
    elapsed: float,
) -> None:
    """Metrics, the report, the trials table, the ranges and Optuna's plots on the parent run."""
    if parent is None:
        return
    client = search.client()
    run = tracking.Run(client, parent)
    key = search.space.metric.replace("/", "_")
    t = report.tally
    metrics = {
        "trials/counted": t.counted,
        "trials/complete": t.complete,
        "trials/pruned": t.pruned,
        "trials/failed": t.failed,
        "trials/interrupted": t.interrupted,
        "trials/stale": t.stale,
        "trials/duplicate": t.duplicate,
        "time/launcher_s": elapsed,
    }
    if report.best is not None:
        metrics[f"best/{key}"] = report.best.value
        metrics["best/trial_number"] = report.best.number
    if best_test is not None:
        metrics.update(best_test.metrics())
    try:
        run.log_metrics(metrics)
        for rr in report.rounds:
            if rr.best_value is not None:
                run.log_metrics(
                    {f"round/best_{key}": rr.best_value, "round/counted": rr.tally.counted},
                    step=rr.round,
                )
        tags = {
            "best_trial": report.best.number if report.best else "-",
            "complete": str(report.complete).lower(),
        }
        if best_test is not None:
            tags["best_seeds"] = ",".join(str(r["seed"]) for r in best_test.records)
        run.set_tags(tags)
        run.log_text(report.text(search.cfg.report_top) + "\n", "search/report.txt")
        ranges = {f"r{rr.round}": rr.ranges for rr in report.rounds if rr.ranges is not None}
        run.log_text(json.dumps(ranges, indent=2) + "\n", "search/ranges.json")
        if best_test is not None:
            run.log_text(json.dumps(best_test.to_json(), indent=2) + "\n", "search/best_test.json")
        run.log_text(search.study.trials_dataframe().to_csv(index=False), "search/trials.csv")
        for name, fig in S.study_figures(search).items():
            run.log_figure(fig, f"plots/{name}.png")
    except Exception as e:
        log.warning("could not log the results to the parent run: %s", e)


def launch(cfg: S.SearchConfig, argv: Sequence[str]) -> int:
    start = time.monotonic()
    search = S.Search(cfg)
    search.preflight()
    resumed = search.check_spec()
    # One worker: the launcher runs the trials, and their writer process (trial_writes=process)
    # starts now, importing MLflow while the launcher opens the store and the parent run.
    early = search.trial_writer_started() if cfg.n_workers == 1 else contextlib.nullcontext()
    with early:
        return study_main(search, argv, start, resumed)


def study_main(search: S.Search, argv: Sequence[str], start: float, resumed: bool) -> int:
    """The study, once its config is checked: its parent run, the workers (or this process
    with one), the report, the best-test retrains and the results on the parent run."""
    cfg = search.cfg
    parent = search.ensure_parent_run()  # a local store is in WAL mode (tracking.get_client)

    def launch() -> None:
        search.fail_stale()
        search.record_launcher()

    search.locked(launch, "recording the launch")
    sent = search.send_kept()  # what a store refused before this launch, if it answers now
    search.reconcile_runs()
    search.end_dead_studies()  # a killed launcher's study that is never rerun
    before = S.tally(search.study.get_trials(deepcopy=False))
    storage = S.redact(search.storage_spec)
    verb = "resuming" if resumed else "starting"
    print(
        f"{verb} study {search.name!r} ({cfg.search.name}) in {storage}: "
        f"{before.counted}/{cfg.total_trials} "
        f"trials counted; {cfg.n_workers} worker(s); rounds "
        + ", ".join(f"{r.n_trials}x{r.sampler}" for r in cfg.search.rounds),
        flush=True,
    )
    print(
        "round 1 ranges: "
        + S.format_ranges(cfg.search, {k: (b.low, b.high) for k, b in search.bounds.items()}),
        flush=True,
    )
    if parent is not None:
        print(
            f"MLflow parent run {parent}: {tracking.ui_command(cfg.mlflow.tracking_uri)}",
            flush=True,
        )
    _print_sent(sent)

    progress = StudyProgress(search, cfg.progress)
    code, status, message = 0, "FINISHED", ""
    with tracking.sigterm_as_interrupt():
        try:
            if cfg.n_workers == 1:
                with _fewer_blas_threads(trial_threads(cfg)):
                    search.work(parent, on_trial=progress.update)
            else:
                codes = run_workers(cfg, argv, progress)
                if EXIT_FAILURES in codes:
                    raise S.SearchError(
                        search.failure_limit_reason() or "a worker hit the failure limit"
                    )
                if any(c not in (0,) for c in codes):
                    log.warning("worker exit codes: %s", codes)
        except S.SearchError as e:
            code, status, message = 1, "FAILED", f"search stopped: {e}"
        except KeyboardInterrupt as e:
            code, status = EXIT_INTERRUPTED, "KILLED"
            runs = " and their runs KILLED" if search.tracking else ""
            message = (
                f"interrupted ({str(e) or 'Ctrl-C'}); running trials are marked FAIL{runs}; "
                "rerun the same command to resume"
            )
    progress.close()
    # A tracking store that stopped answering is not asked again below: each call would
    # wait through MLflow's retries (about 2 minutes for each of a dozen calls).
    down = search.tracking_down()
    with S._signals_ignored():
        # no trial runs in this process any more
        search.locked(lambda: search.fail_stale(include_own=True), "failing its own trials")
        sent = 0
        if down is None:
            sent = search.send_kept()
            search.reconcile_runs()
        report = search.report()
    print("\n" + report.text(cfg.report_top), flush=True)
    if search.tracking:
        _print_kept(sent)
    best_test = None
    if down is not None:
        retrain = code == 0 and report.complete and cfg.evaluate_best and report.best is not None
        note = tracking_down_message(search, parent, down, retrain)
        message = f"{message}\n{note}" if message else note
        code = code or 1
    elif code == 0 and report.complete and cfg.evaluate_best and report.best is not None:
        try:
            best_test = evaluate_best(search, report, parent)
        except KeyboardInterrupt:
            code, status, message = (
                EXIT_INTERRUPTED,
                "KILLED",
                "interrupted while retraining the best configuration; the seeds that finished "
                "are kept, rerun the same command to train the others",
            )
        except Exception as e:  # e.g. the store: the parent run must still be ended below
            code, status = 1, "FAILED"
            message = f"could not retrain the best configuration: {type(e).__name__}: {e}"
        if best_test is not None:
            print(best_test.text(), flush=True)
            if len(best_test.records) > 1 and parent is not None:
                print(f"compare its seed runs: {compare_command(search)}", flush=True)
            if not best_test.finished:
                code, status = 1, "FAILED"
                message = "no retrain of the best configuration finished: nothing to report"
    if code == 0 and report.complete and report.best is None:
        code, status = 1, "FAILED"
        message = "the study is complete but no trial completed: nothing to report"
    if code == 0 and not report.complete:
        code, status = 1, "FAILED"
        message = (
            "the study is not complete (did a worker crash?); rerun the same command to resume"
        )
    elapsed = time.monotonic() - start
    if down is None:
        log_results(search, parent, report, best_test, elapsed)
    if parent is not None and down is None:
        try:
            search.client().set_terminated(parent, status=status)
        except Exception as e:
            log.warning("could not end the parent run: %s", e)
    if message:
        print(message, file=sys.stderr, flush=True)
    print(f"wall time {elapsed:.1f}s", flush=True)
    return code


USAGE = __doc__.split("Hydra stops here")[0]


def check_stores(cfg: S.SearchConfig) -> None:
    """SearchError unless the study's storage and the MLflow tracking store can be used (a
    server answers, a local file's folder can be made): before the study is opened or a
    worker started. Its workers skip it: their launcher, here or on another machine, has
    checked."""
    storage = cfg.storage or S.DEFAULT_JOURNAL
    try:
        if S.is_journal(storage):
            stores.check_file(Path(storage), f"the Optuna storage at {storage}")
        else:
            stores.check_reachable(S.rdb_url(storage), "Optuna storage", shown=storage)
        if cfg.mlflow.enabled:
            m = cfg.mlflow
            tracking.check_recording(m.tracking_uri, m.experiment_name, m.artifact_root)
    except stores.StoreError as e:
        raise S.SearchError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "search spaces: " + ", ".join(S.search_spaces()))
        return 0
    try:
        cfg = load_config(argv)
    except Exception as e:  # a bad override or value: one clear line, no traceback
        cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None else ""
        detail = f" ({cause})" if cause else ""
        print(f"error: invalid search config: {e}{detail}", file=sys.stderr)
        return 2
    worker = cfg.worker is not None
    tag = f"[w{cfg.worker}] " if worker else ""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("sweeps.run").setLevel(logging.WARNING)  # per-epoch lines of each trial
    try:
        with run_urls_unprinted():
            if worker:
                return worker_main(cfg)
            check_stores(cfg)
            return launch(cfg, argv)
    except S.SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


#: MLflow's switch for the two lines ("View run ... at", "View experiment at") that its client
#: prints whenever it ends a run on a tracking server, after asking the server for the run
#: once more.
SUPPRESS_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@contextlib.contextmanager
def run_urls_unprinted():
    """Inside the block, and in the workers and writer processes started in it, MLflow
    does not print each run's URL as it ends (two lines a trial between the progress lines,
    and a request to the server a trial); the launcher names the study's parent run. Set in
    the environment by the user, the variable is left as it is."""
    if SUPPRESS_URLS in os.environ:
        yield
        return
    os.environ[SUPPRESS_URLS] = "true"
    try:
        yield
    finally:
        os.environ.pop(SUPPRESS_URLS, None)


if __name__ == "__main__":
    sys.exit(main())
