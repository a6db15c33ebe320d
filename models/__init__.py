"""torch.nn modules and the registry from model name to constructor. Never imports ray, mlflow or zarr."""

from models.inference import reconstruct_slices
from models.modl import MoDL, MoDLConfig
from models.neumann import NeumannConfig, NeumannNet
from models.post import UNetPost, UNetPostConfig
from models.registry import MODELS, ModelError, build_model, load_model, save_model
from models.unrolled import GDNetConfig, GradientDescentNet
from models.varnet import VarNet, VarNetConfig

__all__ = [
    "MODELS",
    "ModelError",
    "build_model",
    "load_model",
    "save_model",
    "GDNetConfig",
    "GradientDescentNet",
    "NeumannConfig",
    "NeumannNet",
    "MoDLConfig",
    "MoDL",
    "UNetPostConfig",
    "UNetPost",
    "VarNetConfig",
    "VarNet",
    "reconstruct_slices",
]
