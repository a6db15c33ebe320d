"""Elastic augmentation on a small data set: does it raise test Dice when only 8 volumes train?

The lecture's claim for small medical data sets (Ronneberger et al. 2015, Çiçek et al. 2016):
random elastic deformations teach a segmentation network the variability of anatomy that a
handful of training volumes cannot show. Measured with the segment pipeline's own pieces
(the ``unet3d`` of :mod:`models.analysis`, :class:`pipelines.train_task.VolumeAugmenter`,
:func:`~pipelines.train_task.random_patch`, sliding-window
:func:`~pipelines.train_task.segment_volume`, :func:`pipelines.scores.dice_per_class`), in
process (no Ray: the same loop a single worker runs), so six trainings fit in minutes.

Protocol:

* brain phantoms ``(32, 96, 96)``, classes as ``pipelines/specs/segment.yaml`` (seven tissues);
  training subjects 0-7, test subjects 2000-2005;
* ``unet3d`` (channels 16-32-64-128), DiceCE loss, AdamW with one-cycle at 2e-3, batch 2 of
  random 32 x 64 x 64 patches, ``--steps`` steps (default 2,000: with fewer the network underfits
  8 volumes, and a regulariser has nothing to remove);
* two arms that differ only in augmentation: flips only, and flips plus MONAI's
  ``Rand3DElasticd`` with probability 0.5 (sigma 5-7 voxels, magnitude ``--magnitude``, default
  300-600: a mean displacement of 3.6 voxels on a 32 x 64 x 64 grid; MONAI's 50-150 moves voxels
  by 0.8 on average);
* each arm trained with seeds 0, 1 and 2 (initial weights, patches and augmentations).

Reported: mean test Dice over the seven classes per arm and seed, the mean and spread (std)
over seeds, the paired difference per seed, and the Dice on the training volumes themselves (the
gap to the test Dice is the overfitting augmentation can remove). The bar: elastic beats none.

Run: ``python benchmarks/augmentation.py [--steps N] [--magnitude LO HI] [--quick]`` (about 26
minutes on 2 cores);
writes ``benchmarks/results/augmentation.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if p and Path(p).resolve() != Path(__file__).resolve().parent
]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from benchmarks.timing import print_table, write_run  # noqa: E402
from models.registry import build_model  # noqa: E402
from operators.brain import BRAIN_CLASSES, brain_phantom  # noqa: E402
from pipelines.scores import dice_per_class, nanmean  # noqa: E402
from pipelines.spec import VolumeAugment  # noqa: E402
from pipelines.train_task import VolumeAugmenter, random_patch, segment_volume  # noqa: E402
from pipelines.volumes import class_map  # noqa: E402

SHAPE = (32, 96, 96)
PATCH = (32, 64, 64)
CLASSES = {
    "scalp": ["scalp"], "skull": ["skull"], "csf": ["csf"], "grey_matter": ["grey_matter"],
    "white_matter": ["white_matter", "vessels", "lesions"], "ventricles": ["ventricles"],
    "deep_grey": ["deep_grey"],
}  # fmt: skip


def arms(magnitude: tuple[float, float]) -> dict[str, VolumeAugment]:
    """The two arms: flips only, and flips plus elastic deformations of the given magnitude range."""
    return {
        "flips only": VolumeAugment(flip=True, elastic=0.0),
        "flips + elastic": VolumeAugment(flip=True, elastic=0.5, elastic_magnitude=magnitude),
    }


def volumes(seeds: list[int], lut: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image (1, D, H, W) scaled like pipelines.volumes.read_input, classes (D, H, W))`` per subject."""
    out = []
    for s in seeds:
        p = brain_phantom(SHAPE, seed=s)
        out.append(((p.image / np.percentile(p.image, 99.5)).astype(np.float32)[None], lut[p.labels]))
    return out


def train(
    data: list[tuple[np.ndarray, np.ndarray]], augment: VolumeAugment, seed: int, steps: int, n_classes: int
) -> torch.nn.Module:
    """The train_task worker's segmentation loop, in process."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    net = build_model("unet3d", {"out_channels": n_classes, "channels": [16, 32, 64, 128]})
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    augmenter = VolumeAugmenter(augment)
    rng = np.random.default_rng([seed, 1])
    net.train()
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(2):
            x, y = random_patch(*data[int(rng.integers(len(data)))], PATCH, rng)
            x, y = augmenter(x, y, int(rng.integers(2**31)))
            xs.append(x)
            ys.append(y)
        loss = loss_fn(net(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(ys))[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps per training")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--magnitude", type=float, nargs=2, default=[300.0, 600.0], help="Rand3DElastic magnitude range"
    )
    parser.add_argument("--quick", action="store_true", help="60 steps, one seed: checks the script runs")
    args = parser.parse_args()
    ARMS = arms(tuple(args.magnitude))  # noqa: N806
    steps, seeds = (60, [0]) if args.quick else (args.steps, args.seeds)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    console = Console()
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    names, lut = class_map(CLASSES, list(BRAIN_CLASSES))
    train_set = volumes(list(range(8)), lut)
    test_set = volumes([2000 + i for i in range(6)], lut)
    scores: dict[str, dict[int, float]] = {arm: {} for arm in ARMS}
    train_scores: dict[str, dict[int, float]] = {arm: {} for arm in ARMS}  # the overfitting it fights
    per_class: dict[str, dict[int, list[float]]] = {arm: {} for arm in ARMS}
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("training", total=len(ARMS) * len(seeds))
        for seed in seeds:
            for arm, augment in ARMS.items():
                t0 = time.perf_counter()
                net = train(train_set, augment, seed, steps, len(names))
                seconds[arm].append(time.perf_counter() - t0)
                dice = np.array(
                    [dice_per_class(segment_volume(net, x, PATCH), y, len(names)) for x, y in test_set]
                )
                per_class[arm][seed] = np.nanmean(dice, axis=0).tolist()
                scores[arm][seed] = nanmean(np.nanmean(dice, axis=1).tolist())
                seen = [dice_per_class(segment_volume(net, x, PATCH), y, len(names)) for x, y in train_set]
                train_scores[arm][seed] = nanmean(np.nanmean(np.array(seen), axis=1).tolist())
                progress.advance(bar)
    rows = []
    for arm in ARMS:
        values = [scores[arm][s] for s in seeds]
        rows.append(
            {
                "augmentation": arm,
                **{f"seed {s}": f"{scores[arm][s]:.4f}" for s in seeds},
                "mean ± std": f"{np.mean(values):.4f} ± {np.std(values):.4f}",
                "train-set Dice": f"{np.mean([train_scores[arm][s] for s in seeds]):.4f}",
                "train s (median)": f"{np.median(seconds[arm]):.0f}",
            }
        )
    diffs = [scores["flips + elastic"][s] - scores["flips only"][s] for s in seeds]
    rows.append(
        {
            "augmentation": "elastic − none",
            **{f"seed {s}": f"{d:+.4f}" for s, d in zip(seeds, diffs, strict=True)},
            "mean ± std": f"{np.mean(diffs):+.4f} ± {np.std(diffs):.4f}",
            "train-set Dice": "",
            "train s (median)": "",
        }
    )
    title = f"Test Dice (mean of 7 classes, 6 subjects), 8 training volumes, {steps} steps"
    print_table(f"{title}, elastic magnitude {args.magnitude}", rows, console)
    class_rows = [
        {
            "augmentation": arm,
            **{n: f"{np.mean([per_class[arm][s][c] for s in seeds]):.3f}" for c, n in enumerate(names[1:])},
        }
        for arm in ARMS
    ]
    print_table("Per-class test Dice, mean over seeds", class_rows, console)
    wins = sum(d > 0 for d in diffs)
    console.print(f"elastic beats none on {wins} of {len(seeds)} seeds; mean gain {np.mean(diffs):+.4f} Dice")
    write_run(
        "augmentation",
        {
            "steps": steps,
            "seeds": seeds,
            "scores": {arm: {str(s): v for s, v in d.items()} for arm, d in scores.items()},
            "train_scores": {arm: {str(s): v for s, v in d.items()} for arm, d in train_scores.items()},
            "magnitude": list(args.magnitude),
            "per_class": {arm: {str(s): v for s, v in d.items()} for arm, d in per_class.items()},
            "classes": names,
            "train_seconds": seconds,
            "loadavg_start": load_start,
        },
        t_start,
    )


if __name__ == "__main__":
    main()
