"""DICOM in napari: an oblique series through the plugin's reader, the Segment widget and
the DICOM-SEG writer (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from test_segment_widget import save_tiny, segment_widget

from dicom_support import make_series, rotation
from napari_prosma import dicom

pytestmark = pytest.mark.gui


def test_oblique_series_segments_in_place_and_saves_as_seg(make_napari_viewer, tmp_path):
    r = rotation((0, 0, 1), 20.0)  # in the viewing plane: napari shows it fully in 2D
    iop = np.r_[r @ [1.0, 0, 0], r @ [0, 1.0, 0]]
    make_series(tmp_path / "series", n=4, source="MR_small.dcm", iop=iop, step=1.5)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "series"), plugin="napari-prosma")
    assert not np.allclose(image.affine.affine_matrix, np.eye(4))  # placed by its affine
    assert image.contrast_limits == pytest.approx((-200.0, 1399.0))  # window 600/1600

    ckpt = save_tiny(tmp_path, "tiny3d", spatial_dims=3, out_channels=3, foreground=True)
    widget = segment_widget(viewer, ckpt)
    widget.image_combo.setCurrentIndex(widget.image_combo.findData(image.name))
    assert widget.run(sync=True) is not None
    labels = widget.last_labels
    corner = np.array(image.data.shape) - 1
    for idx in ([0, 0, 0], corner, [1, 30, 7]):  # the labels sit exactly on the image
        np.testing.assert_allclose(labels.data_to_world(idx), image.data_to_world(idx))

    labels.data[0, :5, :5] = 2  # a correction
    viewer.layers.selection = {labels}
    (path,) = viewer.layers.save(str(tmp_path / "seg.dcm"), selected=True, plugin="napari-prosma")
    img = dicom.read_dicom(tmp_path / "series")[0][0]
    np.testing.assert_array_equal(dicom.read_seg(path, img), labels.data)
    segs = dicom.seg_segments(path)
    assert [s["label"] for s in segs] == ["c1", "c2"]
    assert {s["algorithm"] for s in segs} == {"tiny3d"}
