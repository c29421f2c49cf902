"""``python -m sweeps.run [overrides]``: compose the config, train, record the run in MLflow.

    python -m sweeps.run optimizer=adam init=he
    python -m sweeps.run -m optimizer=sgd,momentum,adagrad,adam seed=0,1,2

Hydra stops here: ``execute`` takes the validated dataclasses and is what the search calls
for each trial, so a trial is exactly what this command runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sweeps import stores, tracking, writer
from sweeps.config import (
    GROUPS,
    RunConfig,
    choices_from_config,
    conf_dir,
    interrupts_unwrapped,
    register_schemas,
    validate,
)
from sweeps.experiment import train
from sweeps.train import Callback, DivergedError, History

log = logging.getLogger("sweeps.run")


@dataclass
class Outcome:
    run_id: str | None
    history: History
    val_acc: float | None
    test: dict[str, float] = field(default_factory=dict)
    ui: str = ""


class Progress(Callback):
    """A tqdm bar over iterations on a terminal, and one log line per epoch everywhere."""

    def __init__(self, total: int | None, every: int = 20, enabled: bool = True) -> None:
        self.every = every
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="it", dynamic_ncols=True, leave=False)
        self.start = time.perf_counter()
        self._last = 0

    def on_batch_end(self, iteration, loss):
        if self.bar is not None and iteration % self.every == 0:
            self.bar.update(iteration - self._last)
            self._last = iteration
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def on_epoch_end(self, epoch, metrics, model):
        parts = [f"epoch {epoch:3d}"]
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4f}")
        parts.append(f"{metrics['time/epoch']:.2f}s")
        line = " | ".join(parts)
        if self.bar is not None:
            self.bar.write(line)
        else:
            log.info(line)

    def on_train_end(self, history, model):
        if self.bar is not None:
            self.bar.close()


def _total_iterations(cfg: RunConfig, n_train: int) -> int:
    t = cfg.trainer
    if t.iterations is not None:
        return t.iterations
    per_epoch = (
        max(n_train // t.batch_size, 1)
        if t.sampling == "replacement"
        else -(-n_train // t.batch_size)
    )
    return per_epoch * t.epochs


def execute(
    cfg: RunConfig,
    resolved: Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    choices: Mapping[str, str | None] | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    callbacks: Sequence[Callback] = (),
    evaluate_test: bool = True,
    progress: bool = True,
    end_tags: Mapping[str, Any] | None = None,
    run_ends: Callable[[BaseException], tracking.RunEnd | None] | None = None,
) -> Outcome:
    """Train one configuration and record it. ``resolved`` is the resolved config as plain
    containers (for params and config.yaml). ``end_tags`` are set with the last metrics when
    training and evaluation succeed (a search trial's ``trial_state``). Exceptions propagate
    after the run is marked FAILED or KILLED, or as ``run_ends`` says (``tracking.open_run``'s
    ``ends``: a search trial's pruning or failure)."""
    from sweeps.experiment import load_splits

    m = cfg.mlflow
    choices = dict(choices or choices_from_config(cfg))
    tags: dict[str, Any] = {**choices, "seed": cfg.seed, "overrides": " ".join(overrides)}
    if cfg.sweep_id:
        tags["sweep_id"] = cfg.sweep_id
    if cfg.experiment:
        tags["experiment"] = cfg.experiment
    tags.update(tracking.environment_tags())
    tags.update(extra_tags or {})

    ctx: contextlib.AbstractContextManager[tracking.Run | tracking.NullRun]
    if m.enabled:
        ctx = tracking.open_run(
            m.tracking_uri,
            m.experiment_name,
            m.artifact_root,
            run_name=m.run_name,
            tags=tags,
            parent_run_id=parent_run_id,
            ends=run_ends,
        )
    else:
        ctx = _null_context()
    # A Ctrl-C or SIGTERM that lands inside library code (OmegaConf, YAML) can come out
    # wrapped in its error: unwrapped inside the run, so it ends KILLED, not FAILED.
    with ctx as run, interrupts_unwrapped():
        if m.enabled:  # a NullRun drops them: not even built (12 ms a search trial)
            # at once, not with the first metrics: a run killed before those keeps its params
            # (sending them with the last request measured about 1% of a search trial)
            run.log_params(tracking.flatten(resolved))
            run.log_texts(
                {
                    "config.yaml": tracking.config_yaml(resolved),
                    "overrides.yaml": overrides_yaml(overrides),
                }
            )
        rng = np.random.default_rng(cfg.seed)
        splits = load_splits(cfg, rng)
        run.queue_tags({"data_digest": splits.digest})  # sent with the metrics: one request less
        name, digest = cfg.data.name, splits.digest
        inputs = [(splits.train.x, splits.train.t, f"{name}-train", digest, "training")]
        if splits.val is not None:
            inputs.append((splits.val.x, splits.val.t, f"{name}-val", digest, "validation"))
        run.log_datasets(inputs)
        probe = (splits.val if splits.val is not None else splits.train).x[: cfg.trainer.probe_size]
        title = " ".join(
            f"{k}={v}" for k, v in choices.items() if k in ("optimizer", "init", "activation")
        )
        # Tracking off: nothing would keep the figures or the weights, so don't draw them.
        figures, weights = m.log_figures and m.enabled, m.log_model and m.enabled
        cbs: list[Callback] = [
            tracking.MlflowCallback(
                run, probe, m.batch_loss_every, figures, weights, title, m.detail_metrics_every
            )
        ]
        cbs.append(Progress(_total_iterations(cfg, len(splits.train)), enabled=progress))
        cbs.append(tracking.InterruptCheck())  # a Ctrl-C swallowed on its way out stops it too
        cbs.extend(callbacks)
        trained = train(cfg, cbs, splits=splits, rng=rng)
        history = trained.history
        test: dict[str, float] = {}
        if evaluate_test:
            loss, acc = trained.model.evaluate(
                splits.test.x, splits.test.t, cfg.trainer.eval_batch_size
            )
            test = {"test/loss": loss, "test/acc": acc}
            step = int(history.last("epoch"))
            run.queue_metrics([(k, v, step) for k, v in test.items()])  # sent as the run ends
        val_acc = history.last("val/acc") if splits.val is not None else None
        run.queue_tags(end_tags or {})
        # The store went away during training and is still gone, or fails now: what it did
        # not take is kept on disk, with the trained weights.
        if not (run.online() and run.send_last()):
            assert isinstance(run, tracking.Run) and run.lost is not None
            kept = keep_unsent(run, resolved, overrides, history, trained.model)
            results = ", ".join(
                f"{k} {v:.4f}" for k, v in (("val/acc", val_acc), *test.items()) if v is not None
            )
            store = f"the MLflow tracking store at {stores.redact(m.tracking_uri)}"
            if run.uncreated is not None:  # handed to a writer process, which the store refused
                message = (
                    f"{store} did not create the run ({tracking.first_line(run.lost)}); "
                    f"training finished ({results}) and its config, history, weights and every "
                    f"record of the run are in {kept}; python -m sweeps.resend {kept} creates "
                    "the run and sends them"
                )
            else:
                message = (
                    f"{store} stopped answering during run {run.ref} "
                    f"({tracking.first_line(run.lost)}); training finished ({results}) and its "
                    f"config, history, weights and unsent metrics are in {kept}; the run is "
                    "left RUNNING there (the next sweeps.run on this machine into this "
                    "experiment ends it KILLED) until they are sent: "
                    f"python -m sweeps.resend {kept}"
                )
            run_id = None if run.uncreated is not None else run.ref
            raise tracking.TrackingLost(
                message,
                Outcome(run_id, history, val_acc, test, tracking.ui_command(m.tracking_uri)),
                kept,
            )
        run.log_text(tracking.history_csv(history), "history.csv")
        return Outcome(run.run_id, history, val_acc, test, tracking.ui_command(m.tracking_uri))


def overrides_yaml(overrides: Sequence[str]) -> str:
    """The command line's overrides as a YAML list (a run's overrides.yaml)."""
    return "\n".join(f"- {o}" for o in overrides) + "\n"


UNSENT = "unsent"  # the folder, in the run's Hydra output folder, of what a lost store missed


def keep_unsent(
    run: tracking.Run,
    resolved: Mapping[str, Any],
    overrides: Sequence[str],
    history: History,
    model: Any,
) -> Path:
    """Write what a run whose store stopped answering made, and the store did not get, into
    ``UNSENT`` in its Hydra output folder (``mlruns/unsent/<run id>`` outside Hydra):
    config.yaml, overrides.yaml, history.csv (every epoch), model/params.npz, unsent.json
    (the metrics and tags not sent, with their steps and timestamps, and the store's URI),
    which ``python -m sweeps.resend`` sends once the store answers. Returns the folder."""
    try:
        folder = Path(HydraConfig.get().runtime.output_dir) / UNSENT
    except ValueError:  # not under Hydra (a direct call of execute)
        folder = run.kept_folder()
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(tracking.config_yaml(resolved))
    (folder / "overrides.yaml").write_text(overrides_yaml(overrides))
    (folder / "history.csv").write_text(tracking.history_csv(history))
    np.savez(folder / "model" / "params.npz", allow_pickle=False, **model.state_dict())
    writer.write_kept(folder, run.kept_record())
    return folder.resolve()


class _null_context:
    def __enter__(self) -> tracking.NullRun:
        return tracking.NullRun()

    def __exit__(self, *exc: object) -> Literal[False]:
        return False


def sweep_id_for(hc) -> str | None:
    """One id shared by every job of a Hydra multirun: a hash of its sweep directory."""
    if hc.mode != RunMode.MULTIRUN:
        return None
    return "sweep-" + hashlib.sha1(str(hc.sweep.dir).encode()).hexdigest()[:10]


def _summary(outcome: Outcome) -> str:
    lines = ["", "=== sweeps.run summary ==="]
    if outcome.val_acc is not None:
        lines.append(f"val acc   {outcome.val_acc:.4f}")
    if outcome.test:
        lines.append(
            f"test acc  {outcome.test['test/acc']:.4f}  (reported only, never used for selection)"
        )
    if outcome.run_id:
        lines.append(f"MLflow run {outcome.run_id}")
        lines.append(f"open the UI: {outcome.ui}")
    return "\n".join(lines)


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        cfg = validate(dcfg)
    except ValueError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.mlflow.enabled:
        m = cfg.mlflow
        try:
            tracking.check_recording(m.tracking_uri, m.experiment_name, m.artifact_root)
        except stores.StoreError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        try:
            dead = tracking.end_dead_runs(m.tracking_uri, m.experiment_name, m.artifact_root)
        except Exception as e:  # housekeeping: it does not stop this run
            log.warning("could not look for runs left RUNNING by dead processes: %s", e)
            dead = []
        for run_id in dead:
            log.warning("run %s was left RUNNING by a process that died: ended KILLED", run_id)
    multirun = hc.mode == RunMode.MULTIRUN
    if cfg.sweep_id is None and multirun:
        cfg.sweep_id = sweep_id_for(hc)
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    cfg.experiment = hc.runtime.choices.get("experiment") or cfg.experiment
    # A DictConfig becomes a dict with str keys (the stub returns the union of every
    # container type to_container can return).
    resolved = cast(dict[str, Any], OmegaConf.to_container(dcfg, resolve=True))
    resolved["sweep_id"] = cfg.sweep_id
    resolved["experiment"] = cfg.experiment
    overrides = list(hc.overrides.task)
    try:
        with tracking.sigterm_as_interrupt():
            outcome = execute(cfg, resolved, overrides, choices=choices)
    except KeyboardInterrupt as e:
        marked = "; the MLflow run is marked KILLED" if cfg.mlflow.enabled else ""
        if tracking.left_running(e):
            marked = "; the MLflow run is left RUNNING: its tracking store does not answer"
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}){marked}", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, tracking.Terminated) else 130) from None
    except DivergedError as e:
        print(f"error: {e}; the MLflow run is marked FAILED", file=sys.stderr)
        if multirun:
            return None
        raise SystemExit(1) from None
    except tracking.TrackingLost as e:
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            return None
        raise SystemExit(1) from None
    except Exception as e:
        if multirun:  # one failed job does not stop the sweep; it is recorded as FAILED
            log.exception("job failed: %s", e)
            return None
        raise
    print(_summary(outcome))
    return outcome.val_acc


def main() -> None:
    register_schemas()
    _hydra_main()


register_schemas()

if __name__ == "__main__":
    main()
