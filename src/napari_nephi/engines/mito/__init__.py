"""MITO engine: fast EM section alignment with keypoints inside mitochondria (WBIR 2022).

* :func:`align_stack` aligns a ``(n, y, x)`` stack and returns a
  :class:`~napari_nephi.core.registration.Registration` with a per-section transform;
* :func:`warp_masks` / :func:`warp_sections` apply it to labels or other stacks;
* :func:`detect_mitochondria` makes automatic masks a user can inspect and edit;
* :func:`match_pair` gives the keypoints and matches of one section pair (for overlays);
* ``napari_nephi.register(fixed, moving, method="mito")`` aligns one 2D image pair.
"""

from .align import align_stack, detect_mitochondria, warp_masks, warp_sections
from .engine import match_pair, register_mito

__all__ = [
    "align_stack",
    "detect_mitochondria",
    "match_pair",
    "register_mito",
    "warp_masks",
    "warp_sections",
]
