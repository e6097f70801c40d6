"""The npe2 manifest validates; every sample opens in a real viewer; readers are found by napari."""

import napari
import numpy as np
import pytest
from npe2 import PluginManifest

SAMPLES = {"tc": 2, "ihc": 2, "mri": 3, "em": 3, "atlas": 3}


def test_manifest_validates():
    manifest = PluginManifest.from_distribution("napari-nephi")
    assert manifest.name == "napari-nephi"
    keys = {s.key for s in manifest.contributions.sample_data}
    assert keys == set(SAMPLES)
    assert "napari/layers/register" in manifest.contributions.menus
    assert any(r.accepts_directories for r in manifest.contributions.readers)


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_sample_opens_in_viewer(make_napari_viewer, key):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-nephi", key)
    assert len(layers) >= 2
    images = [ly for ly in viewer.layers if isinstance(ly, napari.layers.Image)]
    assert images and max(ly.ndim for ly in images) == SAMPLES[key]
    for layer in viewer.layers:
        data = np.asarray(layer.data)
        assert data.size > 0 and np.isfinite(data.astype(float)).all()


def test_napari_opens_nifti_with_plugin(make_napari_viewer, tmp_path):
    from napari_nephi.io import write_nifti

    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_nifti(tmp_path / "v.nii.gz", vol, spacing=(3.0, 2.0, 1.0))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "v.nii.gz"), plugin="napari-nephi")
    np.testing.assert_array_equal(np.asarray(layer.data), vol)
    np.testing.assert_allclose(layer.scale, (3.0, 2.0, 1.0))


def test_widget_docks_from_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nephi", "tc")
    _, widget = viewer.window.add_plugin_dock_widget("napari-nephi", "Register images")
    assert widget.fixed.layer() is not None and widget.moving.layer() is not None
    assert widget.fixed.layer() is not widget.moving.layer()
