"""GAN prior (Bora et al. 2017) for 4x single-coil MRI: accuracy, training-set size, an unseen lesion.

A DCGAN (:mod:`models.gan`) is trained on lesion-free brain-phantom slices; reconstruction
searches its latent space for the image that explains the k-space, optionally adapts a copy of
the generator's weights to each measurement (image-adaptive GAN, Hussein, Tirer & Giryes 2020),
and optionally ends with data consistency (the measured samples put back). Three questions:

1. Does the prior beat zero filling at 4x? (the bar: a GAN prior above ``zero_filled``; plain
   ``gan_prior`` did not, its generator's range being too far from the test images)
2. How does it depend on the number of training subjects?
3. What happens to a lesion, absent from every training image? Expected: the prior alone
   cannot represent it (erased, or replaced by normal-looking tissue); data consistency puts
   back the part of it that the measured samples carry.

Protocol:

* phantoms ``brain_phantom((16, 64, 64), seed, lesions=False)``, their middle 8 slices
  (``4..11``), each divided by its 99.5th percentile (:func:`models.gan.normalise_slices`);
* training subjects ``0..N-1`` for ``N`` in ``--sizes`` (default 4, 16, 64 volumes: 32, 128, 512
  slices), a DCGAN (latent 64, features 16) trained ``--steps`` steps of batch 32 (Adam 2e-4,
  seed 0, the same number of steps for every size);
* test subjects 5000-5003 (disjoint from training, lesion-free), slices 4, 6, 8, 10; each slice
  with its own ``random_1d`` 4x mask (8% centre, seed ``100 · subject + slice``) and complex
  noise at 40 dB (``--snr``; 0 for none);
* methods: ``zero_filled``; ``gan_prior`` (300 Adam steps on ``z``, lr 0.05, 2 restarts,
  ``λ_z = 1e-3``, the scale in closed form); ``gan_prior+adapt`` (then 50 Adam steps, lr 3e-4,
  on the kept ``z`` and a per-slice copy of the generator's weights together); ``+dc`` (the
  image with the measured samples replaced by ``y``); and ``cs_tv`` (``operators.recon``
  defaults) as a classical yardstick in the first table only. The adaptation's 50 steps and lr
  were chosen on validation subjects 6000-6003 (slices 4, 6, 8, 10; not the test subjects) with
  the 64-volume generator: its PSNR peaked after 50-75 steps (+0.85 dB over zero filling) and
  fell after it (+0.27 dB at 200: it fits the noise and aliasing next, early stopping is its
  regulariser);
* PSNR and SSIM of ``|x|`` against the reference slice (range: the slice's max - min), mean ±
  std over test slices;
* lesion test: subjects from seed 3000 on whose middle slices hold a lesion
  (``BRAIN_CLASSES`` index of ``"lesions"``) of at least 3 pixels and a contrast of at least
  0.05 (normalised), the slice with the largest; the generator of the largest training set
  (trained without lesions). Per method: the lesion contrast ``c`` (mean inside the lesion
  minus mean of the white matter within 3 pixels of it), the share kept
  ``Σ c·sign(c_ref) / Σ |c_ref|`` (1: intact, 0: erased), and the PSNR in the 9x9 box around
  the lesion (range of the whole reference slice). The same slice drawn without lesions (same
  anatomy) is the yardstick of an erased lesion. At 64x64 the phantom's lesions are small (3-5
  pixels), so these are a handful of pixels per subject: read them as a qualitative finding.

Run: ``python benchmarks/gan_prior.py [--quick] [--steps N] [--sizes 4 16 64]``; writes
``benchmarks/results/gan_prior.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
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
from scipy import ndimage  # noqa: E402

from benchmarks.timing import print_table, write_run  # noqa: E402
from models.gan import DCGANConfig, DCGANGenerator, gan_prior_reconstruct, normalise_slices, train_dcgan  # noqa: E402
from operators.brain import BRAIN_CLASSES, brain_phantom  # noqa: E402
from operators.masks import make_mask  # noqa: E402
from operators.metrics import psnr, ssim  # noqa: E402
from operators.mri import CartesianMRI  # noqa: E402
from operators.noise import kspace_noise  # noqa: E402
from operators.recon import reconstruct as classical_reconstruct  # noqa: E402

SHAPE = (16, 64, 64)
MIDDLE = slice(4, 12)  # the training slices of every volume
TEST_SLICES = [4, 6, 8, 10]
TEST_SEEDS = [5000, 5001, 5002, 5003]
LESION_FIRST_SEED = 3000
LESION_MIN_PIXELS = 3
LESION_MIN_CONTRAST = 0.05  # |lesion - white matter| in the normalised slice: visible at all
RING = 3  # white matter within this many pixels of the lesion is its surrounding
BOX = 4  # the lesion box is (2·BOX + 1)² pixels around the lesion's centre
ACCELERATION, CENTER = 4, 0.08
CONFIG = DCGANConfig(latent=64, image_size=64, features=16)
RECON = {"steps": 300, "lr": 0.05, "restarts": 2, "z_penalty": 1e-3}
ADAPT = {"adapt_steps": 50, "adapt_lr": 3e-4}  # gan_prior+adapt: RECON, then these
PRIORS = ("gan_prior", "gan_prior+dc", "gan_prior+adapt", "gan_prior+adapt+dc")
LESION = BRAIN_CLASSES.index("lesions")
WHITE_MATTER = BRAIN_CLASSES.index("white_matter")


@dataclass(frozen=True)
class Acquisition:
    """Normalised reference slices ``x`` ``(B, 64, 64)``, their operator and k-space ``y``."""

    x: torch.Tensor
    op: CartesianMRI
    y: torch.Tensor


def _volume(seed: int, lesions: bool) -> tuple[np.ndarray, np.ndarray]:
    p = brain_phantom(SHAPE, seed, lesions=lesions)
    return p.image, p.labels


def training_slices(n_volumes: int) -> torch.Tensor:
    """The middle slices of lesion-free subjects ``0..n_volumes-1``, normalised: ``(8 n, 64, 64)``."""
    vols = [torch.from_numpy(_volume(s, False)[0][MIDDLE]) for s in range(n_volumes)]
    return normalise_slices(torch.cat(vols))[0]


def acquire(x: torch.Tensor, mask_seeds: list[int], snr_db: float) -> Acquisition:
    """Measure each slice of ``x`` ``(B, H, W)`` with its own 4x mask, plus noise at ``snr_db`` (0: none)."""
    masks = torch.stack(
        [make_mask("random_1d", tuple(x.shape[1:]), ACCELERATION, CENTER, s) for s in mask_seeds]
    )
    op = CartesianMRI(masks)  # mask (B, H, W)
    y = op.forward(x.to(torch.complex64))  # (B, H, W)
    if snr_db > 0:
        y = torch.stack(
            [kspace_noise(y[i], snr_db, seed=s + 7919, mask=masks[i]) for i, s in enumerate(mask_seeds)]
        )
    return Acquisition(x, op, y)


def test_acquisition(seeds: list[int], slices: list[int], snr_db: float) -> Acquisition:
    refs, mask_seeds = [], []
    for s in seeds:
        image = _volume(s, False)[0]
        for k in slices:
            refs.append(torch.from_numpy(image[k]))
            mask_seeds.append(100 * s + k)
    return acquire(normalise_slices(torch.stack(refs))[0], mask_seeds, snr_db)


@dataclass(frozen=True)
class LesionCase:
    seed: int
    slice: int
    lesion: np.ndarray  # (H, W) bool: the largest lesion component on the slice
    ring: np.ndarray  # (H, W) bool: white matter within RING pixels of it
    box: tuple[slice, slice]
    bright: bool


def lesion_cases(count: int, max_seeds: int = 400) -> tuple[list[LesionCase], torch.Tensor, torch.Tensor]:
    """The first ``count`` subjects from seed 3000 on with a visible lesion.

    Returns the cases, their normalised slices ``(count, H, W)``, and the same slices of the same
    subjects drawn without lesions (``lesions=False``, the same anatomy), at the same scale: what
    an image that erased the lesion perfectly would look like.
    """
    cases, refs, clean = [], [], []
    for seed in range(LESION_FIRST_SEED, LESION_FIRST_SEED + max_seeds):
        image, labels = _volume(seed, True)
        best: tuple[int, int, np.ndarray] | None = None
        for k in range(MIDDLE.start, MIDDLE.stop):
            components, n = ndimage.label(labels[k] == LESION)
            for c in range(1, n + 1):
                comp = components == c
                if comp.sum() >= LESION_MIN_PIXELS and (best is None or comp.sum() > best[0]):
                    best = (int(comp.sum()), k, comp)
        if best is None:
            continue
        _, k, comp = best
        ring = ndimage.binary_dilation(comp, iterations=RING) & ~comp & (labels[k] == WHITE_MATTER)
        if ring.sum() < 3:
            continue
        cy, cx = (int(round(float(v))) for v in ndimage.center_of_mass(comp))
        h, w = comp.shape
        box = (slice(max(cy - BOX, 0), min(cy + BOX + 1, h)), slice(max(cx - BOX, 0), min(cx + BOX + 1, w)))
        scale = float(np.quantile(image[k], 0.995))
        contrast = (image[k][comp].mean() - image[k][ring].mean()) / scale
        if abs(contrast) < LESION_MIN_CONTRAST:  # partial volume hides it: not a visible lesion
            continue
        cases.append(LesionCase(seed, k, comp, ring, box, bool(contrast > 0)))
        refs.append(torch.from_numpy(image[k]))
        clean.append(torch.from_numpy(_volume(seed, False)[0][k]))
        if len(cases) == count:
            break
    refs_n, scales = normalise_slices(torch.stack(refs))
    return cases, refs_n, torch.stack(clean) / scales[:, None, None]


def _contrast(image: torch.Tensor, case: LesionCase) -> float:
    a = image.numpy()
    return float(a[case.lesion].mean() - a[case.ring].mean())


def slice_scores(images: torch.Tensor, refs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """PSNR and SSIM of ``|images|`` against each reference slice (its own range)."""
    p, s = [], []
    for x, ref in zip(images.abs().float(), refs, strict=True):
        rng = float(ref.max() - ref.min())
        p.append(psnr(x, ref, data_range=rng))
        s.append(ssim(x, ref, data_range=rng))
    return np.array(p), np.array(s)


def reconstruct(g: DCGANGenerator, acq: Acquisition, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """``{method: |x| (B, H, W)}`` for zero filling and :data:`PRIORS`, and ``{method: data residual
    (B,)}`` and seconds of the search and of the search with adaptation (the same search: seeded)."""
    x, info = gan_prior_reconstruct(g, acq.op, acq.y, seed=seed, data_consistency=True, **RECON)
    xa, info_a = gan_prior_reconstruct(g, acq.op, acq.y, seed=seed, data_consistency=True, **RECON, **ADAPT)
    images = {
        "zero_filled": acq.op.pseudo_inverse(acq.y).abs(),
        "gan_prior": info["prior"].abs(),
        "gan_prior+dc": x.abs(),
        "gan_prior+adapt": info_a["prior"].abs(),
        "gan_prior+adapt+dc": xa.abs(),
    }
    facts = {
        "residual": {"gan_prior": info["residual"].tolist(), "gan_prior+adapt": info_a["residual"].tolist()},
        "seconds": {"gan_prior": info["seconds"], "gan_prior+adapt": info_a["seconds"]},
    }
    return images, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="DCGAN training steps (batch 32) per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64], help="training volumes")
    parser.add_argument("--snr", type=float, default=40.0, help="k-space SNR in dB (0: noiseless)")
    parser.add_argument("--lesions", type=int, default=6, help="subjects in the lesion test")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (small convs: 1 is about as fast)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 150 steps, sizes 2 and 4, fewer tests"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    test_seeds, test_slices = TEST_SEEDS, TEST_SLICES
    if args.quick:
        args.steps, args.sizes, args.lesions = 150, [2, 4], 2
        test_seeds, test_slices = TEST_SEEDS[:2], TEST_SLICES[1:3]
        RECON["steps"] = 100
    torch.set_num_threads(args.threads)
    console = Console(width=150)  # the tables are wider than a default 80-column pipe
    t_start = time.perf_counter()
    loadavg_start = os.getloadavg()

    tests = test_acquisition(test_seeds, test_slices, args.snr)
    cases, lesion_refs, lesion_free = lesion_cases(args.lesions)
    lesion_acq = acquire(lesion_refs, [100 * c.seed + c.slice for c in cases], args.snr)
    console.print(
        f"test: {tests.x.shape[0]} slices of subjects {test_seeds}; lesion test: "
        f"{[(c.seed, c.slice, int(c.lesion.sum())) for c in cases]} (seed, slice, pixels)"
    )

    zf_psnr, zf_ssim = slice_scores(tests.op.pseudo_inverse(tests.y), tests.x)
    tv = classical_reconstruct("cs_tv", tests.y, tests.op)  # a classical yardstick, its defaults
    tv_psnr, tv_ssim = slice_scores(tv.image, tests.x)
    norm = torch.linalg.vector_norm
    tv_res = norm(tests.op.forward(tv.image) - tests.y, dim=(-2, -1)) / norm(tests.y, dim=(-2, -1))  # (B,)
    sweep_rows: list[dict] = []
    per_size: dict[int, dict] = {}
    generator: DCGANGenerator | None = None
    with Progress(console=console, transient=True) as bars:
        for n in sorted(args.sizes):
            images = training_slices(n)
            task = bars.add_task(f"DCGAN, {n} volumes ({images.shape[0]} slices)", total=args.steps)
            g, _, history = train_dcgan(
                images,
                CONFIG,
                steps=args.steps,
                batch_size=32,
                lr=2e-4,
                seed=args.seed,
                on_step=lambda step, entry, task=task: bars.update(task, completed=step + 1),
            )
            recon, facts = reconstruct(g, tests, args.seed)
            scores = {m: slice_scores(recon[m], tests.x) for m in PRIORS}
            k = max(1, args.steps // 10)
            per_size[n] = {
                "slices": int(images.shape[0]),
                "train_s": history["seconds"],
                "recon_s": facts["seconds"],
                "psnr": {m: v[0].tolist() for m, v in scores.items()},
                "ssim": {m: v[1].tolist() for m, v in scores.items()},
                "residual": facts["residual"],
                "loss_d_last": float(np.mean(history["loss_d"][-k:])),
                "loss_g_last": float(np.mean(history["loss_g"][-k:])),
                "d_real_last": float(np.mean(history["d_real"][-k:])),
                "d_fake_last": float(np.mean(history["d_fake"][-k:])),
            }
            sweep_rows.append(
                {
                    "train volumes": str(n),
                    "slices": str(images.shape[0]),
                    **{m: f"{scores[m][0].mean():.2f} ± {scores[m][0].std():.2f}" for m in PRIORS},
                    "D(real)/D(fake)": f"{per_size[n]['d_real_last']:.2f}/{per_size[n]['d_fake_last']:.2f}",
                    "train s": f"{history['seconds']:.0f}",
                    "recon s": "/".join(f"{v:.0f}" for v in facts["seconds"].values()),
                }
            )
            console.print(
                f"{n} volumes: "
                + ", ".join(f"{m} {scores[m][0].mean():.2f} dB" for m in PRIORS)
                + f" (train {history['seconds']:.0f} s)"
            )
            generator = g  # the largest training set's, sizes ascending
    assert generator is not None
    largest = max(args.sizes)

    # 1. Methods at the largest training set.
    best = per_size[largest]

    def paired(p: np.ndarray) -> dict[str, str]:
        """The PSNR gain over zero filling slice by slice: mean ± std, and on how many slices."""
        d = p - zf_psnr
        return {"Δ zero_filled": f"{d.mean():+.2f} ± {d.std():.2f}", "better on": f"{(d > 0).sum()}/{d.size}"}

    method_rows = [
        {"method": "zero_filled", "PSNR": float(zf_psnr.mean()), "±": float(zf_psnr.std()),
         "SSIM": float(zf_ssim.mean()), "Δ zero_filled": "-", "better on": "-",
         "data residual": "0 (A Aᴴy = y)"},
    ]  # fmt: skip
    for m in PRIORS:
        p, s = np.array(best["psnr"][m]), np.array(best["ssim"][m])
        res = best["residual"].get(m)  # of the prior's image; data consistency leaves only the noise
        method_rows.append(
            {
                "method": m,
                "PSNR": float(p.mean()),
                "±": float(p.std()),
                "SSIM": float(s.mean()),
                **paired(p),
                "data residual": f"{np.mean(res):.3f}" if res is not None else "noise only",
            }
        )
    method_rows.append(
        {"method": "cs_tv (yardstick)", "PSNR": float(tv_psnr.mean()), "±": float(tv_psnr.std()),
         "SSIM": float(tv_ssim.mean()), **paired(tv_psnr), "data residual": f"{float(tv_res.mean()):.3f}"}
    )  # fmt: skip
    snr = f"{args.snr:g} dB" if args.snr > 0 else "noiseless"
    print_table(
        f"GAN prior vs zero filling: 64x64 brain phantoms, 4x random 1D, {snr}; DCGAN on {largest} "
        f"volumes ({best['slices']} slices), {args.steps} steps; test {tests.x.shape[0]} slices",
        method_rows,
        console,
    )
    zf_row = {"train volumes": "zero_filled", "slices": "-",
              **{m: f"{zf_psnr.mean():.2f} ± {zf_psnr.std():.2f}" if m == PRIORS[0] else "-" for m in PRIORS},
              "D(real)/D(fake)": "-", "train s": "-", "recon s": "-"}  # fmt: skip
    print_table(
        "GAN prior PSNR (dB, mean ± std over test slices) against the training-set size; recon s: "
        "search / search + adaptation",
        [zf_row, *sweep_rows],
        console,
    )

    # 3. Lesions.
    lesion_recon, _ = reconstruct(generator, lesion_acq, args.seed)
    images = {"reference": lesion_acq.x, "reference without lesion": lesion_free, **lesion_recon}
    contrast = {m: [_contrast(v[i], c) for i, c in enumerate(cases)] for m, v in images.items()}
    box_psnr: dict[str, list[float]] = {}
    for m, v in images.items():
        if m == "reference":
            continue
        box_psnr[m] = [
            psnr(
                v[i][c.box],
                lesion_acq.x[i][c.box],
                data_range=float(lesion_acq.x[i].max() - lesion_acq.x[i].min()),
            )
            for i, c in enumerate(cases)
        ]
    lesion_rows = []
    ref_c = np.array(contrast["reference"])
    for m, values in contrast.items():
        c = np.array(values)
        lesion_rows.append(
            {
                "method": m,
                "|contrast|": float(np.abs(c).mean()),
                # pooled: the contrast along the reference's sign, over the reference's magnitude
                "kept": float(np.sum(c * np.sign(ref_c)) / np.sum(np.abs(ref_c))),
                "min c/c_ref": float((c / ref_c).min()),
                "max c/c_ref": float((c / ref_c).max()),
                "box PSNR": f"{np.mean(box_psnr[m]):.2f}" if m in box_psnr else "-",
                "±": f"{np.std(box_psnr[m]):.2f}" if m in box_psnr else "-",
            }
        )
    print_table(
        f"Lesions never seen in training: {len(cases)} subjects, lesion minus surrounding white matter "
        f"(kept: Σ c·sign(c_ref) / Σ |c_ref|, 1 = intact, 0 = erased); {2 * BOX + 1}² box PSNR",
        lesion_rows,
        console,
    )
    case_rows = [
        {
            "seed": str(c.seed),
            "slice": str(c.slice),
            "pixels": str(int(c.lesion.sum())),
            "kind": "bright" if c.bright else "dark",
            **{m: contrast[m][i] for m in contrast},
        }
        for i, c in enumerate(cases)
    ]
    print_table("Lesion contrast per subject", case_rows, console)

    means = {m: float(np.mean(best["psnr"][m])) for m in PRIORS}
    beats = {m: means[m] > zf_psnr.mean() for m in PRIORS}
    console.print(
        f"bar (a GAN prior above zero_filled {zf_psnr.mean():.2f} dB at 4x): "
        + "; ".join(f"{m} {means[m]:.2f} dB {'PASS' if beats[m] else 'MISS'}" for m in PRIORS)
    )
    console.print(f"wall {time.perf_counter() - t_start:.0f} s")
    write_run(
        "gan_prior",
        {
            "protocol": {
                "shape": SHAPE,
                "train_slices": [MIDDLE.start, MIDDLE.stop],
                "config": CONFIG.__dict__,
                "steps": args.steps,
                "batch": 32,
                "lr": 2e-4,
                "sizes": args.sizes,
                "test_seeds": test_seeds,
                "test_slices": test_slices,
                "acceleration": ACCELERATION,
                "center_fraction": CENTER,
                "snr_db": args.snr,
                "recon": RECON,
                "adapt": ADAPT,
                "threads": args.threads,
                "quick": args.quick,
            },
            "zero_filled": {"psnr": zf_psnr.tolist(), "ssim": zf_ssim.tolist()},
            "cs_tv": {"psnr": tv_psnr.tolist(), "ssim": tv_ssim.tolist()},
            "per_size": per_size,
            "lesions": {
                "cases": [
                    {"seed": c.seed, "slice": c.slice, "pixels": int(c.lesion.sum()), "bright": c.bright}
                    for c in cases
                ],
                "contrast": contrast,
                "box_psnr": box_psnr,
            },
            "rows": {"methods": method_rows, "sizes": sweep_rows, "lesions": lesion_rows},
            "bar_pass": beats,
            "loadavg_start": loadavg_start,
        },
        t_start,
    )


if __name__ == "__main__":
    main()
