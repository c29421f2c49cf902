"""``python -m sweeps.resend FOLDER``: send what a run kept on disk when its tracking store
stopped answering (``sweeps.run`` writes it to ``unsent/`` in the run's output folder and
names the folder in its error), once the store answers again.

It sends the kept metrics (with their own steps and timestamps) and tags to the run, uploads
``history.csv`` and ``model/params.npz`` as the run's artifacts, drops the ``sweeps.failure``
reason a later ``sweeps.run`` may have set when it ended the run KILLED, and ends the run
FINISHED. ``unsent.json`` then becomes ``sent.json``: a second call sends nothing twice. A
call that failed part way (the store went down again) can be made again: metrics the store
has already are left out.

A search worker's writer process keeps what the store refused of a trial's run the same
way (``writer.UNSENT_ROOT``), with the params, dataset inputs and text artifacts among it,
and the status the run was to end with. For a run the store never created, everything was
kept: resend creates the run first (in its experiment, under its study's parent run, with
its tags and name) and writes the new run's id into the kept file at once, so a call that
fails after that sends to the same run. A search's launcher sends its study's folders
itself, at its start and end (``Search.send_kept``). ``python -m sweeps.resend mlruns/unsent``
sends every folder in it. A folder is sent under a lock of its own: two processes sending
it at once take turns, and the second finds it sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sweeps import locks, stores, tracking, writer

UNSENT, SENT = writer.UNSENT_FILE, "sent.json"
LOCK = ".resend.lock"  # held while a folder is sent


def kept_folders(root: Path) -> list[Path]:
    """The folders directly in ``root`` that hold kept records not yet sent, in name order."""
    return sorted(f.parent for f in root.glob(f"*/{UNSENT}"))


def read_kept(folder: Path) -> dict:
    """The records kept in ``folder``. ValueError for a folder that holds none (or was sent)."""
    kept_file = folder / UNSENT
    if not kept_file.is_file():
        if (folder / SENT).is_file():
            raise ValueError(f"{folder} was sent already ({SENT}); nothing to send")
        raise ValueError(f"{folder} holds no {UNSENT}: not a folder sweeps.run kept a run in")
    try:
        kept = json.loads(kept_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {kept_file}: {e}") from None
    missing = [k for k in ("run_id", "tracking_uri", "metrics", "tags") if k not in kept]
    if kept.get("run_id") is None and "create" not in kept:
        missing.append("create")
    if missing:
        raise ValueError(f"{kept_file} lacks {', '.join(missing)}: not written by sweeps.run")
    return kept


def resend(folder: Path, tracking_uri: str | None = None) -> tuple[str, str]:
    """Send ``folder``'s kept records to their run and end it (FINISHED, or the status its
    worker was to end it with); returns the run id and that status.
    ValueError for a folder that holds no kept run; StoreError for a store that does not
    answer (nothing is sent then). Two calls for one folder at once (a launcher's
    ``Search.send_kept`` and a user's) take turns: the second finds it sent."""
    read_kept(folder)  # a mistyped folder is not created by the lock below
    with locks.flock(folder / LOCK):
        return _resend(folder, read_kept(folder), tracking_uri)


def _resend(folder: Path, kept: dict, tracking_uri: str | None) -> tuple[str, str]:
    uri = tracking_uri or kept["tracking_uri"]
    stores.check_reachable(uri, "MLflow tracking store")
    client = tracking.get_client(uri)
    if kept.get("run_id") is None:
        kept["run_id"] = _create(client, kept, folder)
        writer.write_kept(folder, kept)  # a second try sends to this run
    try:
        stored = client.get_run(kept["run_id"])
    except Exception as e:
        raise stores.StoreError(
            f"run {kept['run_id']} is not in the MLflow tracking store at {stores.redact(uri)}: "
            f"{tracking.first_line(e)}"
        ) from None
    info = stored.info
    run = tracking.Run(client, info.run_id, info.artifact_uri)
    # what its writer process handed over and the store refused (a search trial's)
    if kept.get("params"):
        run.log_params(kept["params"])
    _log_inputs(client, info.run_id, kept.get("inputs", []))
    if kept.get("texts"):
        run.log_texts(kept["texts"])
    if tracking.FAILURE_TAG in stored.data.tags:  # "its process died": it did not (a
        client.delete_tag(info.run_id, tracking.FAILURE_TAG)  # kept one is sent next)
    run.send_kept(kept)
    if (folder / "history.csv").is_file():  # sweeps.run's keep_unsent (not a writer's)
        run.log_text((folder / "history.csv").read_text(), "history.csv")
    params = folder / "model" / "params.npz"
    if params.is_file():
        run.log_bytes(params.read_bytes(), "model/params.npz")
    status = kept.get("status") or "FINISHED"
    run.end(status)
    os.replace(folder / UNSENT, folder / SENT)
    return info.run_id, status


def _create(client, kept: dict, folder: Path) -> str:
    """Create the run a search trial's store refused to create, as its worker asked: in
    the experiment it named (created if need be, as the run would have), or by id."""
    create = kept["create"]
    where = create.get("experiment_id") or repr(create.get("experiment_name"))
    try:
        if "experiment_id" in create:
            experiment_id = create["experiment_id"]
        elif (exp := client.get_experiment_by_name(create["experiment_name"])) is not None and (
            exp.lifecycle_stage == "active"
        ):
            experiment_id = exp.experiment_id  # wherever it keeps its artifacts
        else:  # new, or deleted (which says how to restore it)
            experiment_id = tracking.ensure_experiment(
                client, create["experiment_name"], create["artifact_root"], client.tracking_uri
            )
        run = client.create_run(
            experiment_id,
            start_time=create.get("start_time"),
            tags=create.get("tags") or {},
            run_name=create.get("run_name"),
        )
    except Exception as e:
        raise stores.StoreError(
            f"could not create the run kept in {folder} in experiment "
            f"{where}: {tracking.first_line(e)}"
        ) from None
    return run.info.run_id


def _log_inputs(client, run_id: str, inputs: list[dict]) -> None:
    """Log dataset inputs kept as MLflow's JSON (``tracking.requests_kept``)."""
    if not inputs:
        return
    from google.protobuf.json_format import ParseDict
    from mlflow.entities import DatasetInput
    from mlflow.protos.service_pb2 import DatasetInput as DatasetInputProto

    client.log_inputs(
        run_id, [DatasetInput.from_proto(ParseDict(d, DatasetInputProto())) for d in inputs]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.resend", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "folder",
        type=Path,
        help="the unsent/ folder sweeps.run named, or a folder of them (mlruns/unsent: each "
        "one not sent yet)",
    )
    parser.add_argument(
        "--tracking-uri", help="the store to send to (default: the one the run was in)"
    )
    args = parser.parse_args(argv)
    folders = [args.folder]
    if not (args.folder / UNSENT).exists() and not (args.folder / SENT).exists():
        folders = kept_folders(args.folder) or folders  # a folder of kept folders
    code = 0
    for folder in folders:
        try:
            run_id, status = resend(folder, args.tracking_uri)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
            continue
        except stores.StoreError as e:  # the others would wait for it too
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"sent {folder} to run {run_id}, now {status}")
    return code


if __name__ == "__main__":
    sys.exit(main())
