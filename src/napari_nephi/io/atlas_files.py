"""The files of the atlas command and widget: sections (images, stacks, folders) and atlases given as folders.

Besides what :func:`napari_nephi.io.read_image` reads (TIFF, NIfTI, slides), sections and plates
may be ordinary pictures (PNG, JPEG, BMP: the images QuickNII, VisuAlign and DeepSlice work with,
and scanned atlas pages), read by OpenCV. A folder gives its TIFF and picture files in natural
name order (``s2`` before ``s10``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import InputError, UnsupportedFileError
from ._util import is_tiff, natural_key

#: Suffixes of pictures read by OpenCV.
PICTURES = (".png", ".jpg", ".jpeg", ".bmp")


def is_picture(path: Path) -> bool:
    """Whether ``path`` names a PNG, JPEG or BMP picture."""
    return Path(path).suffix.lower() in PICTURES


def read_picture(path: Path) -> np.ndarray:
    """A picture as grey ``(y, x)`` or RGB(A) ``(y, x, 3|4)`` (OpenCV's BGR order turned to RGB)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnsupportedFileError(f"Cannot read {path}: not a readable {Path(path).suffix} picture.")
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def image_files(folder: Path, what: str = "section") -> list[Path]:
    """TIFF and picture files directly in ``folder`` (hidden ones skipped), in natural name order."""
    try:
        files = [
            f
            for f in folder.iterdir()
            if f.is_file() and not f.name.startswith(".") and (is_tiff(f) or is_picture(f))
        ]
    except OSError as exc:
        raise UnsupportedFileError(f"Cannot list the {what} folder {folder}: {exc.strerror or exc}.") from exc
    if not files:
        raise UnsupportedFileError(
            f"The {what} folder {folder} holds no image (.tif, .tiff, {', '.join(PICTURES)})."
        )
    return sorted(files, key=lambda f: natural_key(f.name))


def _read_file(path: Path) -> list[tuple[str, str, np.ndarray]]:
    """``(name, file, image)`` of a 2D image file, or one per plane of a stack."""
    from .plates import read_plate
    from .read import read_image

    if is_picture(path):
        if not path.exists():
            raise UnsupportedFileError(f"{path} does not exist; check the path and try again.")
        return [(path.stem, str(path), read_picture(path))]
    data, meta, _ = read_image(path)[0]
    data = data[0] if meta.get("multiscale") else data
    if np.ndim(data) - int(bool(meta.get("rgb"))) == 3 and np.shape(data)[0] > 1:
        stem = meta.get("name") or path.stem
        return [(f"{stem}_{k}", str(path), np.asarray(data[k])) for k in range(np.shape(data)[0])]
    return [(meta.get("name") or path.stem, str(path), read_plate(path))]


def read_sections(paths: list[str]) -> list[tuple[str, str, np.ndarray]]:
    """``(name, file, image)`` per section: 2D files as they are, stacks and folders plane by plane."""
    out = []
    for path in paths:
        p = Path(path)
        files = image_files(p) if p.is_dir() else [p]
        for f in files:
            found = _read_file(f)
            if p.is_dir() and len(found) > 1:
                raise InputError(
                    f"{f} in the section folder {p} is a stack; give it on its own, or one 2D image per file."
                )
            out += found
    names = [name for name, _, _ in out]
    if len(set(names)) != len(names):  # two files of the same name in different folders
        out = [(f"{k:04d}_{name}", f, img) for k, (name, f, img) in enumerate(out)]
    return out


def read_atlas(path: str, what: str = "reference"):
    """An atlas reference (or its annotation, ``what``): a volume file as
    :func:`napari_nephi.io.plates.read_reference` reads it, or a folder of 2D plate images (TIFF or
    pictures, sizes free) as a list in natural name order."""
    from .plates import read_plate, read_reference

    p = Path(path)
    if not p.is_dir():
        return read_reference(p, what)[0]
    return [
        read_picture(f) if is_picture(f) else read_plate(f, f"{what} plate") for f in image_files(p, what)
    ]
