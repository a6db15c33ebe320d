"""Super-resolution: SRCNN (Dong et al. 2014) against bicubic interpolation, at 2x and 4x.

Protocol:

* data: brain phantoms ``brain_phantom((16, 128, 128), seed=s)``, each volume divided by its
  maximum; training subjects ``s = 0 .. n-1`` (``--subjects``, 8 by default), test subjects
  2000-2003, all 16 axial slices each (64 test slices), disjoint from training;
* acquisition: ``y = Downsample(f) x``, the mean of each ``f x f`` block (a voxel ``f`` times
  larger in-plane), noise-free, for ``f = 2`` (64² low-res) and ``f = 4`` (32²);
* baselines: ``nearest`` (``A⁺ y``, each low-res pixel replicated) and ``bicubic``
  (:func:`operators.resolution.bicubic_upsample`);
* SRCNN: the 9-5-5 network with 64/32 maps, residual on the bicubic image, one per factor,
  trained by :func:`models.srcnn.train_srcnn` (``--steps`` Adam steps, 800 by default, of 16
  random 48² crops with flips and rotations, MSE, lr 1e-3 with a 10% warm-up and cosine decay,
  seed 0);
* metrics per test slice against the reference, range 1 (the volume's range): PSNR and SSIM
  (7x7 window); the table gives mean ± std over slices and the gain over bicubic in dB.

The bar: SRCNN beats bicubic by at least 1 dB PSNR at 2x.

Run: ``python benchmarks/srcnn.py [--quick] [--steps N]``; writes ``benchmarks/results/srcnn.json``.
Torch runs on ``--threads`` threads (1 by default: on this shared 2-core machine one thread was
faster than two).
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

from benchmarks.timing import print_table, write_run  # noqa: E402
from models.srcnn import SRCNN, SRCNNConfig, train_srcnn  # noqa: E402
from operators.brain import brain_phantom  # noqa: E402
from operators.metrics import psnr, ssim  # noqa: E402
from operators.resolution import Downsample, bicubic_upsample  # noqa: E402

SHAPE = (16, 128, 128)
FACTORS = (2, 4)
TEST_SEEDS = [2000, 2001, 2002, 2003]
BATCH, PATCH, LR, LOSS = 16, 48, 1e-3, "mse"
BAR_DB = 1.0


def volumes(seeds: list[int]) -> torch.Tensor:
    """Slices ``(len(seeds) * D, H, W)`` float32, each volume divided by its maximum."""
    out = []
    for s in seeds:
        v = torch.from_numpy(np.ascontiguousarray(brain_phantom(SHAPE, s).image))  # (D, H, W)
        out.append(v / v.max())
    return torch.cat(out)  # (n * D, H, W)


def scores(images: torch.Tensor, refs: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Mean and std over slices of PSNR and SSIM (range 1, the normalised volumes' range)."""
    p = [psnr(a, r, data_range=1.0) for a, r in zip(images, refs, strict=True)]
    s = [ssim(a, r, data_range=1.0) for a, r in zip(images, refs, strict=True)]
    return {"psnr": (float(np.mean(p)), float(np.std(p))), "ssim": (float(np.mean(s)), float(np.std(s)))}


@torch.no_grad()
def apply(model: SRCNN, y: torch.Tensor, op: Downsample, chunk: int = 16) -> torch.Tensor:
    """``model(y, op)`` on ``chunk`` slices at a time."""
    return torch.cat([model(y[i : i + chunk], op) for i in range(0, y.shape[0], chunk)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per factor (default 800)")
    parser.add_argument("--subjects", type=int, default=None, help="training subjects (default 8)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 100 steps, 2 training and 2 test subjects"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    steps = args.steps or (100 if args.quick else 800)
    n_train = args.subjects or (2 if args.quick else 8)
    test_seeds = TEST_SEEDS[:2] if args.quick else TEST_SEEDS
    torch.set_num_threads(args.threads)
    console = Console(width=120)  # the table's width, also when the output is not a terminal
    t_start = time.perf_counter()
    loadavg_start = os.getloadavg()

    t0 = time.perf_counter()
    train, test = volumes(list(range(n_train))), volumes(test_seeds)
    console.print(
        f"phantoms: {train.shape[0]} training slices, {test.shape[0]} test slices "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    rows, results, curves = [], {}, {}
    for f in FACTORS:
        op = Downsample(SHAPE[1:], f)
        y = op(test)  # (n, H/f, W/f)
        config = SRCNNConfig(factor=f)
        model, history = train_srcnn(
            train, config, steps=steps, batch_size=BATCH, lr=LR, seed=args.seed, patch=PATCH, loss=LOSS
        )
        first, last = history.summary()
        t_eval = time.perf_counter()
        images = {
            "nearest (A⁺y)": op.pseudo_inverse(y),
            "bicubic": bicubic_upsample(y, f),
            "SRCNN": apply(model, y, op),
        }
        eval_s = time.perf_counter() - t_eval
        res = {name: scores(img, test) for name, img in images.items()}
        results[f] = res
        curves[f] = history.losses
        base = res["bicubic"]["psnr"][0]
        for name, r in res.items():
            trained = name == "SRCNN"
            rows.append(
                {
                    "factor": f"{f}x",
                    "method": name,
                    "PSNR dB": f"{r['psnr'][0]:.2f} ± {r['psnr'][1]:.2f}",
                    "SSIM": f"{r['ssim'][0]:.4f} ± {r['ssim'][1]:.4f}",
                    "gain dB": f"{r['psnr'][0] - base:+.2f}",
                    "train s": f"{history.seconds:.0f}" if trained else "-",
                    "train MSE (first -> last 10%)": f"{first:.2e} -> {last:.2e}" if trained else "",
                }
            )
        console.print(
            f"{f}x: SRCNN {res['SRCNN']['psnr'][0]:.2f} dB vs bicubic {base:.2f} dB "
            f"({history.seconds:.0f} s training, {steps} steps; {eval_s:.1f} s to apply the three methods)"
        )

    wall = time.perf_counter() - t_start
    print_table(
        f"Super-resolution, brain phantoms 128², area down-sampling, noise-free; SRCNN 9-5-5 (64/32), "
        f"{steps} steps of {BATCH} x {PATCH}² crops from {n_train} subjects; "
        f"test {len(test_seeds)} subjects x {SHAPE[0]} slices (mean ± std over slices)",
        rows,
        console,
    )
    gain = results[2]["SRCNN"]["psnr"][0] - results[2]["bicubic"]["psnr"][0]
    passed = gain >= BAR_DB
    console.print(
        f"bar: SRCNN - bicubic at 2x = {gain:+.2f} dB (>= {BAR_DB} dB): {'PASS' if passed else 'MISS'}"
    )
    console.print(f"wall {wall:.0f} s")
    k = max(1, steps // 10)
    write_run(
        "srcnn",
        {
            "protocol": {
                "shape": SHAPE,
                "factors": FACTORS,
                "train_subjects": n_train,
                "test_seeds": test_seeds,
                "steps": steps,
                "batch": BATCH,
                "patch": PATCH,
                "lr": LR,
                "loss": LOSS,
                "noise": None,
                "config": {f"{f}x": SRCNN(SRCNNConfig(factor=f)).config_dict() for f in FACTORS},
                "seed": args.seed,
                "threads": args.threads,
                "quick": args.quick,
            },
            "rows": rows,
            "results": {f"{f}x": r for f, r in results.items()},
            # the loss curve, averaged over tenths of the run
            "loss_curve": {
                f"{f}x": [float(np.mean(c[i : i + k])) for i in range(0, len(c), k)]
                for f, c in curves.items()
            },
            "gain_2x_db": gain,
            "bar_pass": passed,
            "loadavg_start": loadavg_start,
        },
        t_start,
    )


if __name__ == "__main__":
    main()
