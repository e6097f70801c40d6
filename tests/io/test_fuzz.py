"""Property-based tests: damaged image files and transform folders read correctly or name the file.

Readers get random bytes, truncated and bit-flipped valid TIFF, OME-TIFF, pyramid and NIfTI files;
the answer is a valid non-empty array (pixels of a lazy pyramid included) or an
UnsupportedFileError naming the file, never another exception. Transform folders get random edits
of transform.json fields and truncated or bit-flipped displacement files; they load (to a transform
that maps points to finite values) or raise UnsupportedFileError naming the file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_nephi import load_transform
from napari_nephi.core.errors import UnsupportedFileError
from napari_nephi.core.transform import AffineTransform, ComposedTransform, DisplacementTransform
from napari_nephi.io import read_image, write_nifti, write_pyramidal_tiff, write_tiff

FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
IMAGE = (np.arange(48 * 40) % 251).reshape(48, 40).astype(np.uint8)
WRITERS = {
    "imagej.tif": lambda p: write_tiff(p, IMAGE, (0.5, 0.5)),
    "float.ome.tif": lambda p: write_tiff(p, IMAGE.astype(np.float32), (0.5, 0.25)),
    "volume.tif": lambda p: write_tiff(p, np.stack([IMAGE] * 4).astype(np.uint16), (2.0, 0.5, 0.5)),
    "pyramid.ome.tif": lambda p: write_pyramidal_tiff(p, np.tile(IMAGE, (4, 4)), 2, tile=(32, 32)),
    "image.nii.gz": lambda p: write_nifti(p, IMAGE, (1.0, 1.0)),
    "volume.nii": lambda p: write_nifti(p, np.stack([IMAGE] * 4).astype(np.int16), (2.0, 1.0, 1.0)),
}


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("valid")
    out = {}
    for name, write in WRITERS.items():
        write(folder / name)
        out[name] = (folder / name).read_bytes()
    return out


def _read_fully(path: Path) -> None:
    """Read ``path`` like napari would, pixels included; assert what comes back is a usable image."""
    try:
        layers = read_image(path)
        data = layers[0][0]
        levels = data if isinstance(data, list) else [data]
        for level in levels:
            assert level.ndim >= 2 and 0 not in level.shape
            corner = np.asarray(level[tuple(slice(0, 64) for _ in range(level.ndim))])
            assert corner.size > 0
    except UnsupportedFileError as exc:
        assert path.name in str(exc)


def _damage(data: bytes, cut: float, flips: list[tuple[float, int]], splice: bytes, at: float) -> bytes:
    out = bytearray(data[: max(0, int(len(data) * cut))])
    for where, bit in flips:
        if out:
            out[int(where * (len(out) - 1))] ^= 1 << bit
    if splice and out:
        k = int(at * (len(out) - 1))
        out[k : k + len(splice)] = splice
    return bytes(out)


unit = st.floats(0.0, 1.0)
damage = st.tuples(
    st.one_of(st.just(1.0), unit),  # keep all, or truncate
    st.lists(st.tuples(unit, st.integers(0, 7)), max_size=12),  # bit flips
    st.binary(max_size=24),  # random bytes spliced in
    unit,
)


@FUZZ
@given(name=st.sampled_from(sorted(WRITERS)), damage=damage)
def test_damaged_files_read_or_name_the_file(valid_files, name, damage):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"damaged_{name}"
        path.write_bytes(_damage(valid_files[name], *damage))
        _read_fully(path)


@FUZZ
@given(name=st.sampled_from(sorted(WRITERS)), content=st.binary(max_size=2048))
def test_random_bytes_read_or_name_the_file(name, content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"random_{name}"
        path.write_bytes(content)
        _read_fully(path)


@FUZZ
@given(damaged=st.integers(0, 2), damage=damage)
def test_section_folder_with_a_damaged_section_reads_or_names_it(valid_files, damaged, damage):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sections"
        folder.mkdir()
        for k in range(3):
            data = valid_files["imagej.tif"]
            (folder / f"s{k}.tif").write_bytes(_damage(data, *damage) if k == damaged else data)
        try:
            stack = read_image(folder)[0][0]
            assert stack.ndim == 3 and 0 not in stack.shape
            assert np.asarray(stack).shape == (3, *IMAGE.shape)
        except UnsupportedFileError as exc:
            assert f"s{damaged}.tif" in str(exc), str(exc)


def test_undamaged_files_read_back(valid_files, tmp_path):
    """The property's baseline: every valid file reads to the image it was written from."""
    for name, data in valid_files.items():
        (tmp_path / name).write_bytes(data)
        image = read_image(tmp_path / name)[0][0]
        image = np.asarray(image[0] if isinstance(image, list) else image)
        assert image.shape[-2:] in {IMAGE.shape, (4 * IMAGE.shape[0], 4 * IMAGE.shape[1])}


# -- transform folders -----------------------------------------------------------------------------------
def _saved(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    field = rng.uniform(-1, 1, (2, 9, 8)).astype(np.float32)
    shift = np.eye(3)
    shift[0, 2] = 1.5
    t = ComposedTransform(
        [DisplacementTransform(field, inverse_field=-field, spacing=(0.5, 0.5)), AffineTransform(shift)]
    )
    t.save(folder / "t")
    return folder / "t"


@pytest.fixture(scope="module")
def transform_folder(tmp_path_factory) -> Path:
    return _saved(tmp_path_factory.mktemp("transform"))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=20,
)
FIELDS = [
    "kind",
    "ndim",
    "shape",
    "spacing",
    "world_affine",
    "moving_shape",
    "moving_spacing",
    "count",
    "format",
]


def _check_loads_or_names(folder: Path, damaged: set[str]) -> None:
    try:
        t = load_transform(folder)
    except UnsupportedFileError as exc:
        assert any(name in str(exc) for name in damaged) or str(folder) in str(exc), str(exc)
        return
    points = t.map_points(np.array([[1.0, 2.0], [4.0, 3.0]]))
    assert points.shape == (2, 2) and np.all(np.isfinite(points))


@FUZZ
@given(
    part=st.sampled_from(["", "0", "1"]),
    field=st.sampled_from(FIELDS),
    value=st.one_of(JSON_VALUES, st.just("drop")),
)
def test_edited_transform_json_loads_or_names_the_file(transform_folder, part, field, value):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "t"
        shutil.copytree(transform_folder, folder)
        meta_path = folder / part / "transform.json"
        meta = json.loads(meta_path.read_text())
        if value == "drop":
            meta.pop(field, None)
        else:
            meta[field] = value
        meta_path.write_text(json.dumps(meta))
        _check_loads_or_names(folder, {"transform.json"})


@FUZZ
@given(
    name=st.sampled_from(
        [
            "0/displacement.nii.gz",
            "0/inverse_displacement.nii.gz",
            "settings.json",
            "transform.json",
            "0/transform.json",
            "1/transform.json",
        ]
    ),
    damage=damage,
)
def test_damaged_transform_files_load_or_name_the_file(transform_folder, name, damage):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "t"
        shutil.copytree(transform_folder, folder)
        path = folder / name
        path.write_bytes(_damage(path.read_bytes(), *damage))
        _check_loads_or_names(folder, {Path(name).name})
