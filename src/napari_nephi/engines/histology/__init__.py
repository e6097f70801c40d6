"""Histology: multi-stain whole-slide registration.

Stain-robust preprocessing and rigid pre-alignment (any rotation, mirrored slides), then a
multi-magnification local-affine network and a multi-magnification non-rigid network on patches
(WBIR 2022, "Unsupervised multi-magnification registration of histopathology images").
"""

from .stain import choose_stain_channels, stain_channel, tissue_mask

__all__ = ["choose_stain_channels", "stain_channel", "tissue_mask"]
