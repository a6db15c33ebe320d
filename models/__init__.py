"""torch.nn modules and the registry from model name to constructor. Never imports ray, mlflow or zarr."""

from models.inference import reconstruct_slices
from models.registry import MODELS, ModelError, build_model, load_model, save_model
from models.unrolled import GDNetConfig, GradientDescentNet

__all__ = [
    "MODELS",
    "ModelError",
    "build_model",
    "load_model",
    "save_model",
    "GDNetConfig",
    "GradientDescentNet",
    "reconstruct_slices",
]
