"""Physics and numerics in pure PyTorch: what acts on one volume or one batch.

Never imports ray, mlflow or zarr (tests/test_layers.py checks). Modules:

- ``linear``: the LinearOperator contract (forward, adjoint, normal, composition, norm)
- ``fft``, ``mri``, ``masks``, ``noise``: Cartesian MRI, single- and multi-coil
- ``coils``: coil sensitivity maps from a fully sampled k-space centre (ESPIRiT)
- ``ct``: parallel- and fan-beam projectors with exact adjoints, FBP
- ``solvers``, ``regularizers``, ``recon``: classical reconstruction by name
- ``phantoms``, ``brain``, ``metrics``: seeded test volumes (random ellipsoids, brain-like heads),
  PSNR / SSIM / NMSE
- ``stability``: the worst-case perturbation audit of any reconstruction map (Antun et al.)
"""

__all__ = [
    "linear",
    "fft",
    "mri",
    "coils",
    "masks",
    "noise",
    "ct",
    "solvers",
    "regularizers",
    "recon",
    "phantoms",
    "brain",
    "metrics",
    "stability",
    "errors",
]
