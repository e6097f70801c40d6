"""Dock widgets: thin Qt front ends over the engines (no numerical work here)."""

from .register_widget import RegisterWidget

__all__ = ["RegisterWidget"]
