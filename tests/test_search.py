"""The Optuna search: narrowing, search-space configs, budget/resume, dedup, pruning,
failures, stale trials, parallel workers. Tiny synthetic trials throughout."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from hydra.core.config_store import ConfigStore
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from search_helpers import (
    check_invariants,
    load_study,
    mlflow_runs,
    running_trial_with_run,
    spawn,
    tiny_args,
    wait_for,
)
from sweeps import search as S
from sweeps import tracking, writer
from sweeps.optuna_search import load_config, main, split_overrides
from sweeps.stores import StoreError
from sweeps.writer import StoreWriter

# -- narrowing (pure) -------------------------------------------------------------------------


def test_narrow_ranges_hand_computed():
    bounds = {
        "lr": S.Bounds(1e-6, 1e-2, log=True),
        "ratio": S.Bounds(0.0, 1.0),
        "units": S.Bounds(1, 100, integer=True),
    }
    trials = [
        ({"lr": 1e-3, "ratio": 0.2, "units": 10}, 0.9),
        ({"lr": 1e-4, "ratio": 0.4, "units": 20}, 0.8),
        ({"lr": 1e-5, "ratio": 0.6, "units": 30}, 0.3),
        ({"lr": 1e-6, "ratio": 0.8, "units": 40}, 0.1),
    ]
    got = S.narrow_ranges(bounds, trials, maximize=True, top_k=2, margin=0.1)
    # lr: top-2 span 10^-4..10^-3, widened by 0.1 * 4 decades on each side
    assert got["lr"] == pytest.approx((10**-4.4, 10**-2.6))
    assert got["ratio"] == pytest.approx((0.1, 0.5))
    assert got["units"] == (1.0, 30.0)  # 10 - 9.9 clipped to the bound 1; 20 + 9.9 rounded up
    # minimize ranks the other way; a margin past the bounds is clipped to them exactly
    low = S.narrow_ranges(bounds, trials, maximize=False, top_k=1, margin=0.1)
    assert low["lr"] == (1e-6, pytest.approx(10**-5.6))
    assert low["ratio"] == pytest.approx((0.7, 0.9))
    # top_fraction: ceil(0.25 * 4) = 1 trial; margin 0: the range is that trial's value
    one = S.narrow_ranges(bounds, trials, maximize=True, top_fraction=0.25, margin=0.0)
    assert one["lr"] == pytest.approx((1e-3, 1e-3)) and one["ratio"] == pytest.approx((0.2, 0.2))


def test_narrow_ranges_conditional_and_missing_params():
    bounds = {"sgd_lr": S.Bounds(1e-3, 1.0, log=True), "adam_lr": S.Bounds(1e-5, 1e-1, log=True)}
    trials = [
        ({"opt": "sgd", "sgd_lr": 0.1}, 0.5),
        ({"opt": "sgd", "sgd_lr": 0.01}, 0.2),
        ({"opt": "adam", "adam_lr": 1e-3}, 0.9),
        ({"opt": "adam", "adam_lr": 1e-2}, float("nan")),  # never ranked
    ]
    got = S.narrow_ranges(bounds, trials, maximize=True, top_k=1, margin=0.0)
    assert got["sgd_lr"] == pytest.approx((0.1, 0.1))  # ranked among the sgd trials only
    assert got["adam_lr"] == pytest.approx((1e-3, 1e-3))
    assert S.narrow_ranges(bounds, [], maximize=True) == {
        "sgd_lr": (1e-3, 1.0),
        "adam_lr": (1e-5, 1e-1),
    }


def test_narrowing_on_a_synthetic_objective_finds_the_good_region():
    """The book's picture: accuracy peaks around lr 1e-3 whatever the weight decay. After a
    random round, the lr range closes in on the peak; the weight decay range stays wide."""
    rng = np.random.default_rng(0)
    bounds = {"lr": S.Bounds(1e-6, 1e-2, log=True), "wd": S.Bounds(1e-8, 1e-4, log=True)}
    lr = 10 ** rng.uniform(-6, -2, 200)
    wd = 10 ** rng.uniform(-8, -4, 200)
    acc = np.exp(-((np.log10(lr) + 3) ** 2) / 0.18)  # ~ within 0.3 decades of 1e-3
    trials = [({"lr": a, "wd": b}, float(v)) for a, b, v in zip(lr, wd, acc, strict=True)]
    got = S.narrow_ranges(bounds, trials, maximize=True, top_fraction=0.1, margin=0.05)
    lo, hi = got["lr"]
    assert 10**-4 < lo < 1e-3 < hi < 10**-2
    assert math.log10(hi) - math.log10(lo) < 1.5  # from 4 decades down to under 1.5
    wlo, whi = got["wd"]
    assert math.log10(whi) - math.log10(wlo) > 3  # weight decay barely matters: stays wide
    # a second narrowing from the same trials is the same (pure)
    assert S.narrow_ranges(bounds, trials, maximize=True, top_fraction=0.1, margin=0.05) == got


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("space", S.search_spaces())
def test_every_search_space_composes_and_its_trials_compose(space):
    cfg = load_config([f"search={space}"])
    assert cfg.study_name == space and cfg.search.rounds
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    ranges = {k: (b.low, b.high) for k, b in S.original_bounds(cfg.search).items()}
    for _ in range(4):
        trial = study.ask()
        values = S.suggest(trial, cfg.search, ranges)
        overrides = S.merge_overrides(
            cfg.search.base_overrides, S.param_overrides(cfg.search, values)
        )
        synthetic = ["data=synthetic", "data.synthetic_train=2000"]  # the spaces take 1000
        run_cfg, resolved, choices = S.compose_trial([*overrides, *synthetic])
        for name, value in values.items():
            key = cfg.search.params[name].key
            if key in choices:
                assert choices[key] == value
            else:
                node = resolved
                for part in key.split("."):
                    node = node[part]
                assert node == pytest.approx(value)
        study.tell(trial, 0.0)


def _compose_uncached(overrides):
    from omegaconf import open_dict

    from sweeps.config import compose

    dcfg = compose(overrides, return_hydra_config=True)
    choices = {g: dcfg.hydra.runtime.choices.get(g) for g in S.GROUPS}
    with open_dict(dcfg):
        del dcfg["hydra"]
    return OmegaConf.to_container(dcfg, resolve=True), choices


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optimizer.lr=0.5", "weight_decay=l2", "weight_decay.strength=1e-3"],
        ["optimizer=adam", "optimizer.beta1=0.8", "init=xavier", "batchnorm=on"],
        ["experiment=quick", "trainer.epochs=3", "seed=7"],
        ["model=simple_cnn", "model.filters=8", "dropout=on", "dropout.ratio=0.25"],
        ["model.hidden_sizes=[8,4]", "mlflow.run_name='s-t3'", "sweep_id=s", "data=synthetic"],
        ["+optimizer.extra=1", "optimizer=momentum"],
        ["~mlflow.run_name"],
        ["hydra.job.chdir=true", "optimizer.lr=0.2"],
    ],
)
def test_trial_composition_with_a_cached_defaults_list_equals_hydras(overrides):
    """compose_trial composes each defaults list once and applies the value overrides to a
    copy; the result must be Hydra's, whatever the overrides' order, for every trial."""
    for order in (overrides, overrides[::-1]):
        try:
            expected = _compose_uncached(order)
        except Exception as e:  # the override is an error: the same error
            with pytest.raises(type(e)) as err:
                S.compose_trial(order)
            assert str(err.value) == str(e)
            continue
        for _ in range(2):  # the second one comes from the cache
            _, resolved, choices = S.compose_trial(order)
            resolved = {k: v for k, v in resolved.items() if k not in ("sweep_id", "experiment")}
            want = {k: v for k, v in expected[0].items() if k not in ("sweep_id", "experiment")}
            assert (resolved, choices) == (want, expected[1])


def test_a_trial_never_sees_another_trials_values():
    a = S.compose_trial(["optimizer.lr=0.5", "trainer.epochs=2"])[1]
    b = S.compose_trial(["trainer.epochs=3"])[1]
    assert (a["optimizer"]["lr"], a["trainer"]["epochs"]) == (0.5, 2)
    assert (b["optimizer"]["lr"], b["trainer"]["epochs"]) == (0.01, 3)
    with pytest.raises(Exception, match="optimizer.typo"):
        S.compose_trial(["optimizer.typo=1"])


def test_book_space_is_the_books_protocol():
    space = load_config(["search=book"]).search
    assert space.metric == "val/acc" and space.direction == "maximize"
    assert (space.params["lr"].low, space.params["lr"].high, space.params["lr"].log) == (
        1e-6,
        1e-2,
        True,
    )
    wd = space.params["weight_decay"]
    assert (wd.key, wd.low, wd.high, wd.log) == ("weight_decay.strength", 1e-8, 1e-4, True)
    cfg, _, choices = S.compose_trial(space.base_overrides)
    assert cfg.data.train_size == 500 and cfg.data.val_fraction == 0.2
    assert (
        cfg.model.hidden_sizes == [100] * 6
        and choices["init"] == "he"
        and choices["optimizer"] == "sgd"
    )
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, choices["weight_decay"]) == (50, 100, "l2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.params.lr.low=-1"], "search.params.lr.low must be > 0 on a log scale, got -1.0"),
        (
            ["search.params.lr.low=1"],
            "search.params.lr: need finite low <= high, got low=1.0 high=0.01",
        ),
        (
            ["search.rounds=[{n_trials:0,sampler:random}]"],
            "search.rounds[1].n_trials must be an integer >= 1, got 0",
        ),
        (["search.rounds=[{n_trials:3,sampler:grid}]"], "unknown search.rounds[1].sampler 'grid'"),
        (["search.direction=up"], "unknown search.direction 'up'"),
        (["pruner=medain"], "unknown pruner 'medain'"),
        (["n_workers=0"], "n_workers must be >= 1, got 0"),
        (["search.narrow.top_fraction=0"], "search.narrow.top_fraction must be in (0, 1], got 0.0"),
        (
            ["search=optimizers", "search.params.sgd_lr.when={optimizer:sgdd}"],
            "optimizer='sgdd' is not one of its choices",
        ),
        (
            ["search=tricks", "search.params.init.choices=[]"],
            "search.params.init.choices must be a non-empty list",
        ),
        (
            ["optimizer.lr=0.1"],
            "trial overrides set ['optimizer.lr'], which the search space samples",
        ),
        (["study_name=a b"], "study_name must match"),
        (["trial_tracking=fat"], "unknown trial_tracking 'fat'; choose from ['lean', 'full']"),
        (
            ["trial_writes=async"],
            "unknown trial_writes 'async'; choose from ['process', 'inline']",
        ),
    ],
)
def test_bad_search_configs_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(overrides)
    assert message in str(err.value)


def test_unknown_keys_fail_at_compose_time(capsys):
    with pytest.raises(Exception, match="typo"):
        load_config(["search.params.lr.typo=1"])
    assert main(["search=nope"]) == 2
    assert "invalid search config" in capsys.readouterr().err


def test_split_overrides_routes_trial_keys_to_trials():
    root, trial = split_overrides(
        [
            "search=book",
            "n_workers=2",
            "mlflow.enabled=false",
            "pruner=median",
            "pruner.n_warmup_steps=2",
            "trainer.epochs=5",
            "data=synthetic",
            "seed=3",
            "+model.foo=1",
        ]
    )
    assert root == [
        "search=book",
        "n_workers=2",
        "mlflow.enabled=false",
        "pruner.name=median",
        "pruner.n_warmup_steps=2",
    ]
    assert trial == ["trainer.epochs=5", "data=synthetic", "seed=3", "+model.foo=1"]
    cfg = load_config(["search=book", "trainer.epochs=5", 'trial.overrides=["seed=1"]'])
    assert cfg.trial.overrides == ["seed=1", "trainer.epochs=5"]


def test_merge_overrides_and_values():
    assert S.merge_overrides(["optimizer=sgd", "a.b=1"], ["optimizer=adam"]) == [
        "a.b=1",
        "optimizer=adam",
    ]
    assert (
        S.hydra_value(1e-5) == "1e-05"
        and S.hydra_value(True) == "true"
        and S.hydra_value("off") == "off"
    )
    assert S.quoted("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    assert S.quoted("a b") == "'a b'" and S.quoted("null") == "'null'"
    assert S.redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert S.rdb_url("postgresql://h/db").startswith("postgresql")


# -- the search, in process -------------------------------------------------------------------


def _register(name: str, params: dict[str, S.ParamConf], rounds, base: list[str]) -> None:
    """A search space only this test process knows (ConfigStore), for in-process runs."""
    space = S.SearchSpaceConf(
        name=name, params=params, rounds=[S.RoundConf(n, s) for n, s in rounds], base_overrides=base
    )
    ConfigStore.instance().store(group="search", name=name, node=space)


def test_search_runs_rounds_logs_everything_and_resumes_with_nothing_left(
    tmp_path, mlflow_store, capsys
):
    storage = str(tmp_path / "journal.log")
    args = tiny_args(storage, mlflow_store, study="e2e", rounds=[(4, "random"), (3, "tpe")])
    args = [a for a in args if a != "evaluate_best=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Best-1 (val acc " in out and "| lr: " in out and "weight decay: " in out
    assert "test acc" in out
    trials = check_invariants(storage, mlflow_store, "e2e", [4, 3])

    study = load_study(storage, "e2e")
    r2 = study.user_attrs[S.ranges_attr(2)]
    assert (
        1e-6 <= r2["lr"][0] <= r2["lr"][1] <= 1.0
        and 1e-8 <= r2["weight_decay"][0] <= r2["weight_decay"][1] <= 1e-4
    )
    assert math.log10(r2["lr"][1] / r2["lr"][0]) < 6  # narrower than the original 6 decades
    for t in trials:
        if t.user_attrs[S.ROUND] == 2:
            assert r2["lr"][0] <= t.params["lr"] <= r2["lr"][1]

    client = MlflowClient(mlflow_store["uri"])
    parent = client.get_run(study.user_attrs[S.PARENT_RUN])
    assert parent.info.status == "FINISHED"
    assert {"best/val_acc", "best/test_acc", "trials/counted"} <= set(parent.data.metrics)
    assert parent.data.metrics["trials/counted"] == 7
    assert {"ranges.r1", "ranges.r2", "space.lr", "rounds"} <= set(parent.data.params)
    assert "search/report.txt" in [
        a.path for a in client.list_artifacts(parent.info.run_id, "search")
    ]
    runs = mlflow_runs(mlflow_store, "e2e")
    trial_runs = [r for r in runs if r.data.tags.get("sweeps.role") == "trial"]
    assert len(trial_runs) == 7
    assert not [
        r for r in trial_runs if any(k.startswith("test/") for k in r.data.metrics)
    ]  # never the test set
    assert all("val/acc" in r.data.metrics for r in trial_runs)
    best_runs = [r for r in runs if r.data.tags.get("sweeps.role") == "best-test"]
    assert len(best_runs) == 1 and "test/acc" in best_runs[0].data.metrics
    assert best_runs[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.metrics["best/test_acc"] == best_runs[0].data.metrics["test/acc"]
    # a trial is `sweeps.run <its overrides>`: the overrides are on the trial and its run
    t0 = trials[0]
    assert f"optimizer.lr={t0.params['lr']!r}" in t0.user_attrs[S.OVERRIDES]
    run0 = next(r for r in trial_runs if r.data.tags["trial_number"] == "0")
    assert run0.data.tags["overrides"] == " ".join(t0.user_attrs[S.OVERRIDES])

    # the same command again: nothing left to run, no second test evaluation
    assert main(args) == 0
    assert len(load_study(storage, "e2e").trials) == len(trials)
    assert (
        len(
            [
                r
                for r in mlflow_runs(mlflow_store, "e2e")
                if r.data.tags.get("sweeps.role") == "best-test"
            ]
        )
        == 1
    )
    # a different search space under the same study name is refused
    assert main([*args, "search.params.lr.low=1e-5"]) == 2
    assert "was created with a different params" in capsys.readouterr().err


FIGURES = {"activations/init.png", "activations/final.png", "learning_curve.png"}


def _artifacts(client, run_id: str) -> set[str]:
    found, folders = set(), [None]
    while folders:
        for a in client.list_artifacts(run_id, folders.pop()):
            if a.is_dir:
                folders.append(a.path)
            else:
                found.add(a.path)
    return found


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_lean_trials_keep_curves_and_history_and_the_best_test_run_records_everything(
    tmp_path, mlflow_store
):
    """trial_tracking=lean (the default): a trial's run has no figures or weights and its
    detail metrics at the last epoch only, every epoch in history.csv; its params go to the
    store at the start, its metrics and tags in one request at the end; the best-test
    retrain records as sweeps.run does. trial_tracking=full: trials do too."""
    storage = str(tmp_path / "journal.log")
    base = tiny_args(storage, mlflow_store, study="lean", rounds=[(2, "random")], epochs=12)
    base = [a for a in base if not a.startswith(("mlflow.log_", "evaluate_best="))]
    writes: list[tuple[str, str]] = []  # (method, run id), made in this process
    deferred: list[tuple[str, str]] = []  # (request, run token), sent to the writer process
    ids: dict[str, str] = {}  # run token -> run id, as the writer process answered
    with pytest.MonkeyPatch.context() as mp:
        for name in ("log_batch", "set_tag", "log_param", "log_metric", "set_terminated"):
            real = getattr(MlflowClient, name)
            mp.setattr(
                MlflowClient,
                name,
                lambda self, run_id, *a, _real=real, _name=name, **k: (
                    writes.append((_name, run_id)) or _real(self, run_id, *a, **k)
                ),
            )
        mp.setattr(writer, "WAIT_READY", True)  # else the first trials write themselves
        real_call = StoreWriter.call
        mp.setattr(
            StoreWriter,
            "call",
            lambda self, op, run_id, *a, **k: (
                deferred.append((op, run_id)) or real_call(self, op, run_id, *a, **k)
            ),
        )
        real_created = StoreWriter.created

        def created(self, token):
            run_id, uri = real_created(self, token)
            ids[token] = run_id
            return run_id, uri

        mp.setattr(StoreWriter, "created", created)
        assert main(base) == 0
    # pruner=none: no per-epoch reports to the storage (a write each), the curves are in MLflow
    assert [t.intermediate_values for t in load_study(storage, "lean").trials] == [{}, {}]
    client = MlflowClient(mlflow_store["uri"])
    runs = mlflow_runs(mlflow_store, "lean")
    trials = [r for r in runs if r.data.tags["sweeps.role"] == "trial"]
    (best,) = [r for r in runs if r.data.tags["sweeps.role"] == "best-test"]
    assert len(trials) == 2
    for r in trials:
        rid = r.info.run_id
        assert _artifacts(client, rid) == {"config.yaml", "overrides.yaml", "history.csv"}
        assert _steps(client, rid, "val/acc") == list(range(1, 13))
        assert _steps(client, rid, "act/1/dead") == [12]
        assert _steps(client, rid, "time/epoch") == [12]
        assert r.data.tags["trial_state"] == "COMPLETE"
        # trial_writes=process (the default): made by the worker's writer process, in order,
        # the run's creation too
        assert [w for w, run_id in writes if run_id == rid] == []
        (token,) = [t for t, run_id in ids.items() if run_id == rid]
        assert [w for w, ref in deferred if ref == token] == [
            "create_run",
            "log_batch",  # the params
            "log_texts",  # config.yaml, overrides.yaml
            "log_inputs",
            "log_batch",  # the metrics and tags
            "log_texts",  # history.csv
            "set_terminated",
        ]
        history = client.download_artifacts(rid, "history.csv", str(tmp_path / rid))
        header, *rows = Path(history).read_text().splitlines()
        assert "act/1/dead" in header.split(",") and len(rows) == 12
        assert r.data.params["mlflow.log_figures"] == "False"
    assert _artifacts(client, best.info.run_id) >= FIGURES | {"model/params.npz", "history.csv"}
    assert _steps(client, best.info.run_id, "act/1/dead") == list(range(1, 13))
    assert best.data.params["mlflow.log_figures"] == "True"

    full = [a.replace("study_name=lean", "study_name=full") for a in base]
    assert main([*full, "trial_tracking=full", "evaluate_best=false"]) == 0
    for r in mlflow_runs(mlflow_store, "full"):
        if r.data.tags["sweeps.role"] == "trial":
            assert _artifacts(client, r.info.run_id) >= FIGURES | {"model/params.npz"}
            assert _steps(client, r.info.run_id, "act/1/dead") == list(range(1, 13))


@pytest.mark.parametrize(
    ("cores", "n_workers", "writers", "expected"),
    [
        (2, 1, False, 2),
        (2, 2, False, 1),
        (2, 1, True, 1),  # the writer keeps the other core
        (2, 2, True, 1),
        (1, 1, True, 1),
        (4, 1, True, 3),
        (4, 2, True, 2),  # 1.5 a worker, rounded: a core of 4 is not worth half of each
        (8, 4, True, 2),
        (8, 3, False, 2),
    ],
)
def test_blas_threads_leave_a_core_to_the_trials_writers(
    monkeypatch, cores, n_workers, writers, expected
):
    import sweeps.optuna_search as O

    monkeypatch.setattr(O.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert O.blas_threads(n_workers, writers) == expected


def test_a_tracked_single_worker_trains_on_one_blas_thread_fewer(tmp_path, mlflow_store):
    """One worker on this machine's cores: its trials hand their MLflow writes to a writer
    process, which keeps a core; untracked, the trials use every core. Never more threads
    than BLAS had."""
    from threadpoolctl import threadpool_info

    import sweeps.optuna_search as O

    def blas() -> int:
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    before = blas()
    seen: dict[str, int] = {}
    real_work = S.Search.work

    def work(self, *a, **k):
        seen[str(self.tracking)] = blas()
        return real_work(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S.Search, "work", work)
        for tracked in ("true", "false"):
            args = tiny_args(
                str(tmp_path / f"{tracked}.log"), mlflow_store, rounds=[(1, "random")], epochs=1
            )
            assert main([*args, f"mlflow.enabled={tracked}"]) == 0
    assert seen == {
        "True": min(before, O.blas_threads(1, writers=True)),
        "False": min(before, O.blas_threads(1)),
    }
    assert blas() == before  # restored after the study
    with O._fewer_blas_threads(before + 1):  # asked for more than BLAS has: left alone
        assert blas() == before


def test_one_worker_starts_its_trials_writer_before_it_opens_the_parent_run(tmp_path, mlflow_store):
    """With one worker the launcher runs the trials; their writer process starts before the
    launcher opens the store and the parent run, so that its start (about 2.5 s, importing
    MLflow) overlaps that work rather than the first trials. The trials use that writer."""
    storage = str(tmp_path / "journal.log")
    events: list[str] = []
    sent: list[int] = []  # pid of the writer each request went to
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer, "WAIT_READY", True)
        real_init, real_call = StoreWriter.__init__, StoreWriter.call
        real_parent = S.Search.ensure_parent_run

        def init(self, *a, **k):
            events.append("writer")
            real_init(self, *a, **k)

        def parent(self):
            events.append("parent run")
            return real_parent(self)

        def call(self, *a, **k):
            sent.append(self.proc.pid)
            real_call(self, *a, **k)

        mp.setattr(StoreWriter, "__init__", init)
        mp.setattr(StoreWriter, "call", call)
        mp.setattr(S.Search, "ensure_parent_run", parent)
        assert main(tiny_args(storage, mlflow_store, study="early", rounds=[(2, "random")])) == 0
    assert events == ["writer", "parent run"]
    assert len(sent) == 14 and len(set(sent)) == 1  # 7 requests a trial, all to that writer
    trials = [
        r for r in mlflow_runs(mlflow_store, "early") if r.data.tags["sweeps.role"] == "trial"
    ]
    assert sorted(r.info.status for r in trials) == ["FINISHED", "FINISHED"]


def _prune_case_args(name: str, storage: str, store: dict[str, str], study: str) -> list[str]:
    """A study of 8 trials, 4 epochs, with the median pruner, where half the trials get an lr
    of 1e-9 (stuck at chance): those are pruned once a learning trial has completed."""
    _register(
        name,
        {
            "lr": S.ParamConf(key="optimizer.lr", choices=[0.5, 1e-9]),
            "wd": S.ParamConf(key="weight_decay.strength", low=1e-9, high=1e-8, log=True),
        },
        [(8, "random")],
        ["weight_decay=l2"],
    )
    args = tiny_args(storage, store, study=study, epochs=4)
    args = [a for a in args if not a.startswith(("search=", "search.rounds", "search.params"))]
    return [f"search={name}", *args, "pruner=median", "pruner.n_startup_trials=1"]


def test_pruning_prunes_trials_that_do_not_learn(tmp_path, mlflow_store):
    """Half the trials get an lr of 1e-9 (stuck at chance); the median pruner stops them
    after the first epoch once a learning trial has completed."""
    storage = str(tmp_path / "journal.log")
    assert main(_prune_case_args("prune_case", storage, mlflow_store, "prune")) == 0
    trials = check_invariants(storage, mlflow_store, "prune", [8])
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "nothing was pruned"
    assert all(t.params["lr"] == 1e-9 for t in pruned)
    assert all(len(t.intermediate_values) < 4 for t in pruned)
    assert all(t.user_attrs[S.OUTCOME] == "pruned" for t in pruned)
    runs = {
        r.data.tags["trial_number"]: r
        for r in mlflow_runs(mlflow_store, "prune")
        if "trial_number" in r.data.tags
    }
    for t in pruned:
        run = runs[str(t.number)]
        assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "PRUNED"
        assert (
            "sweeps.failure" not in run.data.tags
            and "pruned at epoch" in run.data.tags["sweeps.pruned"]
        )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the diverging trials
def test_failures_are_recorded_and_the_limit_stops_the_study(tmp_path, mlflow_store, capsys):
    storage = str(tmp_path / "journal.log")
    diverge = ["model.loss=mse", "search.params.lr.low=1e5", "search.params.lr.high=1e6"]
    args = [
        a
        for a in tiny_args(storage, mlflow_store, study="fail", rounds=[(5, "random")])
        if "lr.high" not in a
    ]
    assert main([*args, *diverge, "max_failures=2"]) == 1
    assert "2 trials failed since the study was last launched (max_failures=2)" in (
        capsys.readouterr().err
    )
    study = load_study(storage, "fail")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    for t in study.trials:
        assert t.user_attrs[S.OUTCOME] == "failed" and "diverged at epoch" in t.user_attrs[S.REASON]
    runs = mlflow_runs(mlflow_store, "fail")
    trial_runs = [r for r in runs if r.data.tags.get("sweeps.role") == "trial"]
    assert len(trial_runs) == 2
    assert all(
        r.info.status == "FAILED" and r.data.tags["trial_state"] == "FAIL" for r in trial_runs
    )
    assert all("diverged" in r.data.tags["sweeps.failure"] for r in trial_runs)
    parent = MlflowClient(mlflow_store["uri"]).get_run(study.user_attrs[S.PARENT_RUN])
    assert parent.info.status == "FAILED"
    # raising the limit resumes the study; a finished study is not stopped by the limit
    capsys.readouterr()
    assert main([*args, *diverge, "max_failures=null"]) == 1  # complete, but nothing succeeded
    assert S.tally(load_study(storage, "fail").trials).failed == 5
    assert main([*args, *diverge, "max_failures=2"]) == 1
    err = capsys.readouterr().err
    assert "no trial completed" in err and "max_failures" not in err


def test_a_rerun_after_the_failure_limit_counts_only_its_own_failures(
    tmp_path, mlflow_store, monkeypatch, capsys
):
    """The limit's message says to fix the cause and rerun the same command: that rerun
    must not stop at once on the failures of the launch before (a tracking server that was
    down, here every trial raising until it is fixed)."""
    storage = str(tmp_path / "journal.log")
    args = [
        *tiny_args(storage, mlflow_store, study="limit", rounds=[(6, "random")]),
        "max_failures=2",
    ]
    working = S.execute_overrides

    def broken(*a, **k):
        raise ConnectionError("the tracking server does not answer")

    monkeypatch.setattr(S, "execute_overrides", broken)
    assert main(args) == 1
    assert main(args) == 1  # still broken: two more failures, not none
    err = capsys.readouterr().err
    assert err.count("2 trials failed since the study was last launched (max_failures=2)") == 2
    assert S.tally(load_study(storage, "limit").trials).failed == 4
    monkeypatch.setattr(S, "execute_overrides", working)  # the cause is fixed
    assert main(args) == 0  # the two slots left of the round train
    outcomes = [S.outcome_of(t) for t in load_study(storage, "limit").trials]
    assert outcomes == ["failed"] * 4 + ["complete"] * 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the diverging trials
def test_a_failing_trial_does_not_stop_the_study(tmp_path, mlflow_store):
    storage = str(tmp_path / "journal.log")
    args = [
        a
        for a in tiny_args(storage, mlflow_store, study="mixed", rounds=[(6, "random")])
        if "lr.high" not in a
    ]
    mixed = [
        "model.loss=mse",
        "search.params.lr.low=1e-2",
        "search.params.lr.high=1e6",
        "max_failures=null",
    ]
    assert main([*args, *mixed, "sampler_seed=3"]) == 0
    trials = check_invariants(storage, mlflow_store, "mixed", [6])
    outcomes = [S.outcome_of(t) for t in trials]
    assert "failed" in outcomes and "complete" in outcomes, outcomes


def _store_down_at_the_end(monkeypatch) -> list[bool]:
    """``sweeps.resend`` finds the store down (as it would be, still, at a study's end after
    a longer outage) while the returned flag holds True."""
    from sweeps import resend

    down = [True]
    real = resend.resend

    def refused(folder, tracking_uri=None):
        if down[0]:
            raise StoreError("the MLflow tracking store at http://127.0.0.1:1 does not answer")
        return real(folder, tracking_uri)

    monkeypatch.setattr(resend, "resend", refused)
    return down


def test_an_inline_trial_whose_store_fails_at_its_end_is_complete_and_kept_for_resend(
    tmp_path, mlflow_store, monkeypatch, capsys
):
    """trial_writes=inline: the store fails the first trial's last send (its metrics). The
    trial trained: Optuna gets its value (COMPLETE), its records go to mlruns/unsent. The
    store is still down at the study's end: its run is ended KILLED saying where they are,
    and the end names the folder. The same command, run again once the store answers, sends
    them at its launch and the run is FINISHED. Before, the trial was FAILed and its run
    later said COMPLETE."""
    from mlflow.exceptions import MlflowException

    from sweeps import resend

    monkeypatch.chdir(tmp_path)
    storage = str(tmp_path / "journal.log")
    args = tiny_args(
        storage, mlflow_store, study="lost", rounds=[(3, "random")], extra=["trial_writes=inline"]
    )
    real = MlflowClient.log_batch
    failed: list[str] = []

    def log_batch(client, run_id, metrics=(), *a, **k):
        if metrics and not failed:  # the first trial's last send
            failed.append(run_id)
            raise MlflowException("API request to ... failed: Max retries exceeded")
        return real(client, run_id, metrics, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    down = _store_down_at_the_end(monkeypatch)
    assert main(args) == 0
    (run_id,) = failed
    trials = load_study(storage, "lost").trials
    assert [S.outcome_of(t) for t in trials] == ["complete"] * 3
    kept = Path(trials[0].user_attrs[S.UNSENT])
    root = (tmp_path / "mlruns" / "unsent").resolve()
    assert kept == root / run_id
    assert f"1 folder(s) in {root} hold MLflow records" in capsys.readouterr().out
    assert trials[0].user_attrs[S.RUN_ID] == run_id
    client = MlflowClient(mlflow_store["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"  # by the launcher, once its trials were done
    assert f"python -m sweeps.resend {kept}" in run.data.tags["sweeps.failure"]

    down[0] = False
    assert main(args) == 0  # the study is complete: its launch sends what was kept
    out = capsys.readouterr().out
    assert f"sent 1 folder(s) of MLflow records a store had refused ({root})" in out
    assert "hold MLflow records" not in out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "COMPLETE"
    assert "sweeps.failure" not in run.data.tags
    assert run.data.metrics["val/acc"] == trials[0].value
    assert resend.main([str(kept)]) == 2  # sent already: nothing twice


def test_a_tracking_store_down_at_the_studys_end_is_not_asked_again_until_the_rerun(
    tmp_path, mlflow_store, monkeypatch, capsys
):
    """The tracking store stops answering by the study's end (a tracking server that went
    down and stays down): the launcher asks it nothing more. Each call would wait through
    MLflow's retries: measured by hand, one reconcile call waited minutes. It says what
    it left undone (the runs' check, the retrain, the parent run's results) and exits 1.
    The same command run again once the store answers does all of it."""
    monkeypatch.chdir(tmp_path)
    storage = str(tmp_path / "journal.log")
    args = tiny_args(storage, mlflow_store, study="gone", rounds=[(2, "random")])
    args = [a for a in args if a != "evaluate_best=false"] + ["best_seeds=1"]
    down = [StoreError("the MLflow tracking store at http://127.0.0.1:1 does not answer")]
    monkeypatch.setattr(S.Search, "tracking_down", lambda self: down[0])
    asked: list[str] = []
    real_work = S.Search.work

    class Unanswered:  # what the launcher's client and any new one are, once the trials end
        def __getattr__(self, name):
            asked.append(name)
            raise ConnectionError("the store does not answer")

    def work(self, *a, **k):
        result = real_work(self, *a, **k)
        if down[0] is not None:
            monkeypatch.setattr(S.Search, "client", lambda self: Unanswered())
            monkeypatch.setattr(tracking, "get_client", lambda uri: Unanswered())
        return result

    monkeypatch.setattr(S.Search, "work", work)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "does not answer" in err and "the best configuration was not retrained" in err
    assert "Once the store answers, run the same command again" in err
    assert asked == []
    trials = load_study(storage, "gone").trials
    assert [S.outcome_of(t) for t in trials] == ["complete"] * 2
    parent_id = load_study(storage, "gone").user_attrs[S.PARENT_RUN]
    parent = MlflowClient(mlflow_store["uri"]).get_run(parent_id)
    assert parent.info.status == "RUNNING" and "best/val_acc" not in parent.data.metrics

    down[0] = None
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    runs = mlflow_runs(mlflow_store, "gone")
    parent = MlflowClient(mlflow_store["uri"]).get_run(parent_id)
    assert parent.info.status == "FINISHED" and "best/val_acc" in parent.data.metrics
    assert [r.data.tags.get("sweeps.role") for r in runs].count("best-test") == 1
    trial_runs = [r for r in runs if r.data.tags.get("sweeps.role") == "trial"]
    assert len(trial_runs) == 2
    assert all(r.info.status == "FINISHED" for r in trial_runs)


def _writes_in_this_process(monkeypatch, apply) -> None:
    """trial_writes=process with the writer's requests made in this process (its helper
    stopped at once, as if it had died), through ``apply`` (``Applier._apply``'s stand-in:
    it can fail some)."""
    real_init = StoreWriter.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.proc.kill()
        self.proc.wait()
        self._gone = True

    monkeypatch.setattr(StoreWriter, "__init__", init)
    monkeypatch.setattr(writer.Applier, "_apply", apply)


def test_a_trial_whose_writer_could_not_create_its_run_is_complete_and_kept_for_resend(
    tmp_path, mlflow_store, monkeypatch
):
    """trial_writes=process: the store refuses to create the first trial's run (a tracking
    server down longer than MLflow's retries), which its worker learns once the trial has
    trained. Optuna gets the trial's value (COMPLETE); everything handed over for the run
    (its tags, params, dataset inputs, metrics) and the trial's history, config and weights
    go to mlruns/unsent. The store answers again by the study's end, which sends them
    (``sweeps.resend``): the run is created under the study's parent run and ended FINISHED.
    Before, the trained trial was counted as failed and the run never existed (seen by hand:
    4 of 40 trials in a 47 s outage)."""
    from mlflow.exceptions import MlflowException

    from sweeps import resend

    monkeypatch.chdir(tmp_path)
    storage = str(tmp_path / "journal.log")
    args = tiny_args(storage, mlflow_store, study="uncreated", rounds=[(3, "random")])
    real_apply = writer.Applier._apply
    refused: list[str] = []

    def apply(self, op, args, kwargs):
        if op == "create_run" and not refused:
            refused.append(args[0])
            raise MlflowException("API request to .../runs/create failed: Max retries exceeded")
        return real_apply(self, op, args, kwargs)

    _writes_in_this_process(monkeypatch, apply)
    assert main(args) == 0
    assert len(refused) == 1
    trials = load_study(storage, "uncreated").trials
    assert [S.outcome_of(t) for t in trials] == ["complete"] * 3
    assert S.RUN_ID not in trials[0].user_attrs
    kept = Path(trials[0].user_attrs[S.UNSENT])
    assert kept.parent == (tmp_path / "mlruns" / "unsent").resolve()
    client = MlflowClient(mlflow_store["uri"])

    def trial_runs() -> dict[str, Any]:
        return {
            r.data.tags["trial_number"]: r
            for r in mlflow_runs(mlflow_store, "uncreated")
            if r.data.tags.get("sweeps.role") == "trial"
        }

    assert not (kept / "unsent.json").exists()  # sent by the study's end: the store answers
    runs = trial_runs()
    run = client.get_run(runs["0"].info.run_id)
    other = client.get_run(runs["1"].info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "COMPLETE"
    assert run.data.tags["mlflow.parentRunId"] == other.data.tags["mlflow.parentRunId"]
    assert run.data.tags["data_digest"] == other.data.tags["data_digest"]
    assert run.data.params.keys() == other.data.params.keys()  # every one of them
    assert run.data.metrics["val/acc"] == trials[0].value
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in history] == list(range(1, 4))  # every epoch, once
    assert len(run.inputs.dataset_inputs) == len(other.inputs.dataset_inputs) > 0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "history.csv", "model"} <= names
    assert resend.main([str(kept)]) == 2  # sent already: nothing twice


def test_writes_the_store_refused_for_a_created_run_are_kept_for_resend(
    tmp_path, mlflow_store, monkeypatch, capsys
):
    """trial_writes=process: the store created the first trial's run, then refused its
    metrics and its end (an outage that began mid-trial), and is still down at the study's
    end. The trial is COMPLETE; its writer keeps what was refused in mlruns/unsent/<run id>;
    the launcher's reconcile ends the run KILLED naming that folder, and the study's end
    names the folder of them; resend of that folder, once the store answers, sends the
    metrics and ends the run as its worker meant to (FINISHED)."""
    from mlflow.exceptions import MlflowException

    from sweeps import resend

    monkeypatch.chdir(tmp_path)
    storage = str(tmp_path / "journal.log")
    args = tiny_args(storage, mlflow_store, study="partial", rounds=[(3, "random")])
    real_apply = writer.Applier._apply
    first: list[str] = []
    refused: list[str] = []

    def apply(self, op, args, kwargs):
        if op == "create_run" and not first:
            first.append(args[0])
        failing = (op == "log_batch" and args[1]) or op == "set_terminated"
        if first and args[0] == first[0] and failing:
            refused.append(op)
            raise MlflowException("API request to ... failed: Max retries exceeded")
        return real_apply(self, op, args, kwargs)

    _writes_in_this_process(monkeypatch, apply)
    down = _store_down_at_the_end(monkeypatch)
    assert main(args) == 0
    assert refused[-1] == "set_terminated" and "log_batch" in refused
    trials = load_study(storage, "partial").trials
    assert [S.outcome_of(t) for t in trials] == ["complete"] * 3
    run_id = trials[0].user_attrs[S.RUN_ID]
    root = (tmp_path / "mlruns" / "unsent").resolve()
    kept = root / run_id
    assert (kept / "unsent.json").is_file()
    out = capsys.readouterr().out
    assert f"1 folder(s) in {root} hold MLflow records" in out
    assert f"python -m sweeps.resend {root} sends them" in out
    client = MlflowClient(mlflow_store["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"  # by the launcher's reconcile, at once
    assert f"python -m sweeps.resend {kept}" in run.data.tags["sweeps.failure"]
    assert "val/acc" not in run.data.metrics  # the refused batch

    down[0] = False
    assert resend.main([str(root)]) == 0  # every folder in it
    assert f"sent {kept} to run {run_id}, now FINISHED" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "sweeps.failure" not in run.data.tags
    assert run.data.tags["trial_state"] == "COMPLETE"
    assert run.data.metrics["val/acc"] == trials[0].value
    history = client.get_metric_history(run_id, "val/acc")
    assert [m.step for m in history] == list(range(1, 4))


def test_a_pruned_trials_refused_writes_are_sent_at_the_studys_end_with_its_state(
    tmp_path, mlflow_store, monkeypatch
):
    """trial_writes=process: a pruned trial's run ends KILLED with ``trial_state=PRUNED``
    and its reason in ``sweeps.pruned``, in the requests that end it (``trial_run_end``):
    its worker never reads the store back to settle it. The store refuses those requests
    for the first pruned trial (an outage); it answers by the study's end, which sends the
    kept writes: the run ends as its worker meant. Before, the worker waited for its writer
    and read every pruned trial's run back, and the tags of a refused one were missing."""
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    storage = str(tmp_path / "journal.log")
    args = _prune_case_args("prune_kept", storage, mlflow_store, "prunekept")
    real_apply = writer.Applier._apply
    numbers: dict[str, int] = {}  # token -> trial number
    refused: list[str] = []  # the token of the run whose end the store refused

    def apply(self, op, args, kwargs):
        if op == "create_run":
            numbers[args[0]] = int(args[3]["trial_number"])
        elif op == "log_batch" and ("trial_state", "PRUNED") in args[3] and not refused:
            refused.append(args[0])
        if refused and args[0] == refused[0] and op in ("log_batch", "set_terminated"):
            raise MlflowException("API request to ... failed: Max retries exceeded")
        return real_apply(self, op, args, kwargs)

    read_back: list[int] = []

    def runs_of(self, number):
        read_back.append(number)
        raise AssertionError("a pruned trial's run was read back")

    _writes_in_this_process(monkeypatch, apply)
    monkeypatch.setattr(S.Search, "_runs_of", runs_of)
    assert main(args) == 0
    assert refused, "no pruned trial"
    assert read_back == []
    number = numbers[refused[0]]
    trials = load_study(storage, "prunekept").trials
    assert trials[number].state == TrialState.PRUNED
    runs = {
        r.data.tags["trial_number"]: r
        for r in mlflow_runs(mlflow_store, "prunekept")
        if "trial_number" in r.data.tags
    }
    for t in trials:
        if t.state != TrialState.PRUNED:
            continue
        run = runs[str(t.number)]
        assert run.info.run_id == t.user_attrs[S.RUN_ID]
        assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "PRUNED"
        assert "sweeps.failure" not in run.data.tags
        assert run.data.tags["sweeps.pruned"] == t.user_attrs[S.REASON]
        assert "pruned at epoch" in run.data.tags["sweeps.pruned"]
    kept = tmp_path / "mlruns" / "unsent" / runs[str(number)].info.run_id
    assert (kept / "sent.json").is_file()


def test_runs_the_store_never_created_are_kept_for_every_trial_state_and_sent_at_the_end(
    tmp_path, mlflow_store, monkeypatch
):
    """trial_writes=process: the store refuses to create every trial's run after the first
    (a tracking server down), in a study with pruning: complete trials keep their records
    as before, and pruned ones now too (before, a pruned trial whose run was never created
    left nothing in MLflow). The store answers by the study's end, which sends them all:
    every trial has its run, a pruned one KILLED with ``trial_state=PRUNED``, its reason in
    ``sweeps.pruned`` and its curves up to the epoch it was pruned at."""
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    storage = str(tmp_path / "journal.log")
    args = _prune_case_args("prune_uncreated", storage, mlflow_store, "uncreated2")
    real_apply = writer.Applier._apply
    created: list[str] = []

    def apply(self, op, args, kwargs):
        if op == "create_run":
            if created:
                raise MlflowException("API request to .../runs/create failed: Max retries")
            created.append(args[0])
        return real_apply(self, op, args, kwargs)

    _writes_in_this_process(monkeypatch, apply)
    assert main(args) == 0
    trials = check_invariants(storage, mlflow_store, "uncreated2", [8])
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and any(t.state == TrialState.COMPLETE for t in trials[1:])
    runs = {
        int(r.data.tags["trial_number"]): r
        for r in mlflow_runs(mlflow_store, "uncreated2")
        if r.data.tags.get("sweeps.role") == "trial"
    }
    assert sorted(runs) == list(range(8))  # one run per trial, created or sent
    client = MlflowClient(mlflow_store["uri"])
    for t in trials:
        run = client.get_run(runs[t.number].info.run_id)
        assert run.data.tags["trial_state"] == t.state.name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
        assert steps == sorted(t.intermediate_values) or steps == [1, 2, 3, 4]
        if t.state == TrialState.PRUNED:
            assert run.info.status == "KILLED" and "sweeps.failure" not in run.data.tags
            assert run.data.tags["sweeps.pruned"] == t.user_attrs[S.REASON]
            assert steps == sorted(t.intermediate_values)  # up to its pruning
        else:
            assert run.info.status == "FINISHED"
            assert run.data.metrics["val/acc"] == t.value
    kept = list((tmp_path / "mlruns" / "unsent").glob("*/unsent.json"))
    assert kept == []  # every folder sent


def test_duplicates_are_never_trained_and_an_exhausted_space_ends_the_round(tmp_path, mlflow_store):
    _register(
        "grid_case",
        {
            "init": S.ParamConf(choices=["he", "xavier"]),
            "batchnorm": S.ParamConf(choices=["off", "on"]),
        },
        [(6, "random")],
        [],
    )
    storage = str(tmp_path / "journal.log")
    args = tiny_args(storage, mlflow_store, study="dedup")
    args = [a for a in args if not a.startswith(("search=", "search.rounds", "search.params"))]
    assert main(["search=grid_case", *args, "dedup_attempts=15"]) == 0
    study = load_study(storage, "dedup")
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if S.outcome_of(t) in S.COUNTED]
    assert len(counted) == 4  # only 4 distinct parameter sets exist
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 4
    dups = [t for t in trials if S.outcome_of(t) == "duplicate"]
    assert dups and all(t.user_attrs[S.DUPLICATE_OF] in {c.number for c in counted} for t in dups)
    assert "exhausted" in study.user_attrs[S.exhausted_attr(1)]
    trial_runs = [
        r for r in mlflow_runs(mlflow_store, "dedup") if r.data.tags.get("sweeps.role") == "trial"
    ]
    assert len(trial_runs) == 4  # duplicates never reach training


def test_an_interrupted_untracked_search_claims_no_runs(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(S.Search, "work", interrupted)
    store = {"uri": f"sqlite:///{tmp_path / 'unused.db'}", "artifacts": str(tmp_path / "art")}
    args = tiny_args(str(tmp_path / "j.log"), store, study="i")
    assert main([*args, "mlflow.enabled=false"]) == 130
    assert capsys.readouterr().err.endswith(
        "interrupted (Ctrl-C); running trials are marked FAIL; rerun the same command to resume\n"
    )


def test_a_fresh_study_is_reproducible_and_runs_without_mlflow(tmp_path):
    """Seeded samplers (Optuna 5's TPE defaults made explicit): the same command on a fresh
    storage proposes the same trials, round 2's TPE included."""
    proposals = []
    for name in ("a", "b"):
        storage = str(tmp_path / f"{name}.log")
        store = {"uri": f"sqlite:///{tmp_path / 'unused.db'}", "artifacts": str(tmp_path / "art")}
        args = tiny_args(storage, store, study="r", rounds=[(3, "random"), (2, "tpe")])
        assert main([*args, "mlflow.enabled=false", "sampler_seed=7"]) == 0
        proposals.append([t.params for t in load_study(storage, "r").trials])
    assert len(proposals[0]) == 5 and proposals[0] == proposals[1]
    assert not (tmp_path / "unused.db").exists()


def test_pruners_are_built_from_the_config():
    assert isinstance(S.make_pruner(S.PrunerConf(name="none")), optuna.pruners.NopPruner)
    median = S.make_pruner(S.PrunerConf(name="median", n_startup_trials=2, n_warmup_steps=3))
    assert isinstance(median, optuna.pruners.MedianPruner)
    hyperband = S.make_pruner(S.PrunerConf(name="hyperband", min_resource=2, reduction_factor=2))
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    cfg = load_config(["pruner=hyperband", "pruner.max_resource=50"])
    assert (cfg.pruner.name, cfg.pruner.max_resource) == ("hyperband", 50)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_trials_of_dead_workers_are_failed_and_their_runs_killed(tmp_path, mlflow_store):
    storage = str(tmp_path / "journal.log")
    cfg = load_config(tiny_args(storage, mlflow_store, study="stale"))
    search = S.Search(cfg)
    search.check_spec()
    parent = search.ensure_parent_run()
    dead = search.study.ask()
    for key, value in (
        (S.ROUND, 1),
        (S.HOST, S.hostname()),
        (S.PID, _dead_pid()),
        (S.PID_START, "1"),
    ):
        dead.set_user_attr(key, value)
    orphan = search.study.ask()  # its worker died inside the lock, before recording itself
    orphan.set_user_attr(S.ROUND, 1)
    alive = search.study.ask()
    for key, value in (
        (S.ROUND, 1),
        (S.HOST, S.hostname()),
        (S.PID, os.getpid()),
        (S.PID_START, S.process_start(os.getpid())),
    ):
        alive.set_user_attr(key, value)
    client = search.client()
    run = client.create_run(
        search._experiment_id,
        tags={
            "study": "stale",
            "trial_number": str(dead.number),
            "sweeps.role": "trial",
            "mlflow.parentRunId": parent,
        },
    )
    # Workers recorded with their process ids: this container before a restart (another pid
    # namespace, this host name, its pid free here), an earlier boot of this machine, a
    # machine that shares this host name, and a process with this process's pid and start
    # in another pid namespace.
    boot, ns, _, _ = S.process_id().split("/")
    gone_pid, me = _dead_pid(), os.getpid()
    workers = {
        "restarted": (f"{boot}/{int(ns) + 1}/{gone_pid}/1", gone_pid, S.machine_id()),
        "rebooted": (f"earlier-boot/{ns}/{me}/1", me, S.machine_id()),
        "namesake": (f"its-boot/{ns}/{gone_pid}/1", gone_pid, "another-machine"),
        "same pid": (f"{boot}/{int(ns) + 1}/{me}/1", me, S.machine_id()),
    }
    numbers = {}
    for name, (process, pid, machine) in workers.items():
        trial = search.study.ask()
        for key, value in (
            (S.ROUND, 1),
            (S.HOST, S.hostname()),
            (S.PID, pid),
            (S.PID_START, S.process_start(me) if name == "same pid" else "1"),
            (S.PROCESS, process),
            (S.MACHINE, machine),
        ):
            trial.set_user_attr(key, value)
        numbers[name] = trial.number
    with search.lock():
        failed = search.fail_stale()
    gone = [numbers["restarted"]] + ([numbers["rebooted"]] if S.machine_id() else [])
    assert sorted(failed) == [dead.number, orphan.number, *gone]
    trials = search.study.get_trials(deepcopy=False)
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    assert trials[0].user_attrs[S.OUTCOME] == "stale" and "died" in trials[0].user_attrs[S.REASON]
    assert S.tally(trials[:2]).counted == 0  # their slots run again
    got = client.get_run(run.info.run_id)
    assert got.info.status == "KILLED" and got.data.tags["trial_state"] == "FAIL"
    with search.lock():  # as this process ends: its own trials, not the same pid's elsewhere
        assert search.fail_stale(include_own=True) == [alive.number]
    for name in ("namesake", "same pid"):
        assert search.study.trials[numbers[name]].state == TrialState.RUNNING, name


def test_a_dead_launchers_study_is_ended_by_the_next_launcher(tmp_path, mlflow_store):
    """A study whose launcher was SIGKILLed and is never rerun: the next launcher on this
    host, of any study in the storage, FAILs its dead workers' trials, ends their runs and
    ends its parent run KILLED. A study still training (a live worker), a live launcher's
    study and a study tracked in another store keep their parent runs."""
    storage = str(tmp_path / "journal.log")

    def study(name: str, launcher_pid: int, worker_pid: int | None) -> tuple[S.Search, str, int]:
        # "gone" records its runs in an experiment of its own, the others in the default one
        extra = ["mlflow.experiment_name=gone-runs"] if name == "gone" else []
        s = S.Search(load_config(tiny_args(storage, mlflow_store, study=name, extra=extra)))
        s.check_spec()
        parent = s.ensure_parent_run()
        start = S.process_start(launcher_pid) if launcher_pid == os.getpid() else "1"
        s.study.set_user_attr(
            S.LAUNCHER, {"host": S.hostname(), "pid": launcher_pid, "pid_start": start}
        )
        number = -1
        if worker_pid is not None:
            trial = s.study.ask()
            for key, value in (
                (S.ROUND, 1),
                (S.HOST, S.hostname()),
                (S.PID, worker_pid),
                (S.PID_START, S.process_start(worker_pid) if worker_pid == os.getpid() else "1"),
            ):
                trial.set_user_attr(key, value)
            number = trial.number
            s.client().create_run(
                s._experiment_id,
                tags={
                    "study": name,
                    "trial_number": str(number),
                    "sweeps.role": "trial",
                    "mlflow.parentRunId": parent,
                },
            )
        return s, parent, number

    dead = _dead_pid()
    gone, gone_parent, gone_trial = study("gone", dead, dead)
    busy, busy_parent, _ = study("busy", dead, os.getpid())
    live, live_parent, _ = study("live", os.getpid(), None)
    elsewhere, _, elsewhere_trial = study("elsewhere", dead, dead)
    elsewhere.study.set_user_attr(S.PARENT_URI, "sqlite:///" + str(tmp_path / "other.db"))
    elsewhere.study.set_user_attr(S.PARENT_RUN, "0" * 32)  # not in this store

    # launched on another machine that shares this host name: not known dead here
    namesake, namesake_parent, _ = study("namesake", dead, None)
    _, ns, _, _ = S.process_id().split("/")
    namesake.study.set_user_attr(
        S.LAUNCHER,
        {
            "host": S.hostname(),
            "pid": dead,
            "pid_start": "1",
            "process": f"its-boot/{ns}/{dead}/1",
            "machine": "another-machine",
        },
    )

    me = S.Search(load_config(tiny_args(storage, mlflow_store, study="me")))
    assert sorted(me.end_dead_studies()) == ["elsewhere", "gone"]
    if S.machine_id():  # without one, a boot of another machine is judged by host name
        assert me.client().get_run(namesake_parent).info.status == "RUNNING"

    client = me.client()
    got = client.get_run(gone_parent)
    assert got.info.status == "KILLED"
    assert got.data.tags["sweeps.failure"] == f"its launcher (pid {dead}) died without ending it"
    [trial_run] = client.search_runs(
        [gone._experiment_id], "tags.study = 'gone' and tags.`sweeps.role` = 'trial'"
    )
    assert trial_run.info.status == "KILLED" and trial_run.data.tags["trial_state"] == "FAIL"
    t = load_study(storage, "gone").trials[gone_trial]
    assert t.state == TrialState.FAIL and t.user_attrs[S.OUTCOME] == "stale"
    assert load_study(storage, "elsewhere").trials[elsewhere_trial].state == TrialState.FAIL
    assert client.get_run(busy_parent).info.status == "RUNNING"
    assert [t.state for t in load_study(storage, "busy").trials] == [TrialState.RUNNING]
    assert client.get_run(live_parent).info.status == "RUNNING"
    checked: list[str] = []
    full_check = me._other_study
    me._other_study = lambda name: checked.append(name) or full_check(name)  # type: ignore[method-assign]
    assert me.end_dead_studies() == []  # nothing left to end
    # "gone", ended, with nothing RUNNING in either store, is not even opened ("elsewhere"
    # is: the run this test made for it before moving its parent elsewhere is RUNNING here)
    assert sorted(checked) == ["busy", "elsewhere", "live", "namesake"]

    # A rerun of the study reopens its run, without the reason it had been ended.
    again = S.Search(
        load_config(
            tiny_args(
                storage, mlflow_store, study="gone", extra=["mlflow.experiment_name=gone-runs"]
            )
        )
    )
    assert again.ensure_parent_run() == gone_parent
    got = client.get_run(gone_parent)
    assert got.info.status == "RUNNING" and "sweeps.failure" not in got.data.tags


def test_reconcile_leaves_a_just_finished_trials_run_to_its_writer(
    tmp_path, mlflow_store, monkeypatch
):
    """trial_writes=process: a worker tells Optuna its trial's outcome once it has handed
    the run's end to its writer process, which may make it a moment later. A launcher
    reconciling meanwhile leaves that run alone; once RUN_END_GRACE has passed (the writer
    died too), it ends it KILLED. A stale trial's run is ended at once."""
    storage = str(tmp_path / "journal.log")
    cfg = load_config(tiny_args(storage, mlflow_store, study="grace"))
    search = S.Search(cfg)
    search.check_spec()
    parent = search.ensure_parent_run()
    client = search.client()
    runs = {}
    for outcome in ("complete", "stale"):
        trial = search.study.ask()
        trial.set_user_attr(S.OUTCOME, outcome)
        search.study.tell(
            trial,
            0.5 if outcome == "complete" else None,
            state=TrialState.COMPLETE if outcome == "complete" else TrialState.FAIL,
        )
        runs[outcome] = client.create_run(
            search._experiment_id,
            tags={
                "study": "grace",
                "trial_number": str(trial.number),
                "sweeps.role": "trial",
                "mlflow.parentRunId": parent,
            },
        ).info.run_id
    assert search.reconcile_runs() == 1
    stale = client.get_run(runs["stale"])
    assert stale.info.status == "KILLED"
    assert stale.data.tags["sweeps.failure"] == "its worker stopped without ending it"
    assert client.get_run(runs["complete"]).info.status == "RUNNING"
    monkeypatch.setattr(S, "RUN_END_GRACE", 0.0)
    assert search.reconcile_runs() == 1
    got = client.get_run(runs["complete"])
    assert got.info.status == "KILLED" and got.data.tags["trial_state"] == "COMPLETE"
    # its worker did end the trial: the store (or the writer) failed the run's end
    assert got.data.tags["sweeps.failure"].startswith("its trial ended (COMPLETE, in the Optuna")
    assert (
        "the store refused its last writes, or its writer process died"
        in (got.data.tags["sweeps.failure"])
    )


# -- processes ---------------------------------------------------------------------------------


#: Trials long enough for a signal to land in one (about 1.1 s here), with few metric rows
#: (the writer process, behind by a trial's writes, creates the next trial's run only after
#: them). The tiny net needed 600 epochs for that: 2,400 rows a trial kept the writer 0.3-0.4
#: s behind, and the poll below missed every trial in a CI run (and with 8 or 60 epochs,
#: 0.2 s a trial, in 4 of 14 runs).
SLOW_TRIAL: dict = {"epochs": 60, "extra": ["model.hidden_sizes=[512,512]"]}


@pytest.mark.slow
def test_sigkill_mid_study_then_rerun_finishes_the_exact_budget(tmp_path, mlflow_store):
    storage = str(tmp_path / "journal.log")
    # SLOW_TRIAL: about 1.1 s a trial, long enough for the poll below to see one with its
    # run created (by the worker's writer process) and time left
    args = tiny_args(
        storage, mlflow_store, study="kill", rounds=[(4, "random"), (3, "tpe")], **SLOW_TRIAL
    )
    proc = spawn(args, tmp_path, tmp_path / "first.log")
    try:
        wait_for(
            lambda: running_trial_with_run(storage, mlflow_store, "kill", min_counted=2),
            timeout=240,
            what="a trial training after two counted ones",
            proc=proc,
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = load_study(storage, "kill").get_trials(deepcopy=False)
    killed = [t.number for t in before if t.state == TrialState.RUNNING]
    assert killed, "the kill did not catch a running trial"
    assert [r for r in mlflow_runs(mlflow_store, "kill") if r.info.status == "RUNNING"]
    assert load_study(storage, "kill").user_attrs[S.LAUNCHER]["pid"] == proc.pid

    # Another study's launcher ends what the dead one left RUNNING (as if "kill" were never
    # rerun): its trials FAIL, their runs and its parent run KILLED.
    assert main(tiny_args(storage, mlflow_store, study="next", rounds=[(1, "random")])) == 0
    assert not [
        t
        for t in load_study(storage, "kill").get_trials(deepcopy=False)
        if t.state == TrialState.RUNNING
    ]
    assert not [r for r in mlflow_runs(mlflow_store, "kill") if r.info.status == "RUNNING"]
    [parent] = [
        r for r in mlflow_runs(mlflow_store, "kill") if r.data.tags.get("sweeps.role") == "study"
    ]
    assert parent.info.status == "KILLED" and "launcher" in parent.data.tags["sweeps.failure"]

    assert main(args) == 0
    trials = check_invariants(storage, mlflow_store, "kill", [4, 3])
    for number in killed:
        assert (
            trials[number].state == TrialState.FAIL
            and trials[number].user_attrs[S.OUTCOME] == "stale"
        )
    killed_runs = [
        r
        for r in mlflow_runs(mlflow_store, "kill")
        if r.data.tags.get("trial_number") in map(str, killed)
    ]
    # Its run ends KILLED; or FINISHED when the kill came after its training had ended but
    # before the worker could record the trial (the launcher died holding the journal lock).
    # Either way the run is closed and says its trial failed, and the slot ran again. The
    # kill can also land after the next trial started in Optuna but before its run was
    # created (seen once): that trial then has no run at all.
    if not killed_runs:
        assert not [n for n in killed if S.RUN_ID in trials[n].user_attrs]
    for r in killed_runs:
        assert r.info.status in ("KILLED", "FINISHED"), r.info.status
        assert r.data.tags.get("trial_state") == "FAIL", r.data.tags


@pytest.mark.slow
def test_two_workers_share_the_exact_budget_without_duplicates(tmp_path, mlflow_store):
    storage = str(tmp_path / "journal.log")
    args = tiny_args(
        storage,
        mlflow_store,
        study="two",
        rounds=[(5, "random"), (4, "tpe")],
        extra=["n_workers=2"],
    )
    assert main(args) == 0
    trials = check_invariants(storage, mlflow_store, "two", [5, 4])
    assert S.tally(trials).failed == 0  # no 'database is locked' or other tracking failure
    assert {t.user_attrs[S.WORKER] for t in trials} <= {0, 1}
    assert all(t.user_attrs[S.PID] != os.getpid() for t in trials)  # trained in the workers


@pytest.mark.slow
def test_sigterm_stops_workers_cleanly_and_a_rerun_resumes(tmp_path, mlflow_store):
    storage = str(tmp_path / "journal.log")
    # SLOW_TRIAL, as in the SIGKILL test: the signal has to land in a trial. With 8 epochs
    # of the tiny net it once landed between trials (full suite, loaded machine), and
    # nothing was interrupted: the poll had seen a run still RUNNING whose trial had just
    # ended (its writer process makes the run's end a moment after the trial is told).
    args = tiny_args(
        storage,
        mlflow_store,
        study="term",
        rounds=[(6, "random")],
        epochs=SLOW_TRIAL["epochs"],
        extra=["n_workers=2", *SLOW_TRIAL["extra"]],
    )
    proc = spawn(args, tmp_path, tmp_path / "first.log")
    try:
        wait_for(
            lambda: running_trial_with_run(storage, mlflow_store, "term", min_counted=1),
            timeout=240,
            what="a trial training",
            proc=proc,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    assert (
        "interrupted (received signal 15); running trials are marked FAIL and their runs KILLED;"
        in (tmp_path / "first.log").read_text()
    )
    trials = load_study(storage, "term").get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if S.outcome_of(t) in ("interrupted", "stale")]
    assert stopped and all(t.user_attrs[S.REASON] for t in stopped)
    assert not [r for r in mlflow_runs(mlflow_store, "term") if r.info.status == "RUNNING"]

    assert main([a for a in args if a != "n_workers=2"]) == 0
    check_invariants(storage, mlflow_store, "term", [6])
