"""Dock widgets: thin Qt front ends over the engines (no numerical work here)."""

from .em_widget import EMAlignWidget
from .register_widget import NephiWidget, RegisterWidget

__all__ = ["EMAlignWidget", "NephiWidget", "RegisterWidget"]
