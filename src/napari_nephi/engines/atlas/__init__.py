"""Atlas-plate lookup: find the atlas plate that matches a brain section, register it, carry its labels.

An embedding network trained with triplet loss on sections synthesised from the atlas ranks the
plates for a (partial, obliquely cut) section (WBIR 2022, "mouse brain slice identification with
Siamese networks"); the chosen plate is registered to the section and its labels are carried.
"""

from __future__ import annotations

__all__ = ["AtlasLookup"]


def __getattr__(name: str):
    # AtlasLookup is imported on first use: its modules pull in OpenCV and scikit-image.
    if name == "AtlasLookup":
        from .lookup import AtlasLookup

        return AtlasLookup
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
