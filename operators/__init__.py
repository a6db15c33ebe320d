"""Physics and numerics in pure PyTorch: what acts on one volume or one batch.

Never imports ray, mlflow or zarr (tests/test_layers.py checks). Modules:

- ``linear``: the LinearOperator contract (forward, adjoint, normal, composition, norm)
- ``fft``, ``mri``, ``masks``, ``noise``: Cartesian MRI, single- and multi-coil
- ``ct``: parallel- and fan-beam projectors with exact adjoints, FBP
- ``solvers``, ``regularizers``, ``recon``: classical reconstruction by name
- ``phantoms``, ``metrics``: seeded test volumes, PSNR / SSIM / NMSE
"""

__all__ = [
    "linear",
    "fft",
    "mri",
    "masks",
    "noise",
    "ct",
    "solvers",
    "regularizers",
    "recon",
    "phantoms",
    "metrics",
    "errors",
]
