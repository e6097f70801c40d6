"""Built-in intensity-based affine engine (``method="affine"``)."""

from .engine import register_affine

__all__ = ["register_affine"]
