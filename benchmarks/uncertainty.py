"""Uncertainty maps: does the per-voxel std of MC dropout (and of a small deep ensemble) track the error?

A ``unet_post`` is trained on brain-phantom slices **under** :func:`models.uncertainty.mc_dropout`
(channel dropout ``p = 0.1`` on every hidden convolution, the principled way), then on test
subjects :func:`models.uncertainty.sample_reconstructions` gives the MC mean and the per-voxel
std of ``|x|``. Per scan we report Pearson's r between the std and ``| |mean| - reference |``
over all voxels and over the foreground (reference > 5% of its max, where the background's
shared zeros no longer help), with a trivial predictor beside it: ``|mean|`` itself, since the
error is larger where there is tissue. A second row is a deep ensemble of 3 ``unet_post`` trained
without dropout from different seeds, each for a third of the steps (the same training budget).

Protocol (the recipe and acquisition of :mod:`benchmarks.learned`, shortened):

* images ``(16, 96, 96)`` brain phantoms; training subjects 0-15 (256 slices), test subjects
  2000-2005 (their middle 8 slices, one scan each);
* single-coil Cartesian MRI, ``random_1d`` 4x with an 8% centre, 40 dB; a fresh mask per sample
  and step in training, one fixed mask per test subject;
* AdamW, one-cycle, ``l1+ssim``, batch 8 (:func:`benchmarks.learned.fit`);
* MC dropout: 16 samples at the training rate ``p``, seeded per scan.

The bar: the predicted std and the absolute error correlate positively on every scan
(the mean Pearson r over scans, all voxels, is reported beside the per-scan values).

Run: ``python benchmarks/uncertainty.py [--quick] [--steps N] [--samples S] [--no-ensemble]``;
writes ``benchmarks/results/uncertainty.json`` and ``uncertainty.png`` (and
``uncertainty_ensemble.png``). One thread by default (``--threads``): on this shared two-core
machine two threads ran a training step 20x slower than one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/operators.py would
# shadow the operators package: drop it.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if p and Path(p).resolve() != Path(__file__).resolve().parent
]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from benchmarks.learned import Acquired, acquire, draw_batch, fit, subjects  # noqa: E402
from benchmarks.timing import RESULTS_DIR, print_table, write_run  # noqa: E402
from models.inference import apply_slices  # noqa: E402
from models.registry import build_model  # noqa: E402
from models.uncertainty import (  # noqa: E402
    calibration,
    ensemble_std,
    foreground,
    mc_dropout,
    sample_reconstructions,
    uncertainty_figure,
)
from operators.metrics import psnr  # noqa: E402

SHAPE = (16, 96, 96)
MODEL = ("unet_post", {"features": [16, 32, 64]})
P = 0.1
MEMBERS = 3
ENS_COLUMNS = {"ens r all": "r_all", "ens r fg": "r_fg", "ens PSNR": "psnr_mean"}  # per-scan table
TRAIN_SEEDS, TEST_SEEDS = list(range(16)), [2000, 2001, 2002, 2003, 2004, 2005]


def _middle(volume: torch.Tensor, n: int = 8) -> torch.Tensor:
    d = volume.shape[0]
    return volume[d // 2 - n // 2 : d // 2 + n // 2]


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return psnr(x.abs().float(), ref, data_range=float(ref.max() - ref.min()))


def _train(seed: int, steps: int, images: torch.Tensor, p: float | None, bars: Progress, label: str) -> tuple:
    """A ``unet_post`` trained for ``steps`` (under dropout at ``p`` unless None); returns (model, facts)."""
    torch.manual_seed(seed)
    model = build_model(*MODEL)
    rng = np.random.default_rng([seed, 17])
    task = bars.add_task(label, total=steps)

    def run() -> dict[str, float]:
        return fit(
            model,
            lambda: draw_batch(images, 8, "random_1d", [4], 2, rng),
            steps,
            on_step=lambda step, loss: bars.update(task, completed=step + 1),
        )

    if p is None:
        facts = run()
    else:
        with mc_dropout(model, p, seed=seed):
            facts = run()
    return model, facts


def _score(ref: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, det: torch.Tensor) -> dict[str, float]:
    """Calibration and quality of one scan: ``ref`` ``(S, H, W)``, ``mean``/``det`` complex, ``std`` real."""
    error = (mean.abs() - ref).abs()  # (S, H, W)
    fg = foreground(ref)
    return {
        "r_all": calibration(std, error),
        "r_fg": calibration(std, error, fg),
        "r_proxy_fg": calibration(mean.abs(), error, fg),  # the trivial predictor: intensity
        "psnr_mean": _psnr(mean, ref),
        "psnr_det": _psnr(det, ref),
        "std_over_mae_fg": float(std[torch.from_numpy(fg)].mean() / error[torch.from_numpy(fg)].mean()),
    }


def _summary(method: str, scores: list[dict[str, float]], train_s: float, infer_s: float) -> dict:
    def col(k: str) -> np.ndarray:
        return np.array([s[k] for s in scores])

    return {
        "method": method,
        "scans": len(scores),
        "r all": float(np.mean(col("r_all"))),
        "± ": float(np.std(col("r_all"))),
        "r fg": float(np.mean(col("r_fg"))),
        "±": float(np.std(col("r_fg"))),
        "r |x̂| fg": float(np.mean(col("r_proxy_fg"))),
        "PSNR mean": float(np.mean(col("psnr_mean"))),
        "PSNR det": float(np.mean(col("psnr_det"))),
        "std/MAE fg": float(np.mean(col("std_over_mae_fg"))),
        "train s": f"{train_s:.0f}",
        "s/scan": f"{infer_s:.2f}",
    }


def _figure(a: Acquired, mean: torch.Tensor, std: torch.Tensor, title: str, name: str) -> Path:
    import matplotlib.pyplot as plt

    k = a.x.shape[0] // 2
    fig = uncertainty_figure(a.x[k], mean[k], std[k], title)
    path = RESULTS_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=1500, help="optimiser steps of the dropout model (batch 8)"
    )
    parser.add_argument("--samples", type=int, default=16, help="MC-dropout samples per scan")
    parser.add_argument("--no-ensemble", action="store_true", help=f"skip the {MEMBERS}-member ensemble row")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 training subjects, 60 steps, 2 scans"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see the module docstring)")
    args = parser.parse_args()
    train_seeds, test_seeds = TRAIN_SEEDS, TEST_SEEDS
    if args.quick:
        args.steps, args.samples = 60, 8
        train_seeds, test_seeds = TRAIN_SEEDS[:2], TEST_SEEDS[:2]
    if args.steps < MEMBERS:
        parser.error(f"--steps must be at least {MEMBERS} (each ensemble member trains steps // {MEMBERS})")
    torch.set_num_threads(args.threads)
    console = Console(width=max(150, Console().width))  # the tables are wide; 80 columns when piped
    t_start = time.perf_counter()
    loadavg_start = os.getloadavg()

    images = torch.cat(subjects(train_seeds, SHAPE))  # (16 · subjects, H, W)
    tests = []
    for vol, seed in zip(subjects(test_seeds, SHAPE), test_seeds, strict=True):
        ref = _middle(vol)  # (8, H, W)
        tests.append(acquire(ref, "random_1d", 4, [seed] * ref.shape[0], ndim=2))

    member_steps = args.steps // MEMBERS
    with Progress(console=console, transient=True) as bars:
        model, facts = _train(args.seed, args.steps, images, P, bars, f"unet_post under dropout p={P}")
        members = []
        if not args.no_ensemble:
            for i in range(MEMBERS):
                members.append(
                    _train(args.seed + 1 + i, member_steps, images, None, bars, f"ensemble member {i + 1}")
                )
    loss = f"loss {facts['first_loss']:.3f} -> {facts['last_loss']:.3f}"
    console.print(f"dropout model: {loss}, {facts['seconds']:.0f} s")

    mc_scores, ens_scores, per_scan = [], [], []
    mc_s = ens_s = 0.0
    for i, (a, seed) in enumerate(zip(tests, test_seeds, strict=True)):
        det = apply_slices(model, a.y, a.op)
        t0 = time.perf_counter()
        mean, std = sample_reconstructions(model, a.y, a.op, samples=args.samples, p=P, seed=seed)
        mc_s += time.perf_counter() - t0
        mc_scores.append(_score(a.x, mean, std, det))
        row = {"scan": f"subject {seed}", **{f"MC {k}": v for k, v in mc_scores[-1].items()}}
        if i == 0:
            title = (
                f"MC dropout (p={P}, {args.samples} samples), unet_post, brain subject {seed}, 4x random 1D"
            )
            fig_path = _figure(a, mean, std, title, "uncertainty.png")
        if members:
            nets = [m for m, _ in members]
            det = apply_slices(nets[0], a.y, a.op)  # the first member alone
            t0 = time.perf_counter()
            mean, std = ensemble_std(nets, a.y, a.op)
            ens_s += time.perf_counter() - t0
            ens_scores.append(_score(a.x, mean, std, det))
            row |= {f"ens {k}": v for k, v in ens_scores[-1].items() if k in ENS_COLUMNS.values()}
            if i == 0:
                title = f"deep ensemble ({MEMBERS} unet_post), brain subject {seed}, 4x random 1D"
                _figure(a, mean, std, title, "uncertainty_ensemble.png")
        per_scan.append(row)

    print_table(
        "Per scan: Pearson r(std, |error|) over all voxels and the foreground; PSNR (dB) of the MC mean "
        "and of the deterministic output",
        [
            {
                "scan": r["scan"],
                "MC r all": r["MC r_all"],
                "MC r fg": r["MC r_fg"],
                "MC PSNR mean": r["MC psnr_mean"],
                "PSNR det": r["MC psnr_det"],
                **{k: r[f"ens {c}"] for k, c in ENS_COLUMNS.items() if members},
            }
            for r in per_scan
        ],
        console,
    )
    rows = [
        _summary(
            f"MC dropout p={P}",
            mc_scores,
            facts["seconds"],
            mc_s / len(tests),
        )
    ]
    if members:
        rows.append(
            _summary(
                f"ensemble x{MEMBERS}",
                ens_scores,
                sum(f["seconds"] for _, f in members),
                ens_s / len(tests),
            )
        )
    print_table(
        f"Uncertainty of unet_post {MODEL[1]['features']}: brain phantoms {SHAPE[1]}x{SHAPE[2]}, "
        f"4x random 1D, 40 dB; train {len(train_seeds)} subjects x {SHAPE[0]} slices; "
        f"test {len(tests)} subjects x 8 slices (mean ± std over scans)",
        rows,
        console,
    )
    notes = [
        f"MC dropout: {args.samples} samples, {args.steps} steps under dropout, PSNR det with dropout off"
    ]
    if members:
        notes.append(f"ensemble: {member_steps} steps per member without dropout, PSNR det of member 1 alone")
    notes += [
        "fg: reference > 5% of its max; r |x̂| fg: the magnitude |mean| itself as the predictor of |error|",
        "std/MAE fg: mean std over mean |error| in the foreground",
    ]
    console.print("; ".join(notes) + ".")
    r_all = [s["r_all"] for s in mc_scores]
    passed = bool(all(r > 0 for r in r_all))
    console.print(
        f"bar: MC-dropout std and |error| correlate positively on every scan: mean r {np.mean(r_all):.3f} "
        f"(min {np.min(r_all):.3f}, foreground mean {np.mean([s['r_fg'] for s in mc_scores]):.3f}): "
        f"{'PASS' if passed else 'MISS'}"
    )
    figures = [fig_path] + ([RESULTS_DIR / "uncertainty_ensemble.png"] if members else [])
    console.print("figures: " + ", ".join(map(str, figures)))
    console.print(f"wall {time.perf_counter() - t_start:.0f} s")
    write_run(
        "uncertainty",
        {
            "protocol": {
                "shape": SHAPE,
                "model": MODEL,
                "p": P,
                "steps": args.steps,
                "samples": args.samples,
                "ensemble_members": 0 if args.no_ensemble else MEMBERS,
                "member_steps": member_steps,
                "batch": 8,
                "train_seeds": train_seeds,
                "test_seeds": test_seeds,
                "threads": args.threads,
                "quick": args.quick,
            },
            "training": {"dropout": facts, "members": [f for _, f in members]},
            "rows": rows,
            "per_scan": per_scan,
            "bar_pass": passed,
            "loadavg_start": loadavg_start,
        },
        t_start,
    )


if __name__ == "__main__":
    main()
