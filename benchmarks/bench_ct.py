"""CT operator speed side by side with scikit-image, in one run.

Workload: a batch of 32 slices of 256² (float32), 180 parallel-beam angles over 180°.

* forward: ``ParallelBeam.forward`` on the batch vs ``skimage.transform.radon`` looped over slices;
* adjoint: ``ParallelBeam.adjoint`` vs ``iradon(filter_name=None)`` (a pure back-projection);
* FBP: ``fbp(ramp)`` vs ``iradon(filter_name="ramp")``;
* build: the one-off system-matrix build per geometry (A and Aᵀ; cached afterwards).

Fan beam (360 views over 360°, 384 bins, flat detector) is timed too, without a baseline.

scikit-image is slow, so it runs on ``SKIMAGE_SLICES`` slices, 3 repeats, and its time is
scaled to 32 slices (the table says so); ours runs the full batch, 5 repeats. Times are medians.
Run: ``python benchmarks/bench_ct.py [--device cuda]``; writes ``benchmarks/results/bench_ct.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.timing import median_time, parse_device, print_table, write_json  # noqa: E402
from operators.ct import _CACHE, FanBeam, ParallelBeam, clear_matrix_cache, fbp, sparse_view_angles  # noqa: E402

BATCH, SIZE, VIEWS = 32, 256, 180
SKIMAGE_SLICES = 4


def _volume() -> np.ndarray:
    """32 slices of 256²: the Shepp-Logan phantom, scaled slice by slice, zero outside the circle."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    img = resize(shepp_logan_phantom(), (SIZE, SIZE), anti_aliasing=True).astype(np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE // 2
    img *= xx**2 + yy**2 <= (SIZE // 2) ** 2
    return np.stack([img * (0.5 + i / BATCH) for i in range(BATCH)])  # (32, 256, 256)


def run(device: str = "cpu") -> list[dict[str, Any]]:
    """Time forward, adjoint, FBP and the matrix build against scikit-image; one dict per row."""
    from skimage.transform import iradon, radon

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    vol = _volume()
    angles = sparse_view_angles(VIEWS)
    deg = np.rad2deg(angles.numpy())
    op = ParallelBeam((SIZE, SIZE), angles).to(device)
    x = torch.from_numpy(vol).to(device)  # (32, 256, 256)

    def build() -> None:
        clear_matrix_cache()
        op.forward(x[:1])  # builds A and Aᵀ (float32) for this geometry

    t_build = median_time(build, repeats=3, warmup=0, sync=sync)
    y = op.forward(x)  # (32, 180, 256)
    sino = [s.T.astype(np.float64) for s in y.cpu().numpy()[:SKIMAGE_SLICES]]  # skimage layout (256, 180)

    scale = BATCH / SKIMAGE_SLICES
    sk = {
        "forward": median_time(lambda: [radon(s, deg, circle=True) for s in vol[:SKIMAGE_SLICES]], repeats=3),
        "adjoint": median_time(lambda: [iradon(s, deg, filter_name=None) for s in sino], repeats=3),
        "fbp (ramp)": median_time(lambda: [iradon(s, deg, filter_name="ramp") for s in sino], repeats=3),
    }
    ours = {
        "forward": median_time(lambda: op.forward(x), sync=sync),
        "adjoint": median_time(lambda: op.adjoint(y), sync=sync),
        "fbp (ramp)": median_time(lambda: fbp(y, op), sync=sync),
    }
    baseline_name = {"forward": "radon", "adjoint": "iradon(filter_name=None)", "fbp (ramp)": "iradon(ramp)"}
    rows: list[dict[str, Any]] = []
    for name in ("forward", "adjoint", "fbp (ramp)"):
        rows.append(
            {
                "operation": f"parallel {name}, 32x256², 180 views",
                "baseline": f"skimage {baseline_name[name]} (timed on {SKIMAGE_SLICES} slices, x{scale:g})",
                "baseline_s": sk[name] * scale,
                "ours_s": ours[name],
                "speedup": sk[name] * scale / ours[name],
            }
        )
    nnz = sum(m.values().numel() for m in _CACHE.get(op, x.dtype, x.device))
    rows.append(
        {
            "operation": f"parallel matrix build (A and Aᵀ, once per geometry, {nnz / 1e6:.0f}M entries)",
            "baseline": "none",
            "baseline_s": None,
            "ours_s": t_build,
            "speedup": None,
        }
    )
    fan = FanBeam((SIZE, SIZE), sparse_view_angles(2 * VIEWS, arc=2 * math.pi), 384, 2.0 * SIZE, SIZE, 1.0)
    fan = fan.to(device)
    t_fan_build = median_time(lambda: fan.forward(x[:1]), repeats=1, warmup=0, sync=sync)
    yf = fan.forward(x)  # (32, 360, 384)
    for name, fn in (
        ("forward", lambda: fan.forward(x)),
        ("adjoint", lambda: fan.adjoint(yf)),
        ("fbp (ramp)", lambda: fbp(yf, fan)),
    ):
        rows.append(
            {
                "operation": f"fan {name}, 32x256², 360 views",
                "baseline": "none",
                "baseline_s": None,
                "ours_s": median_time(fn, repeats=3, sync=sync),
                "speedup": None,
            }
        )
    rows.append(
        {
            "operation": "fan matrix build (A and Aᵀ)",
            "baseline": "none",
            "baseline_s": None,
            "ours_s": t_fan_build,
            "speedup": None,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    args = parse_device(parser)
    rows = run(args.device)
    print_table(f"CT operators on {args.device} ({torch.get_num_threads()} threads)", rows)
    path = write_json("bench_ct", {"device": args.device, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
