"""Sample complexity: how test PSNR grows with the number of training slices, physics-aware or not.

The lecture's "limited training data" point: a network that applies the forward model at every
step (``neumann``) needs far fewer examples than a post-processing CNN (``unet_post``) that must
learn the inverse from the data alone. Both are trained on 16, 64 and 256 slices of brain
phantoms and tested on other subjects.

Protocol (the recipe and acquisition of :mod:`benchmarks.learned`):

* training sets: the 16 slices ``(16, 128, 128)`` of subject 0, of subjects 0-3, of subjects
  0-15; validation subjects 1000-1001 and test subjects 2000-2003 (their middle 8 slices);
* single-coil MRI, ``random_1d`` masks at 4x with 8% centre, 40 dB; training draws a fresh mask
  per sample and step, the test uses one fixed mask per subject;
* every model gets the same number of optimiser steps (``--steps``, batch 8) whatever the size
  of its training set, so a row differs from another only by the data it saw;
* baselines on the same test k-space: ``zero_filled``, and ``cs_tv`` with ``lam`` chosen on the
  validation subjects and run to its tolerance (``1e-4``, at most 2000 iterations).

The bar: at 16 slices, ``neumann`` beats ``unet_post``.

Run: ``python benchmarks/sample_complexity.py [--steps N] [--sizes 16 64 256] [--quick]``;
writes ``benchmarks/results/sample_complexity.json``.
"""

from __future__ import annotations

import argparse
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

from benchmarks.learned import acquire, draw_batch, fit, mean_psnr, subjects, tuned_cs_tv  # noqa: E402
from benchmarks.timing import print_table, write_json  # noqa: E402
from models.inference import apply_slices  # noqa: E402
from models.registry import build_model  # noqa: E402

SHAPE = (16, 128, 128)
MODELS = {
    "neumann": {"n_blocks": 6, "features": 32, "depth": 3},
    "unet_post": {"features": [16, 32, 64, 128]},
}
LAMS = [0.005, 0.01, 0.02]
VAL_SEEDS, TEST_SEEDS = [1000, 1001], [2000, 2001, 2002, 2003]


def _middle(volume: torch.Tensor, n: int = 8) -> torch.Tensor:
    d = volume.shape[0]
    return volume[d // 2 - n // 2 : d // 2 + n // 2]


def _fixed(volumes: list[torch.Tensor], seeds: list[int]) -> list:
    """One acquisition per subject: its middle 8 slices with one fixed 4x mask."""
    out = []
    for vol, seed in zip(volumes, seeds, strict=True):
        ref = _middle(vol)
        out.append(acquire(ref, "random_1d", 4, [seed] * ref.shape[0], ndim=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per model (batch 8)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256], help="training slices")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, sizes 16 and 32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.sizes = 10, [16, 32]
    for n in args.sizes:
        if n % SHAPE[0]:
            parser.error(f"--sizes: each must be a multiple of {SHAPE[0]} slices (whole subjects); found {n}")
    console = Console()
    t_start = time.perf_counter()

    train_volumes = subjects(list(range(max(args.sizes) // SHAPE[0])), SHAPE)
    tests = _fixed(subjects(TEST_SEEDS, SHAPE), TEST_SEEDS)
    vals = _fixed(subjects(VAL_SEEDS, SHAPE), VAL_SEEDS)
    refs = [a.x for a in tests]

    rows = []
    zf = [a.op.pseudo_inverse(a.y) for a in tests]
    m, s = mean_psnr(zf, refs)
    rows.append({"method": "zero_filled", "train slices": "-", "PSNR": m, "±": s, "train s": "-", "note": ""})
    t0 = time.perf_counter()
    tv = tuned_cs_tv(vals, tests, LAMS)
    m, s = mean_psnr(tv.images, refs)
    rows.append(
        {
            "method": "cs_tv",
            "train slices": "-",
            "PSNR": m,
            "±": s,
            "train s": "-",
            "note": f"{tv.describe()} (lam of {LAMS}), {time.perf_counter() - t0:.0f} s",
        }
    )

    results: dict[tuple[str, int], float] = {}
    with Progress(console=console, transient=True) as bars:
        for n in args.sizes:
            images = torch.cat(train_volumes[: n // SHAPE[0]])  # (n, H, W)
            for name, kwargs in MODELS.items():
                torch.manual_seed(args.seed)
                model = build_model(name, kwargs)
                rng = np.random.default_rng([args.seed, n])
                task = bars.add_task(f"{name}, {n} slices", total=args.steps)
                facts = fit(
                    model,
                    lambda images=images, rng=rng: draw_batch(images, 8, "random_1d", [4], 2, rng),
                    args.steps,
                    on_step=lambda step, loss, task=task: bars.update(task, completed=step + 1),
                )
                recons = [apply_slices(model, a.y, a.op) for a in tests]
                m, s = mean_psnr(recons, refs)
                results[(name, n)] = m
                rows.append(
                    {
                        "method": name,
                        "train slices": str(n),
                        "PSNR": m,
                        "±": s,
                        "train s": f"{facts['seconds']:.0f}",
                        "note": f"loss {facts['first_loss']:.3f} -> {facts['last_loss']:.3f}",
                    }
                )
                console.print(f"{name}, {n} slices: {m:.2f} dB ({facts['seconds']:.0f} s)")

    print_table(
        f"Sample complexity: brain phantoms 128x128, 4x random 1D, 40 dB; {args.steps} steps of 8; "
        f"test {len(TEST_SEEDS)} subjects x 8 slices",
        rows,
        console,
    )
    smallest = min(args.sizes)
    passed = results[("neumann", smallest)] > results[("unet_post", smallest)]
    console.print(
        f"bar: at {smallest} slices neumann {results[('neumann', smallest)]:.2f} dB vs unet_post "
        f"{results[('unet_post', smallest)]:.2f} dB: {'PASS' if passed else 'MISS'}"
    )
    console.print(f"wall {time.perf_counter() - t_start:.0f} s")
    path = write_json(
        "sample_complexity",
        {
            "protocol": {
                "shape": SHAPE,
                "steps": args.steps,
                "batch": 8,
                "sizes": args.sizes,
                "models": MODELS,
                "test_seeds": TEST_SEEDS,
                "val_seeds": VAL_SEEDS,
                "lams": LAMS,
                "quick": args.quick,
            },
            "rows": rows,
            "bar_pass": passed,
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
