"""Histology: multi-stain whole-slide registration.

Stain-robust preprocessing and rigid pre-alignment (any rotation, mirrored slides), then a
multi-magnification local-affine network and a multi-magnification non-rigid network on patches
(WBIR 2022, "Unsupervised multi-magnification registration of histopathology images").
``train(pairs_or_folder, kind, ...)`` trains those networks on a user's slide pairs.
"""

from .networks import MultiMagNet, NetConfig, load_model, save_model, shipped_model
from .patches import blend_fields, multimag_patches, patch_origins
from .predict import predict_field
from .rigid import RigidResult, rigid_prealign
from .stain import choose_stain_channels, stain_channel, tissue_mask
from .train import pairs_from_folder, train

__all__ = [
    "MultiMagNet",
    "NetConfig",
    "RigidResult",
    "blend_fields",
    "choose_stain_channels",
    "load_model",
    "multimag_patches",
    "pairs_from_folder",
    "patch_origins",
    "predict_field",
    "rigid_prealign",
    "save_model",
    "shipped_model",
    "stain_channel",
    "tissue_mask",
    "train",
]
