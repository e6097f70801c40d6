"""Annotations: QuPath GeoJSON and CSV landmarks round trips, napari layers, carried by transforms."""

from __future__ import annotations

import json
import os

import napari
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.draw import polygon as fill_polygon

from napari_nephi.core.errors import InputError, UnsupportedFileError
from napari_nephi.core.transform import AffineTransform, ComposedTransform, DisplacementTransform
from napari_nephi.io.annotations import (
    Annotation,
    carry,
    carry_points,
    from_napari_points,
    from_napari_shapes,
    read_geojson,
    read_landmarks_csv,
    to_napari_points,
    to_napari_shapes,
    write_geojson,
    write_landmarks_csv,
)

# As QuPath 0.4 exports "Export objects as GeoJSON" (pretty-printed, FeatureCollection), written by hand:
# a wide, flat tumour outline with a hole (x 100..300, y 10..40), a two-part stroma region, a path
# and points. Coordinates are (x, y) pixels.
QUPATH_SAMPLE = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "6f1c2a0e-0d5b-4c0e-9a53-1d2f3e4a5b6c",
      "geometry": {
        "type": "Polygon",
        "coordinates": [
          [[100, 10], [300, 10], [300, 40], [100, 40], [100, 10]],
          [[150, 20], [160, 20], [160, 30], [150, 30], [150, 20]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "name": "tumour 1",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "isLocked": false
      }
    },
    {
      "type": "Feature",
      "id": "0a9b8c7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d",
      "geometry": {
        "type": "MultiPolygon",
        "coordinates": [
          [[[5, 50], [25, 50], [25, 90], [5, 50]]],
          [[[40, 60], [60, 60], [50, 80], [40, 60]]]
        ]
      },
      "properties": {
        "objectType": "annotation",
        "classification": {"name": "Stroma", "color": [150, 200, 150]}
      }
    },
    {
      "type": "Feature",
      "id": "11111111-2222-3333-4444-555555555555",
      "geometry": {"type": "LineString", "coordinates": [[0.5, 1.5], [10.25, 3.0], [20.0, 12.5]]},
      "properties": {"objectType": "annotation", "name": "margin"}
    },
    {
      "type": "Feature",
      "id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
      "geometry": {"type": "Point", "coordinates": [7.0, 3.0]},
      "properties": {
        "objectType": "annotation",
        "classification": {"name": "Immune cells", "color": [160, 90, 160]}
      }
    },
    {
      "type": "Feature",
      "id": "ffffffff-0000-1111-2222-333333333333",
      "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4], [5, 6]]},
      "properties": {"objectType": "annotation", "name": "cells"}
    }
  ]
}
"""


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "qupath.geojson"
    path.write_text(QUPATH_SAMPLE)
    return path


def test_qupath_export_is_read_in_numpy_order(sample):
    tumour, stroma, margin, point, cells = read_geojson(sample)

    assert tumour.kind == "Polygon" and tumour.name == "tumour 1"
    assert tumour.classification == {"name": "Tumor", "color": [200, 0, 0]}
    assert tumour.properties == {"objectType": "annotation", "isLocked": False}
    assert tumour.id == "6f1c2a0e-0d5b-4c0e-9a53-1d2f3e4a5b6c"
    outline, hole = tumour.coords
    np.testing.assert_array_equal(outline, [[10, 100], [10, 300], [40, 300], [40, 100]])  # (y, x), not closed
    np.testing.assert_array_equal(hole[0], [20, 150])
    assert stroma.kind == "MultiPolygon" and len(stroma.coords) == 2 and stroma.name is None
    np.testing.assert_array_equal(stroma.coords[1][0], [[60, 40], [60, 60], [80, 50]])
    np.testing.assert_array_equal(margin.coords, [[1.5, 0.5], [3.0, 10.25], [12.5, 20.0]])
    np.testing.assert_array_equal(point.coords, [[3.0, 7.0]])
    assert point.classification["name"] == "Immune cells"
    np.testing.assert_array_equal(cells.coords, [[2, 1], [4, 3], [6, 5]])


def test_the_wide_flat_outline_is_wide_in_napari(sample):
    tumour = read_geojson(sample)[0]
    data, types, props = to_napari_shapes([tumour])
    rows, cols = fill_polygon(data[0][:, 0], data[0][:, 1], shape=(100, 400))
    mask = np.zeros((100, 400), bool)
    mask[rows, cols] = True

    assert types == ["polygon"] and props["classification"] == ["Tumor"]
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max()) == (10, 40) and (xs.min(), xs.max()) == (100, 300)  # vertices included


def test_geojson_round_trip_writes_x_y_and_closed_rings(sample, tmp_path):
    original = read_geojson(sample)
    out = tmp_path / "back.geojson"

    assert write_geojson(out, original) == str(out)
    doc = json.loads(out.read_text())
    again = read_geojson(out)

    ring = doc["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] == [100.0, 10.0] and len(ring) == 5
    assert doc["features"][3]["geometry"] == {"type": "Point", "coordinates": [7.0, 3.0]}
    assert doc["features"][0]["properties"]["objectType"] == "annotation"
    assert [a.kind for a in again] == [a.kind for a in original]
    for a, b in zip(original, again):
        assert (a.name, a.classification, a.properties, a.id) == (
            b.name,
            b.classification,
            b.properties,
            b.id,
        )
        np.testing.assert_array_equal(a.points(), b.points())
    assert sorted(os.listdir(tmp_path)) == ["back.geojson", "qupath.geojson"]


def test_a_list_of_features_and_a_bare_feature_are_read(tmp_path):
    feature = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [4, 9]}, "properties": {}}
    (tmp_path / "list.json").write_text(json.dumps([feature, feature]))
    (tmp_path / "one.json").write_text(json.dumps(feature))

    assert len(read_geojson(tmp_path / "list.json")) == 2
    np.testing.assert_array_equal(read_geojson(tmp_path / "one.json")[0].coords, [[9, 4]])


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("x,y\n1,2\n", UnsupportedFileError, "is not GeoJSON: it is not valid JSON"),
        ('{"rows": [1, 2]}', UnsupportedFileError, "not GeoJSON annotations"),
        (
            '{"type": "Feature", "geometry": {"type": "GeometryCollection", "coordinates": []}}',
            UnsupportedFileError,
            "'GeometryCollection' geometry",
        ),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, 2]}}', InputError, "NaN"),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}',
            InputError,
            "at least 3",
        ),
        ('{"type": "Feature", "properties": {}}', UnsupportedFileError, "no geometry"),
    ],
)
def test_bad_geojson_gets_a_clear_error(tmp_path, text, error, message):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(error, match=message):
        read_geojson(path)


def test_annotations_check_their_coordinates():
    with pytest.raises(InputError, match="kind must be one of"):
        Annotation("Circle", [[0, 0]])
    with pytest.raises(InputError, match="NaN or infinite"):
        Annotation("LineString", [[0, 0], [np.nan, 1]])
    with pytest.raises(InputError, match="A Point has one"):
        Annotation("Point", [[0, 0], [1, 1]])


def _rigid_matrix(angle_deg, shift, scale=1.0, centre=(100, 100)):
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = np.asarray(centre) - r @ np.asarray(centre) + np.asarray(shift)
    return m


def test_carry_with_an_affine_matches_the_exact_inverse(sample):
    annotations = read_geojson(sample)
    matrix = _rigid_matrix(200.0, (12.0, -7.5), scale=1.1)
    transform = AffineTransform(matrix)

    carried = carry(annotations, transform)

    inv = np.linalg.inv(matrix)
    for a, b in zip(annotations, carried):
        expected = a.points() @ inv[:2, :2].T + inv[:2, 2]
        np.testing.assert_allclose(b.points(), expected, atol=1e-9)
        assert (b.kind, b.name, b.classification) == (a.kind, a.name, a.classification)
    forward = carry(annotations, transform, moving_to_fixed=False)
    np.testing.assert_allclose(forward[0].points(), transform.map_points(annotations[0].points()), atol=1e-3)
    np.testing.assert_array_equal(annotations[0].coords[0][0], [10, 100])  # inputs unchanged


def test_carry_through_a_smooth_warp_lands_where_the_transform_says():
    rng = np.random.default_rng(7)
    field = gaussian_filter(rng.normal(size=(2, 200, 220)), (0, 15, 15))
    field = (8.0 * field / np.abs(field).max()).astype(np.float32)  # up to 8 px, smooth (no folds)
    transform = ComposedTransform(
        [AffineTransform(_rigid_matrix(35.0, (5.0, 3.0))), DisplacementTransform(field)]
    )
    moving_points = rng.uniform(20, 180, size=(300, 2))
    shapes = [Annotation("Polygon", [moving_points[:100]]), Annotation("MultiPoint", moving_points[100:])]

    carried = carry(shapes, transform)
    fixed_points = np.concatenate([a.points() for a in carried])

    # the stated accuracy: the forward map of each carried point is within 0.01 px of where it was drawn
    back = transform.map_points(fixed_points)
    assert np.abs(back - moving_points).max() < 0.01
    assert np.abs(fixed_points - moving_points).max() > 5  # it did move them
    np.testing.assert_allclose(carry_points(moving_points, transform), fixed_points, atol=1e-9)


def test_carry_refuses_points_it_cannot_invert():
    field = np.zeros((2, 50, 50), np.float32)
    field[0] = 25.0 - np.arange(50)[:, None]  # every row collapses onto row 25: no inverse inside
    with pytest.raises(InputError, match="could not be carried"):
        carry_points([[20.0, 10.0]], DisplacementTransform(field))
    with pytest.raises(InputError, match="2D napari_nephi Transform"):
        carry_points([[1.0, 2.0]], AffineTransform(np.eye(4)))
    with pytest.raises(InputError, match="singular"):
        carry_points([[1.0, 2.0]], AffineTransform([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]]))


def test_napari_layers_round_trip():
    rect = np.array([[10, 20], [10, 80], [40, 80], [40, 20]], float)
    ellipse = np.array([[0, 0], [0, 60], [20, 60], [20, 0]], float)  # bounding box corners
    path = np.array([[5, 5], [15, 25], [30, 10]], float)
    layer = napari.layers.Shapes(
        [rect, ellipse, path],
        shape_type=["rectangle", "ellipse", "path"],
        properties={"name": ["a", "b", "c"]},
    )

    annotations = from_napari_shapes(layer.data, layer.shape_type, layer.properties)

    assert [a.kind for a in annotations] == ["Polygon", "Polygon", "LineString"]
    assert [a.name for a in annotations] == ["a", "b", "c"]
    np.testing.assert_allclose(annotations[0].coords[0], rect)
    on_ellipse = annotations[1].coords[0]
    assert len(on_ellipse) == 64
    np.testing.assert_allclose(((on_ellipse[:, 0] - 10) / 10) ** 2 + ((on_ellipse[:, 1] - 30) / 30) ** 2, 1.0)
    data, types, props = to_napari_shapes(annotations)
    back = napari.layers.Shapes(data, shape_type=types, properties=props)
    assert list(back.shape_type) == ["polygon", "polygon", "path"]
    np.testing.assert_allclose(back.data[2], path)

    points = napari.layers.Points(
        np.array([[1.0, 2.0], [3.0, 4.0]]), properties={"classification": ["T", "N"]}
    )
    as_points = from_napari_points(points.data, points.properties)
    assert [a.classification for a in as_points] == [{"name": "T"}, {"name": "N"}]
    pts, pprops = to_napari_points(as_points + annotations)
    np.testing.assert_array_equal(pts, [[1.0, 2.0], [3.0, 4.0]])
    assert pprops["classification"] == ["T", "N"]
    with pytest.raises(InputError, match="annotations are 2D"):
        from_napari_shapes([np.zeros((4, 3))], "polygon")


@pytest.mark.parametrize("style", ["napari", "anhir"])
def test_landmarks_csv_round_trip(tmp_path, style):
    points = np.array([[10.5, 200.25], [3.0, 4.0], [1234.5, 0.125]])
    path = tmp_path / "landmarks.csv"

    write_landmarks_csv(path, points, style=style)
    in_um = write_landmarks_csv(tmp_path / "um.csv", points, spacing=(0.5, 0.25), style=style)

    np.testing.assert_array_equal(read_landmarks_csv(path), points)
    np.testing.assert_allclose(read_landmarks_csv(in_um, spacing=(0.5, 0.25)), points)
    header = path.read_text().splitlines()[0]
    assert header == ("index,axis-0,axis-1" if style == "napari" else ",X,Y")


def test_anhir_landmarks_are_x_then_y(tmp_path):
    path = tmp_path / "anhir.csv"
    path.write_text(",X,Y\n0,10.5,20.0\n1,3,4\n")
    np.testing.assert_array_equal(read_landmarks_csv(path), [[20.0, 10.5], [4.0, 3.0]])


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("1,2\n3,4\n", UnsupportedFileError, "header must name axis-0 and axis-1"),
        ("y,x\n1,nan\n", InputError, "NaN or infinite"),
        ("y,x\n1,two\n", UnsupportedFileError, "not two numbers"),
        ("y,x\n", InputError, "only a header"),
        ("", InputError, "it is empty"),
    ],
)
def test_bad_landmark_files(tmp_path, text, error, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(error, match=message):
        read_landmarks_csv(path)


def test_writing_into_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(UnsupportedFileError, match="does not exist"):
        write_geojson(tmp_path / "nope" / "a.geojson", [Annotation("Point", [[1, 2]])])
