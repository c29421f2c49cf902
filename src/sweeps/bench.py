"""Benchmark the trainer against PyTorch eager and the machine's GEMM rate.

    python -m sweeps.bench                  # every section, 5 repeats
    python -m sweeps.bench --repeats 3 --sections mlp --readme README.md

Sections (``SECTIONS``; each adds timings and ratios to one report):

* ``mlp``: the book's optimizer-comparison MLP (784-100-100-100-100-10 ReLU, He init, Adam,
  batch 128) on 60000 random samples, one epoch. ``sweeps`` runs through
  ``sweeps.experiment.train`` with a config composed from ``conf/`` (the code path of
  ``sweeps.run``, without MLflow); PyTorch eager runs the same architecture from the same
  initial weights on the same data and batch order, float32, default Adam with the same
  hyperparameters, the same thread count, reading the loss back every batch as sweeps does.
  Reported: the training iterations of both (the fair comparison), the full sweeps epoch
  including its evaluation pass, and the MLP's GEMM FLOPs per second over a float32 GEMM
  rate measured in the same repeats (2048^3, NumPy's BLAS).
* ``cnn``: the book's SimpleConvNet (conv 30x5x5 - ReLU - pool 2 - affine 100 - ReLU -
  affine 10), batch 100, 6000 samples, one epoch, same protocol.

Contenders alternate within each repeat (the order rotates every repeat) with a short pause
between them, so they share the machine's noise; timings are the median of the repeats with
min and max, and each ratio is the median of the per-repeat ratios. The 1-minute load
average is printed too: on a shared machine it says how much to trust the run. PyTorch is
optional (``pip install -e '.[bench]'``): it is imported lazily and reported as ``not
installed`` when missing. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info

from sweeps import data as D
from sweeps.config import RunConfig, load
from sweeps.experiment import build_model, train
from sweeps.train import Callback

PAUSE = 0.3  # seconds between contenders: lets BLAS/OpenMP worker threads stop spinning


# -- results ------------------------------------------------------------------------------


@dataclass
class Timing:
    """Repeated wall-clock measurements of one thing, in seconds."""

    label: str
    seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Ratio:
    """A figure derived per repeat (a ratio of times), with its target; reported by its
    median over the repeats."""

    label: str
    values: list[float]
    target: str
    met: Callable[[float], bool]
    percent: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, v: float) -> str:
        return f"{100 * v:.0f}%" if self.percent else f"{v:.2f}x"


@dataclass
class Report:
    timings: list[Timing] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- helpers ------------------------------------------------------------------------------


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS as threadpoolctl sees it (which kernel actually runs)."""
    for pool in threadpool_info():
        if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", ""):
            return pool
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return pools[0] if pools else {}


def blas_threads() -> int:
    return int(blas_info().get("num_threads") or 1)


def compose(overrides: Sequence[str]) -> RunConfig:
    """A RunConfig composed from ``conf/`` with Hydra's Compose API, as ``sweeps.run`` does."""
    return load(overrides)


def random_splits(n: int, sample_shape: tuple[int, ...], seed: int = 1234) -> D.Splits:
    """Uniform [0, 1) float32 inputs and random labels; no validation split."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *sample_shape), dtype=np.float32)
    t = rng.integers(0, 10, size=n, dtype=np.int64)
    train_set = D.Dataset(x, t)
    return D.Splits(train=train_set, val=None, test=D.Dataset(x[:1], t[:1]), digest="bench")


class _Stopwatch(Callback):
    """Times the training iterations only: from train start to the end of the last batch."""

    def on_train_start(self, model) -> None:
        self.start = self.end = time.perf_counter()

    def on_batch_end(self, iteration: int, loss: float) -> None:
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def time_sweeps(cfg: RunConfig, splits: D.Splits) -> tuple[float, float]:
    """(training iterations, whole ``train`` call including evaluation) in seconds."""
    watch = _Stopwatch()
    start = time.perf_counter()
    train(cfg, callbacks=[watch], splits=splits, rng=np.random.default_rng(cfg.seed))
    return watch.seconds, time.perf_counter() - start


# -- PyTorch (optional) -------------------------------------------------------------------


def import_torch():
    """torch, or None when it is not installed (it is a bench extra, never a dependency)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_net(torch, model) -> Any:
    """A torch.nn.Sequential mirroring a sweeps model, starting from its weights."""
    from sweeps.nn import layers as L

    nn = torch.nn
    mods = []
    for layer in model.layers:
        if isinstance(layer, L.Affine):
            W, b = layer.params["W"], layer.params["b"]  # (D, M), (M,)
            m = nn.Linear(*W.shape)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(W.T.copy()))
                m.bias.copy_(torch.from_numpy(b.copy()))
            mods.append(m)
        elif isinstance(layer, L.Convolution):
            W, b = layer.params["W"], layer.params["b"]  # (FN, C, FH, FW)
            m = nn.Conv2d(
                W.shape[1], W.shape[0], W.shape[2:], stride=layer.stride, padding=layer.pad
            )
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(W.copy()))
                m.bias.copy_(torch.from_numpy(b.copy()))
            mods.append(m)
        elif isinstance(layer, L.ReLU):
            mods.append(nn.ReLU())
        elif isinstance(layer, L.MaxPooling):
            mods.append(nn.MaxPool2d((layer.pool_h, layer.pool_w), layer.stride, layer.pad))
        elif isinstance(layer, L.Flatten):
            mods.append(nn.Flatten())
        else:
            raise ValueError(f"no PyTorch mirror for {layer!r}")
    return nn.Sequential(*mods)


def time_torch(torch, cfg: RunConfig, splits: D.Splits) -> float:
    """One epoch of PyTorch eager training: same weights, data, batch order and Adam
    hyperparameters as ``time_sweeps``; the loss is read back every batch as sweeps does."""
    rng = np.random.default_rng(cfg.seed)
    net = torch_net(torch, build_model(cfg, rng, splits.train.x.shape[1:]))
    opt_cfg = cfg.optimizer
    opt = torch.optim.Adam(
        net.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps
    )
    x, t = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.t)
    n, batch = x.shape[0], cfg.trainer.batch_size
    loss_fn = torch.nn.functional.cross_entropy
    start = time.perf_counter()
    order = torch.from_numpy(rng.permutation(n))
    for i in range(0, n, batch):
        idx = order[i : i + batch]
        loss = loss_fn(net(x[idx]), t[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    return time.perf_counter() - start


# -- sections -----------------------------------------------------------------------------


def alternate(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Call every contender once per repeat, rotating the order each repeat and pausing
    between calls, after one untimed warm-up round; return each one's results in order."""
    names = list(contenders)
    for name in names:  # warm-up: imports, first allocations, BLAS and OpenMP threads
        contenders[name]()
    results: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(PAUSE)
            results[name].append(contenders[name]())
    return results


GEMM_N = 2048


def gemm_seconds() -> float:
    """One float32 GEMM of GEMM_N x GEMM_N matrices into a preallocated output."""
    rng = np.random.default_rng(0)
    a = rng.random((GEMM_N, GEMM_N), dtype=np.float32)
    b = rng.random((GEMM_N, GEMM_N), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # page faults and thread start stay out of the timing
    start = time.perf_counter()
    np.matmul(a, b, out=out)
    return time.perf_counter() - start


MLP_SIZES = (784, 100, 100, 100, 100, 10)
MLP_OVERRIDES = [
    "model=mlp",
    "optimizer=adam",
    "init=he",
    "trainer.epochs=1",
    "trainer.batch_size=128",
]


def mlp_epoch_flops(n: int, sizes: Sequence[int] = MLP_SIZES) -> float:
    """GEMM FLOPs of one training epoch: forward x@W, backward x.T@dout for every layer and
    dout@W.T for every layer but the first (the input needs no gradient)."""
    per_layer = [2.0 * n * d * m for d, m in zip(sizes[:-1], sizes[1:], strict=True)]
    return 3 * sum(per_layer) - per_layer[0]


def _versus_torch(
    report: Report,
    repeats: int,
    name: str,
    cfg: RunConfig,
    splits: D.Splits,
    target: float,
    flops: float | None = None,
) -> None:
    """Alternate sweeps, PyTorch and (given ``flops``) the GEMM probe; add the timings and
    the per-repeat ratios to the report."""
    torch = import_torch()
    contenders: dict[str, Callable[[], Any]] = {"sweeps": lambda: time_sweeps(cfg, splits)}
    if torch is not None:
        contenders["torch"] = lambda: time_torch(torch, cfg, splits)
    if flops is not None:
        contenders["gemm"] = gemm_seconds
    res = alternate(contenders, repeats)
    train_s = [s[0] for s in res["sweeps"]]
    report.timings += [
        Timing(f"{name}: sweeps, training iterations", train_s),
        Timing(f"{name}: sweeps, full epoch (train + evaluation)", [s[1] for s in res["sweeps"]]),
        Timing(
            f"{name}: PyTorch eager, training iterations",
            res.get("torch", []),
            note="" if torch is not None else "not installed",
        ),
    ]
    if "torch" in res:
        report.ratios.append(
            Ratio(
                f"{name}: sweeps / PyTorch (training iterations)",
                [s / p for s, p in zip(train_s, res["torch"], strict=True)],
                f"<= {target:.2f}x",
                lambda v, target=target: v <= target,
            )
        )
    if flops is not None:
        gemm = res["gemm"]
        report.timings.append(Timing(f"float32 GEMM {GEMM_N}^3 (next to {name})", gemm))
        rates = [2.0 * GEMM_N**3 / s for s in gemm]
        report.notes.append(
            f"GEMM rate: median {statistics.median(rates) / 1e9:.0f} GFLOP/s "
            f"(min {min(rates) / 1e9:.0f}, max {max(rates) / 1e9:.0f}); "
            f"the MLP epoch is {flops / 1e9:.1f} GFLOP of GEMMs"
        )
        report.ratios.append(
            Ratio(
                f"{name}: sweeps FLOP rate / GEMM rate (same repeat)",
                [flops / s / rate for s, rate in zip(train_s, rates, strict=True)],
                ">= 40%",
                lambda v: v >= 0.40,
                percent=True,
            )
        )


def bench_mlp(report: Report, repeats: int) -> None:
    n = 60000
    cfg = compose(MLP_OVERRIDES)
    _versus_torch(
        report,
        repeats,
        "MLP 784-100x4-10, batch 128, 60000 samples",
        cfg,
        random_splits(n, (784,)),
        target=0.7,
        flops=mlp_epoch_flops(n),
    )


def bench_cnn(report: Report, repeats: int) -> None:
    cfg = compose(
        [
            "model=simple_cnn",
            "optimizer=adam",
            "init=he",
            "trainer.epochs=1",
            "trainer.batch_size=100",
        ]
    )
    _versus_torch(
        report,
        repeats,
        "SimpleConvNet, batch 100, 6000 samples",
        cfg,
        random_splits(6000, (1, 28, 28)),
        target=1.5,
    )


def bench_tracking(report: Report, repeats: int) -> None:
    """The MLP epoch through ``train`` alone, and inside an MLflow run (a temporary SQLite
    store) with ``sweeps.tracking.MlflowCallback``: once as configured by default (figures
    and weights at the end) and once with metrics only. Each time covers the whole run:
    opening it, the epoch with its evaluation, and ending it."""
    import logging
    import tempfile

    import mlflow  # configures its loggers on import; quiet them after that

    from sweeps import tracking

    logging.getLogger(mlflow.__name__).setLevel(logging.WARNING)  # no store-creation chatter
    cfg = compose(MLP_OVERRIDES)
    splits = random_splits(60000, (784,))
    probe = splits.train.x[: cfg.trainer.probe_size]
    m = cfg.mlflow

    def untracked() -> float:
        return time_sweeps(cfg, splits)[1]

    def tracked(figures: bool, weights: bool) -> float:
        start = time.perf_counter()
        with tracking.open_run(uri, "bench", f"{tmp}/artifacts") as run:
            cb = tracking.MlflowCallback(run, probe, m.batch_loss_every, figures, weights)
            train(cfg, [cb], splits=splits, rng=np.random.default_rng(cfg.seed))
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        res = alternate(
            {
                "off": untracked,
                "full": lambda: tracked(m.log_figures, m.log_model),
                "metrics": lambda: tracked(False, False),
            },
            repeats,
        )
    name = "MLP epoch (train + evaluation)"
    report.timings += [
        Timing(f"{name}: no tracking", res["off"]),
        Timing(f"{name}: MLflow run, default logging (metrics, figures, weights)", res["full"]),
        Timing(f"{name}: MLflow run, metrics only", res["metrics"]),
    ]
    for key, what in (("full", "default logging"), ("metrics", "metrics only")):
        report.ratios.append(
            Ratio(
                f"{name}: tracking overhead, {what}",
                [t / off - 1.0 for t, off in zip(res[key], res["off"], strict=True)],
                "<= 5%",
                lambda v: v <= 0.05,
                percent=True,
            )
        )


#: name -> section. Planned: "search" (trials per minute with 1 and 2 workers, with and
#: without tracking), a function like these.
SECTIONS: dict[str, Callable[[Report, int], None]] = {
    "mlp": bench_mlp,
    "cnn": bench_cnn,
    "tracking": bench_tracking,
}


# -- output -------------------------------------------------------------------------------


def machine_lines(torch) -> list[str]:
    info = blas_info()
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return [
        f"machine: {platform.machine()}, {cores} cores ({usable} usable), {platform.platform()}",
        f"BLAS: {info.get('internal_api')} {info.get('version')}, kernel "
        f"{info.get('architecture')}, {info.get('num_threads')} threads"
        + (f" (env {env})" if env else ""),
        f"versions: python {platform.python_version()}, numpy {np.__version__}, torch "
        + (torch.__version__ if torch is not None else "not installed")
        + (f" ({torch.get_num_threads()} threads, default Adam)" if torch is not None else ""),
    ]


def load_average() -> str:
    """The 1-minute load average: other processes on a shared machine skew every timing."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def format_report(report: Report, header: Sequence[str]) -> str:
    lines = [*header, ""]
    lines += ["| measurement | median s | min s | max s |", "|---|---:|---:|---:|"]
    for t in report.timings:
        if t.seconds:
            s = t.seconds
            lines.append(f"| {t.label} | {t.median:.3f} | {min(s):.3f} | {max(s):.3f} |")
        else:
            lines.append(f"| {t.label} | {t.note or 'n/a'} | | |")
    if report.ratios:
        lines += [
            "",
            "| ratio | median | min | max | target | met |",
            "|---|---:|---:|---:|---|---|",
        ]
        for r in report.ratios:
            lines.append(
                f"| {r.label} | {r.fmt(r.median)} | {r.fmt(min(r.values))} | "
                f"{r.fmt(max(r.values))} | {r.target} | {'yes' if r.met(r.median) else 'NO'} |"
            )
    lines += ["", *report.notes]
    return "\n".join(lines)


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_readme(path: str, text: str) -> None:
    """Replace the block between the bench markers of the README with ``text``."""
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    head, sep, rest = readme.partition(README_START)
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise SystemExit(f"{path} has no {README_START} ... {README_END} block")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{README_START}\n{text}\n{README_END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeps.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per contender")
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="what to run"
    )
    parser.add_argument("--readme", metavar="PATH", help="also write the table into this README")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch = import_torch()
    if torch is not None:
        torch.set_num_threads(blas_threads())  # the same thread count as NumPy's BLAS
    load_before, start = load_average(), time.perf_counter()
    report = Report()
    for name in args.sections:
        SECTIONS[name](report, args.repeats)
    report.notes.append(
        f"total benchmark time: {time.perf_counter() - start:.0f} s; "
        f"load average (1 min) {load_before} before, {load_average()} after"
    )
    words = ["--repeats", str(args.repeats), "--sections", *args.sections]
    command = "python -m sweeps.bench " + " ".join(words)
    text = format_report(report, [f"`{command}`", "", *machine_lines(torch)])
    print(text)
    if args.readme:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
