"""From model name to constructor, and persistence as (architecture spec, safetensors weights).

A saved model is a directory with two files:

* ``model.json``: ``{"name": <registry name>, "kwargs": {...}}``, the architecture;
* ``weights.safetensors``: the state dict.

Loading rebuilds the module from the spec and loads the weights, so no pickle is
ever read and a saved model keeps loading after the code is refactored, as long as
its registry name and keyword arguments still exist.

Example:
    >>> net = build_model("unrolled_gd", {"n_iter": 2, "features": 8})
    >>> type(net).__name__
    'GradientDescentNet'
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from models import analysis, gan, srcnn
from models.modl import MoDL, MoDLConfig
from models.neumann import NeumannConfig, NeumannNet
from models.post import UNetPost, UNetPostConfig
from models.unrolled import GDNetConfig, GradientDescentNet
from models.varnet import VarNet, VarNetConfig

__all__ = [
    "GENERATIVE_MODELS",
    "MODELS",
    "RECON_MODALITIES",
    "recon_models_for",
    "ANALYSIS_MODELS",
    "SEGMENTATION_MODELS",
    "build_model",
    "model_module",
    "save_model",
    "load_model",
    "ModelError",
]


class ModelError(ValueError):
    """An unknown model name, bad keyword arguments, or an unreadable saved model."""


def _gd_net(**kwargs: Any) -> nn.Module:
    return GradientDescentNet(GDNetConfig(**kwargs))


def _neumann(**kwargs: Any) -> nn.Module:
    return NeumannNet(NeumannConfig(**kwargs))


def _modl(**kwargs: Any) -> nn.Module:
    return MoDL(MoDLConfig(**kwargs))


def _unet_post(**kwargs: Any) -> nn.Module:
    return UNetPost(UNetPostConfig(**kwargs))


def _varnet(**kwargs: Any) -> nn.Module:
    return VarNet(VarNetConfig(**kwargs))


#: Registry name -> constructor taking keyword arguments (the fields of the model's config dataclass).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "unrolled_gd": _gd_net,
    "neumann": _neumann,
    "modl": _modl,
    "unet_post": _unet_post,
    "varnet": _varnet,
    # analysis networks: (B, C, D, H, W) volumes in, class logits out (models.analysis)
    "unet3d": lambda **kw: analysis.build_unet(spatial_dims=3, **kw),
    "unet2d": analysis.build_unet2d,
    "vnet": analysis.build_vnet,
    "densenet3d": analysis.build_densenet,
    "resnet3d": analysis.build_resnet,
    "unet_classifier": analysis.UNetClassifier,
    "seg_classifier": analysis.SegmentationClassifier,
    # a generative image prior: z (B, latent) -> image (B, S, S) (models.gan; recon method gan_prior:<stage>)
    "dcgan": lambda **kw: gan.DCGANGenerator(gan.DCGANConfig(**kw)),
    # super-resolution: model(y, op) with y a low-resolution image and op an operators.resolution.Downsample
    "srcnn": lambda **kw: srcnn.SRCNN(srcnn.SRCNNConfig(**kw)),
}

#: Registry names of the analysis networks (they take volumes, not ``(y, op)``).
ANALYSIS_MODELS = frozenset(
    {"unet3d", "unet2d", "vnet", "densenet3d", "resnet3d", "unet_classifier", "seg_classifier", "dcgan"}
)
#: Of those, the ones that segment (per-voxel class logits); the others classify (one logit per volume).
SEGMENTATION_MODELS = frozenset({"unet3d", "unet2d", "vnet"})
#: Of those, the generative ones (task generate).
GENERATIVE_MODELS = frozenset({"dcgan"})

#: The modalities a reconstruction network applies to, where it does not take every operator (the
#: others reach the physics only through ``op.adjoint``, ``op.normal`` and ``op.pseudo_inverse``):
#: SRCNN up-samples low-resolution images (an ``operators.resolution.Downsample``), VarNet needs
#: Cartesian k-space.
RECON_MODALITIES: dict[str, tuple[str, ...]] = {"srcnn": ("lowres",), "varnet": ("mri",)}


def recon_models_for(modality: str) -> list[str]:
    """The reconstruction networks (not the analysis ones) that apply to ``modality``."""
    recon = (n for n in MODELS if n not in ANALYSIS_MODELS)
    return sorted(n for n in recon if modality in RECON_MODALITIES.get(n, (modality,)))


#: Registry name -> the module that defines the network (its code is what training depends on).
_MODULES: dict[str, str] = {
    "unrolled_gd": GradientDescentNet.__module__,
    "neumann": NeumannNet.__module__,
    "modl": MoDL.__module__,
    "unet_post": UNetPost.__module__,
    "varnet": VarNet.__module__,
    **{name: analysis.__name__ for name in ANALYSIS_MODELS - {"dcgan"}},
    "dcgan": gan.__name__,
    "srcnn": srcnn.__name__,
}

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"


def build_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs``; errors name the valid choices."""
    if name not in MODELS:
        raise ModelError(f"unknown model '{name}'; expected one of {sorted(MODELS)}")
    try:
        return MODELS[name](**(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model '{name}': bad keyword arguments {kwargs}: {exc}") from exc


def model_module(name: str) -> str:
    """The module that defines the registered model ``name`` (e.g. ``models.neumann``)."""
    if name not in _MODULES:
        raise ModelError(f"unknown model '{name}'; expected one of {sorted(MODELS)}")
    return _MODULES[name]


def save_model(module: nn.Module, name: str, kwargs: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model.json`` and ``weights.safetensors`` for ``module`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(json.dumps({"name": name, "kwargs": kwargs}, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    return directory


def load_model(directory: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from ``directory``; returns ``(module in eval mode, spec dict)``."""
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise ModelError(
                f"saved model at {directory} is missing {path.name}; expected {SPEC_FILE} and {WEIGHTS_FILE}"
            )
    spec = json.loads(spec_path.read_text())
    module = build_model(spec["name"], spec.get("kwargs", {}))
    module.load_state_dict(load_file(str(weights_path), device=device))
    return module.to(device).eval(), spec
