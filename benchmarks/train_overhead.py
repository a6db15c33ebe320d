"""Ray Train's overhead on a training step, against a plain PyTorch loop measured in the same run.

The bar: Ray Train's steady-state step time (1 worker) is at most 10% above the plain loop's, with
the same model, data and steps. Start-up is reported separately, and 2 workers against 1 in
samples per second (on these 2 cores).

Setup (not timed): an archive of 8 random-ellipsoid scans of ``(8, 64, 64)``, all in split
``train``, simulated without Ray as single-coil Cartesian MRI (4x ``random_1d``, 40 dB), and a train
stage: ``unrolled_gd {n_iter: 4, features: 16}``, batch size 4, l1 loss, Adam, 1 torch thread per
worker, no validation scans (so every epoch is training steps plus rank 0's checkpoint and MLflow
metrics). 64 slices make 16 steps per epoch on 1 worker, 8 per rank on 2.

Three ways, interleaved, ``--repeats`` times each (default 3):

* ``plain loop``: in this process, ``torch.set_num_threads(1)``, the project's own pieces:
  :class:`pipelines.train.SliceDataset`, ``build_model``, ``make_loss``, ``make_optimizer``,
  ``make_schedule``, the same seeded epoch order, the same batches (through the same background
  prefetch the worker uses, when :mod:`pipelines.train` has one) and the same optimiser step
  (finite-loss check, gradient-norm clip, step, schedule). Its losses must equal Ray Train's on 1
  worker: that is checked, so the two really run the same steps.
* ``Ray Train, 1 worker`` and ``Ray Train, 2 workers``: the project's own
  :func:`pipelines.train.train_loop_per_worker` under ``ray.train.torch.TorchTrainer``, built as
  :func:`pipelines.train.run` builds it (``TrainJob`` as ``train_loop_config`` with a progress
  queue, ``RunConfig`` storage under the archive's ``_meta/train``, an MLflow run created on the
  driver with :func:`pipelines.tracking.start_pipeline_run` on SQLite in the temp dir), on an
  embedded Ray of 2 CPUs started once (as a running cluster would be).

What is measured, the same way for all three:

* **step time**: the median wall time of one optimiser step, data wait included (the interval
  between two step ends), per epoch: the worker's reported ``step_seconds``; the loop times
  itself identically. Steady state is the median over the epochs after the first, over all
  repeats;
* **samples/s**: samples of the whole world per epoch second (``samples_per_second``), steady state;
* **start-up**: from ``trainer.fit()`` being called (for the loop: from entering it) to the end
  of the first optimiser step, seen by the driver when rank 0's first progress message arrives.
  It includes the first step itself (its first read of the archive), for the loop as well;
* **after last step**: from the last step's progress message to ``fit()`` returning (the last
  epoch's checkpoint and report, the worker group's shutdown);
* **progress put** (Ray Train): how long one of rank 0's ``progress.put_nowait`` blocks, a round
  trip to the Ray queue actor the driver reads. Rank 0 puts at most twice a second (not every
  step), so this is a cost per put, not per step. A wrapper around the queue times each call and
  sends the duration with the next message;
* **others' CPU %**: the share of the CPUs that processes outside this benchmark took during the
  run (the machine is shared). Ray workers run at nice 15, this process at nice 0, so such load
  can slow Ray Train more than the loop: read the ratio beside that column.

With ``--diagnose``, a fourth way: Ray Train on 1 worker without the progress queue (the worker then
makes no actor call per step; start-up is not seen), to show what the queue costs.

Run: ``python benchmarks/train_overhead.py [--repeats N] [--epochs N] [--diagnose]``; writes
``benchmarks/results/train_overhead.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts benchmarks/ first on sys.path, and Ray hands the script's folder
# to its workers, where benchmarks/operators.py would shadow the operators package: drop it.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if p and Path(p).resolve() != Path(__file__).resolve().parent
]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # as pipelines.embedded sets it
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from benchmarks.archives import simulated_archive  # noqa: E402
from benchmarks.timing import measured_with_others_cpu, print_table, write_run  # noqa: E402
from models.losses import make_loss  # noqa: E402
from models.optim import make_optimizer, make_schedule  # noqa: E402
from models.registry import build_model  # noqa: E402
from pipelines import train as train_module  # noqa: E402
from pipelines.spec import TrainStage  # noqa: E402
from pipelines.store import Archive  # noqa: E402
from pipelines.tracking import client, start_pipeline_run  # noqa: E402
from pipelines.train import SliceDataset, TrainJob, train_loop_per_worker  # noqa: E402

BAR_OVERHEAD = 0.10  # Ray Train, 1 worker: steady step time <= 1.10 x the plain loop's
SEED = 0
SCANS = 8
SHAPE = (8, 64, 64)
MODEL = {"name": "unrolled_gd", "kwargs": {"n_iter": 4, "features": 16}}
EXPERIMENT = "bench-train-overhead"
STAGE_NAME = "train"
DIAGNOSTIC = "Ray Train, 1 worker, no progress queue (diagnostic)"


# -- setup (not timed) -----------------------------------------------------------------------------
def build_archive(path: Path) -> tuple[Archive, list[str]]:
    """``SCANS`` committed phantoms in split "train", each simulated (1 coil, 4x random_1d, 40 dB), no Ray."""
    ids = [f"s{i}" for i in range(SCANS)]
    return simulated_archive(path, ids, SHAPE, "train", SEED), ids


def make_stage(epochs: int, workers: int = 1) -> TrainStage:
    return TrainStage.model_validate(
        {"kind": "train", "name": STAGE_NAME, "model": MODEL, "workers": workers, "epochs": epochs,
         "batch_size": 4, "threads_per_worker": 1}
    )  # fmt: skip


def _threads(stage: TrainStage) -> int:
    return int(getattr(stage, "threads", None) or stage.threads_per_worker or 1)


# -- (b) the plain loop ----------------------------------------------------------------------------
def run_plain(archive: Archive, ids: list[str], stage: TrainStage) -> dict[str, Any]:
    """The worker's steps in a plain loop in this process; per-epoch numbers as the worker reports them."""
    prefetch = getattr(train_module, "prefetch", None)  # the worker's background batch builder
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(stage))
    t_start = time.perf_counter()
    try:
        train_set = SliceDataset(archive, ids)
        batches_per_epoch = max(1, math.ceil(len(train_set) / stage.batch_size))
        torch.manual_seed(SEED)  # what the worker does before building the model
        model = build_model(stage.model.name, stage.model.kwargs)
        optimizer = make_optimizer(model.parameters(), stage.optimizer, stage.lr, stage.weight_decay)
        schedule = make_schedule(optimizer, stage.schedule, stage.lr, batches_per_epoch * stage.epochs)
        loss_fn = make_loss(stage.loss)
        params = [p for p in model.parameters() if p.requires_grad]
        first_step, epochs = None, []

        def batches(order: np.ndarray) -> Any:
            for start in range(0, len(order), stage.batch_size):
                yield train_set.batch(order[start : start + stage.batch_size])

        for epoch in range(stage.epochs):
            t0 = time.perf_counter()
            order = np.random.default_rng([SEED, epoch]).permutation(len(train_set))
            model.train()
            losses, step_times = [], []
            t_step = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            source = batches(order)
            for y, op, target in prefetch(source) if prefetch is not None else source:
                loss = loss_fn(model(y, op), target)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"plain loop: loss {float(loss)} at epoch {epoch}")
                loss.backward()
                losses.append(loss.item())
                norm = torch.nn.utils.clip_grad_norm_(params, stage.grad_clip or float("inf"))
                if not torch.isfinite(norm):
                    raise RuntimeError(f"plain loop: gradient norm {float(norm)} at epoch {epoch}")
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                now = time.perf_counter()
                step_times.append(now - t_step)
                t_step = now
                first_step = first_step or now
            seconds = time.perf_counter() - t0
            epochs.append(
                {
                    "epoch": epoch,
                    "train_loss": float(np.mean(losses)),
                    "epoch_seconds": seconds,
                    "step_seconds": float(np.median(step_times)),
                    "samples_per_second": len(order) / seconds,
                    "world_size": 1,
                    "steps": len(step_times),
                }
            )
        wall = time.perf_counter() - t_start
    finally:
        torch.set_num_threads(threads)
    assert first_step is not None
    return {"epochs": epochs, "startup": first_step - t_start, "wall": wall, "after_last": 0.0}


# -- (a), (c) Ray Train ----------------------------------------------------------------------------
def _epoch_metrics(tracking_uri: str, run_id: str, steps_per_epoch: int) -> list[dict[str, Any]]:
    """The per-epoch metrics rank 0 logged to MLflow (``<stage>/<key>``), one dict per epoch."""
    c = client(tracking_uri)
    keys = ["train_loss", "epoch_seconds", "step_seconds", "samples_per_second", "world_size"]
    history = {k: {m.step: m.value for m in c.get_metric_history(run_id, f"{STAGE_NAME}/{k}")} for k in keys}
    epochs = []
    for epoch in sorted(history["epoch_seconds"]):
        row = {"epoch": epoch, **{k: history[k].get(epoch) for k in keys}, "steps": steps_per_epoch}
        if row["step_seconds"] is None:  # a worker without the step_seconds metric: the epoch's mean step
            row["step_seconds"] = row["epoch_seconds"] / steps_per_epoch
        epochs.append(row)
    return epochs


class TimedProgress:
    """The progress queue as the worker sees it (``put_nowait``), timing each call: the item rank 0
    puts is sent with how long its previous ``put_nowait`` blocked, in the same single actor call."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.previous: float | None = None

    def put_nowait(self, item: float) -> None:
        t0 = time.perf_counter()
        self.queue.put_nowait((item, self.previous))
        self.previous = time.perf_counter() - t0


def run_ray_train(
    archive: Archive,
    ids: list[str],
    stage: TrainStage,
    tracking_uri: str,
    label: str,
    progress_queue: bool = True,
) -> dict[str, Any]:
    """``train_loop_per_worker`` under ``TorchTrainer``, built as ``pipelines.train.run`` builds it;
    ``progress_queue=False`` (a diagnostic) passes no progress queue, so no start-up is seen."""
    import queue as queue_lib

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    run_id = start_pipeline_run(tracking_uri, EXPERIMENT, label, f"bench-{label}", {})
    job = TrainJob(
        stage=stage,
        archive_uri=archive.uri,
        storage_options=archive.storage_options,
        tracking_uri=tracking_uri,
        run_id=run_id,
        seed=SEED,
        train_ids=ids,
        val_ids=[],
    )
    progress: Queue = Queue(actor_options={"num_cpus": 0})
    arrivals: list[float] = []
    put_seconds: list[float] = []
    stop = threading.Event()

    def read_progress() -> None:  # the driver's clock when each of rank 0's step messages arrives
        while not stop.is_set():
            try:
                _, previous_put = progress.get(timeout=0.5)  # as pipelines.train.run reads it
            except queue_lib.Empty:
                continue
            except Exception:
                return
            arrivals.append(time.perf_counter())
            if previous_put is not None:
                put_seconds.append(previous_put)

    cpus = float(getattr(stage, "cpus_per_worker", 1.0))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            **job.model_dump(mode="json"),
            **({"progress": TimedProgress(progress)} if progress_queue else {}),
        },
        scaling_config=ScalingConfig(
            num_workers=stage.workers, use_gpu=False, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name=label,  # unique: the same name would resume from that run's checkpoint
            storage_path=f"{archive.uri}/_meta/train",
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(
                num_to_keep=stage.keep_checkpoints,
                checkpoint_score_attribute="train_loss",
                checkpoint_score_order="min",
            ),
        ),
    )
    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
        t1 = time.perf_counter()
    finally:
        stop.set()
        reader.join()
        progress.shutdown()
    if result.error:
        raise RuntimeError(f"Ray Train ({label}) failed: {result.error}")
    per_rank = len(ids) * SHAPE[0] // stage.workers
    epochs = _epoch_metrics(tracking_uri, run_id, max(1, math.ceil(per_rank / stage.batch_size)))
    if len(epochs) != stage.epochs or (progress_queue and not arrivals):
        raise RuntimeError(f"Ray Train ({label}): {len(epochs)} epochs logged, {len(arrivals)} steps seen")
    return {
        "epochs": epochs,
        "startup": arrivals[0] - t0 if arrivals else None,
        "wall": t1 - t0,
        "after_last": t1 - arrivals[-1] if arrivals else None,
        "steps_seen": len(arrivals),
        "put_seconds": statistics.median(put_seconds) if put_seconds else None,
        "put_seconds_mean": statistics.mean(put_seconds) if put_seconds else None,
    }


# -- summary ---------------------------------------------------------------------------------------
def _steady(runs: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over every epoch after the first, over all repeats."""
    return statistics.median(e[key] for r in runs for e in r["epochs"] if e["epoch"] > 0)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def summarise(measured: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plain_step = _steady(measured["plain loop"], "step_seconds")
    one_sps = _steady(measured["Ray Train, 1 worker"], "samples_per_second")
    rows, facts = [], {}
    for way, runs in measured.items():
        step = _steady(runs, "step_seconds")
        sps = _steady(runs, "samples_per_second")
        ratio = step / plain_step
        if way == "Ray Train, 1 worker":
            bar, result = f"step <= {1 + BAR_OVERHEAD:.2f} x plain", _verdict(ratio <= 1 + BAR_OVERHEAD)
            facts["ratio_1_worker"] = ratio
        elif way == "Ray Train, 2 workers":
            bar, result = "- (samples/s vs 1 worker)", "-"
            facts["scaling_2_workers"] = sps / one_sps
        else:
            bar, result = "-", "-"
            if way == DIAGNOSTIC:
                facts["ratio_1_worker_no_progress_queue"] = ratio
        rows.append(
            {
                "way": way,
                "workers": runs[0]["epochs"][0]["world_size"],
                "step ms (median)": 1000 * step,
                "step ms per repeat": ", ".join(f"{1000 * _steady([r], 'step_seconds'):.1f}" for r in runs),
                "samples/s": sps,
                "step / plain": ratio,
                "samples/s / 1 worker": sps / one_sps,
                "start-up s": _median_or_dash(r["startup"] for r in runs),
                "after last step s": _median_or_dash(r["after_last"] for r in runs),
                "wall s": statistics.median(r["wall"] for r in runs),
                "progress put ms (median, mean)": _put_text(runs),
                "others' CPU %": round(100 * statistics.median(r["others_cpu"] for r in runs), 1),
                "bar": bar,
                "result": result,
            }
        )
    facts["plain_step_s"] = plain_step
    facts["put_seconds_1_worker"] = _put_seconds(measured["Ray Train, 1 worker"])
    return rows, facts


def _put_seconds(runs: list[dict[str, Any]], key: str = "put_seconds") -> float | None:
    """Median over repeats of the median (or mean) time rank 0's ``progress.put_nowait`` blocked a step."""
    found = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(found) if found else None


def _put_text(runs: list[dict[str, Any]]) -> str:
    median, mean = _put_seconds(runs), _put_seconds(runs, "put_seconds_mean")
    return "-" if median is None or mean is None else f"{1000 * median:.2f}, {1000 * mean:.2f}"


def _median_or_dash(values: Any) -> float | str:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else "-"


def _same_losses(measured: dict[str, list[dict[str, Any]]]) -> float:
    """The largest relative difference between the plain loop's and Ray Train's (1 worker) epoch losses."""
    worst = 0.0
    for plain, ray in zip(measured["plain loop"], measured["Ray Train, 1 worker"], strict=True):
        for a, b in zip(plain["epochs"], ray["epochs"], strict=True):
            worst = max(worst, abs(a["train_loss"] - b["train_loss"]) / abs(a["train_loss"]))
    return worst


def _niceness() -> int:
    return os.nice(0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per way (default 3)")
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs per run; the first is not steady (default 5)"
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="add a 4th way: Ray Train, 1 worker, without the progress queue (what the queue costs)",
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not steady state")

    import ray

    log = Console(stderr=True)
    wide = Console(width=max(Console().width, 200))  # tables unwrapped when piped to a file
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-overhead-", dir=os.environ.get("TMPDIR")))
    tracking_uri = f"sqlite:///{workdir}/mlflow.db"
    payload: dict[str, Any] = {
        "scans": SCANS, "shape": SHAPE, "model": MODEL, "batch_size": 4, "epochs": args.epochs,
        "repeats": args.repeats, "bar_overhead": BAR_OVERHEAD, "loadavg_start": os.getloadavg(),
        "prefetch": hasattr(train_module, "prefetch"),
    }  # fmt: skip
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
        runtime_env={"env_vars": env},
    )  # fmt: skip
    try:
        t0 = time.perf_counter()
        archive, ids = build_archive(workdir / "archive")
        client(tracking_uri).search_experiments()  # the database's first migration, before any timing
        log.log(f"setup {time.perf_counter() - t0:.1f} s ({ray.__version__}, torch {torch.__version__})")
        ways = {
            "plain loop": lambda r: run_plain(archive, ids, make_stage(args.epochs)),
            "Ray Train, 1 worker": lambda r: run_ray_train(
                archive, ids, make_stage(args.epochs, 1), tracking_uri, f"w1-r{r}"
            ),
            "Ray Train, 2 workers": lambda r: run_ray_train(
                archive, ids, make_stage(args.epochs, 2), tracking_uri, f"w2-r{r}"
            ),
        }
        if args.diagnose:
            ways[DIAGNOSTIC] = lambda r: run_ray_train(
                archive, ids, make_stage(args.epochs, 1), tracking_uri, f"w1-noq-r{r}", progress_queue=False
            )
        measured: dict[str, list[dict[str, Any]]] = {k: [] for k in ways}
        for r in range(args.repeats):  # interleaved, so drift on the shared machine hits every way
            for way, fn in ways.items():
                measured[way].append(measured_with_others_cpu(lambda fn=fn, r=r: fn(r)))
            log.log(
                f"repeat {r + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]['wall']:.1f} s" for k, v in measured.items())
            )
        rows, facts = summarise(measured)
        facts["loss_rel_diff_plain_vs_1_worker"] = _same_losses(measured)
        nice = ray.get(ray.remote(num_cpus=0)(_niceness).remote())
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(
        f"Ray Train overhead: {SCANS} scans of {'x'.join(map(str, SHAPE))} (64 slices), unrolled_gd "
        f"n_iter=4 features=16, batch 4, 1 torch thread per process, {args.epochs} epochs; steady state = "
        f"medians over epochs 2-{args.epochs} of {args.repeats} repeats; Ray 2 CPUs",
        rows,
        wide,
    )
    ok = facts["ratio_1_worker"] <= 1 + BAR_OVERHEAD
    wide.print(
        f"bar: Ray Train (1 worker) steady step time <= {1 + BAR_OVERHEAD:.2f} x the plain loop's: "
        f"{facts['ratio_1_worker']:.3f} -> {_verdict(ok)}. 2 workers / 1 worker samples/s: "
        f"{facts['scaling_2_workers']:.2f}. Same steps: epoch losses of the plain loop and Ray Train "
        f"(1 worker) differ by at most {facts['loss_rel_diff_plain_vs_1_worker']:.1e} (relative). "
        f"Ray workers run at nice {nice}, this process (the plain loop) at nice {os.nice(0)}."
    )
    put = facts["put_seconds_1_worker"]
    if put is not None:
        step = facts["ratio_1_worker"] * facts["plain_step_s"]
        wide.print(
            f"Rank 0's progress.put_nowait is a blocking round trip to the Ray queue actor the driver's "
            f"progress bar reads: median {1000 * put:.2f} ms per put ({100 * put / step:.0f}% of a "
            "1-worker step); train.py puts at most twice a second, not every step."
        )
    if "ratio_1_worker_no_progress_queue" in facts:
        wide.print(
            f"Diagnostic: Ray Train on 1 worker without the progress queue: "
            f"{facts['ratio_1_worker_no_progress_queue']:.3f} x the plain loop's step."
        )
    payload |= {"rows": rows, "facts": facts, "runs": measured, "ray_worker_niceness": nice}
    write_run("train_overhead", payload, t_start)


if __name__ == "__main__":
    main()
