"""A folder of NIfTI volumes and a manifest, to try ``pipelines/specs/nifti_folder.yaml`` without real data.

Writes ``n`` seeded brain phantoms (:func:`operators.brain.brain_phantom`) as ``sub-XXX_T1w.nii.gz``
with label volumes ``sub-XXX_dseg.nii.gz`` (BIDS-like names), in scanner orientation LPS with
anisotropic voxels, so that ingest has something to reorient, and a ``manifest.csv`` naming a split
and the labels of each. Usage::

    python -m pipelines.sources.demo runs/nifti_demo            # 12 volumes of 24x96x96
    python -m pipelines.sources.demo runs/nifti_demo --n 6 --shape 8 32 32
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

__all__ = ["write_demo_folder", "LPS_AFFINE"]

#: Voxel (i, j, k) -> scanner mm: i runs right-to-left (L), j anterior-to-posterior (P), k up (S).
LPS_AFFINE = np.diag([-0.9, -0.9, 1.2, 1.0])


def write_demo_folder(
    folder: str | Path, n: int = 12, shape: tuple[int, int, int] = (24, 96, 96), seed: int = 0
) -> Path:
    """Write ``n`` phantoms of ``shape`` (D, H, W) and ``manifest.csv`` into ``folder``; returns its path."""
    import nibabel as nib

    from operators.brain import brain_phantom

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if n < 3:
        raise ValueError(f"write_demo_folder: n must be >= 3 (a scan per split); found {n}")
    held = max(1, n // 6)
    splits = ["train"] * (n - 2 * held) + ["val"] * held + ["test"] * held
    rows = []
    for i in range(n):
        phantom = brain_phantom(shape, seed=seed + i)
        # (D, H, W) = (k, j, i) in the file: store as (i, j, k), flipped to LPS.
        image = np.ascontiguousarray(phantom.image.transpose(2, 1, 0)[::-1, ::-1, :])
        labels = np.ascontiguousarray(phantom.labels.transpose(2, 1, 0)[::-1, ::-1, :]).astype(np.int16)
        name = f"sub-{i:03d}"
        nib.save(nib.Nifti1Image(image.astype(np.float32), LPS_AFFINE), folder / f"{name}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(labels, LPS_AFFINE), folder / f"{name}_dseg.nii.gz")
        rows.append(
            {
                "path": f"{name}_T1w.nii.gz",
                "scan_id": name,
                "split": splits[i],
                "labels": f"{name}_dseg.nii.gz",
                "modality": "mri",
            }
        )
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main() -> None:  # pragma: no cover - a command-line wrapper
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(24, 96, 96))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_demo_folder(args.folder, args.n, tuple(args.shape), args.seed))


if __name__ == "__main__":  # pragma: no cover
    main()
