"""Small synthetic EM stacks shared by the MITO tests (generated once per session)."""

import cv2
import numpy as np
import pytest

from napari_nephi.synthetic import em_stack, rotation_matrix

SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="session")
def em():
    """6 sections of 256 x 256 (padded to 364 x 364), each rotated by a random angle."""
    return em_stack(6, (256, 256), seed=0)


@pytest.fixture(scope="session")
def rotated_copies(em):
    """One section rotated by known angles: the content is identical, only the rotation differs.

    ``matrices[k]`` maps unrotated coordinates to section ``k`` (the generator's convention).
    """
    base = em["unrotated_stack"][2]
    base_mask = em["unrotated_masks"][2]
    shape = base.shape
    angles = np.array([0.3, -2.0, 1.1, 2.9, -0.7])
    stack, masks, mats = [], [], []
    for a in angles:
        m = rotation_matrix(a, shape)
        inv_xy = (SWAP @ np.linalg.inv(m) @ SWAP)[:2]
        flags = cv2.WARP_INVERSE_MAP
        stack.append(cv2.warpAffine(base, inv_xy, shape[::-1], flags=cv2.INTER_LINEAR | flags))
        masks.append(cv2.warpAffine(base_mask, inv_xy, shape[::-1], flags=cv2.INTER_NEAREST | flags))
        mats.append(m)
    return {
        "stack": np.stack(stack),
        "masks": np.stack(masks),
        "matrices": np.stack(mats),
        "angles": angles,
        "pad": em["pad"],
        "unrotated_mask": base_mask,
    }


def _content_points(shape, pad, step=8):
    """Homogeneous (y, x) points covering the unpadded content of a section, (3, N)."""
    h, w = shape
    yy, xx = np.mgrid[pad : h - pad : step, pad : w - pad : step]
    return np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)]).astype(np.float64)


def _apply(m, p):
    q = m @ p
    return q[:2] / q[2]


def _max_error(estimated, true, ref, shape, pad):
    """Per-section max distance (px) between estimated and true maps over the content.

    ``estimated[k]`` maps the aligned (reference section) frame to section k; ``true[k]`` maps
    the unrotated frame to section k. Content points ``p`` of the unrotated frame sit at
    ``true[ref] p`` in the aligned frame, so the estimate must send those to ``true[k] p``.
    """
    p = _content_points(shape, pad)
    p_ref = true[ref] @ p
    p_ref = p_ref / p_ref[2]
    return np.array(
        [
            np.linalg.norm(_apply(estimated[k], p_ref) - _apply(true[k], p), axis=0).max()
            for k in range(len(true))
        ]
    )


@pytest.fixture(scope="session")
def max_error():
    return _max_error
