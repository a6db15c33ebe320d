"""Scores of analysis models: Dice and the 95th-percentile Hausdorff distance per class, ROC and AUC.

* :func:`dice_per_class`: ``2 |P ∩ R| / (|P| + |R|)`` for each class 1..K-1 of an integer label
  map; NaN for a class absent from both (it neither helps nor hurts a mean: means skip NaN).
* :func:`hd95_per_class`: MONAI's 95th-percentile symmetric surface distance, in millimetres
  with the voxel spacing; NaN when the class is absent from either volume (undefined), and the
  reason is in the count of NaN, not a fake large number.
* :func:`roc` and :func:`auc`: scikit-learn's ROC curve and area under it, with a clear error
  when the labels hold one class only (AUC is then undefined).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["dice_per_class", "hd95_per_class", "roc", "auc", "nanmean"]


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    """Dice of classes ``1 .. n_classes - 1`` between two label maps of the same shape."""
    if pred.shape != ref.shape:
        raise ValueError(f"dice: prediction {pred.shape} and reference {ref.shape} differ in shape")
    out = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        total = int(p.sum()) + int(r.sum())
        out.append(float("nan") if total == 0 else 2.0 * float((p & r).sum()) / total)
    return out


def hd95_per_class(
    pred: np.ndarray, ref: np.ndarray, n_classes: int, spacing: Sequence[float] | None = None
) -> list[float]:
    """The 95th-percentile Hausdorff distance (mm) of classes ``1 .. n_classes - 1``; NaN if absent."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    if pred.shape != ref.shape:
        raise ValueError(f"hd95: prediction {pred.shape} and reference {ref.shape} differ in shape")
    out = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        if not p.any() or not r.any():
            out.append(float("nan"))
            continue
        value = compute_hausdorff_distance(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(r)[None, None],
            percentile=95,
            spacing=list(spacing) if spacing is not None else None,
        )
        out.append(float(value.reshape(-1)[0]))
    return out


def _two_classes(labels: np.ndarray) -> None:
    present = sorted({int(v) for v in labels})
    if present != [0, 1]:
        raise ValueError(
            f"AUC needs scans of both classes; the labels hold only {present} ({len(labels)} scans): "
            "add scans, or classify a split that has positives and negatives"
        )


def roc(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(false-positive rate, true-positive rate)`` at every threshold."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, int)
    _two_classes(y)
    fpr, tpr, _ = roc_curve(y, np.asarray(scores, float))
    return fpr, tpr


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The area under the ROC curve (the probability a positive scores above a negative)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, int)
    _two_classes(y)
    return float(roc_auc_score(y, np.asarray(scores, float)))


def nanmean(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there are none), without numpy's empty-slice warning."""
    finite = [float(v) for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
