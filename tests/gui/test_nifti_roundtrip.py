"""NIfTI read -> segment -> write keeps the affine and header of the shipped CT sample."""

from __future__ import annotations

import numpy as np
import pytest
from test_segment_widget import (  # tests/gui is on sys.path under pytest
    SAMPLES,
    errors_since,
    n_records,
    open_sample,
    save_tiny,
    segment_widget,
)

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMA_MODEL_DIR", str(tmp_path / "store"))


def test_ct_read_segment_write_keeps_affine(make_napari_viewer, tmp_path):
    import nibabel as nib

    src = nib.load(str(SAMPLES / "spleen_ct.nii.gz"))
    ckpt = save_tiny(
        tmp_path,
        "tiny3d",
        spatial_dims=3,
        foreground=True,
        normalization={"mode": "ct_window", "window": [-160, 240]},
        class_names=["background", "spleen"],
    )
    viewer = make_napari_viewer()
    image = open_sample(viewer, "spleen_ct.nii.gz")
    seg = segment_widget(viewer, ckpt)
    seg.prob_check.setChecked(True)
    _, gates = viewer.window.add_plugin_dock_widget("napari-prosma", "Gate inspector")

    seg.run(sync=True)

    labels = seg.last_labels
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    # a 3D model: c pools over 3D tiles, so the inspector says it is per volume
    assert "whole volume" in gates.note_label.text()
    viewer.dims.set_current_step(0, 5)
    assert gates.slice_index == 5
    assert gates.table.item(0, 2).text().endswith("%")
    n = n_records()
    gates.psi_checks[1].setChecked(True)
    psi = viewer.layers[f"{image.name} ψ stage 1"]
    assert not errors_since(n)
    assert psi.data.shape == image.data.shape
    np.testing.assert_allclose(psi.scale, image.scale)
    np.testing.assert_allclose(psi.translate, image.translate)
    np.testing.assert_array_equal(psi.metadata["prosma_io"]["source_affine"], src.affine)

    out = tmp_path / "spleen_seg.nii.gz"
    written = labels.save(str(out), plugin="napari-prosma")
    prob = viewer.layers[f"{image.name} P(spleen)"]
    (prob_out,) = prob.save(str(tmp_path / "spleen_prob.nii.gz"), plugin="napari-prosma")

    assert written == [str(out)]
    back = nib.load(str(out))
    np.testing.assert_array_equal(back.affine, src.affine)
    assert back.shape == src.shape
    for key in ("pixdim", "qform_code", "sform_code", "xyzt_units", "quatern_b", "qoffset_x"):
        np.testing.assert_array_equal(back.header[key], src.header[key])
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels.data.T)
    assert np.asarray(back.dataobj).dtype == np.uint8
    p = nib.load(prob_out)
    np.testing.assert_array_equal(p.affine, src.affine)
    np.testing.assert_allclose(np.asarray(p.dataobj), prob.data.T)

    # read back through the plugin: the same geometry as the image
    again = viewer.open(str(out), plugin="napari-prosma")[0]
    assert type(again).__name__ == "Labels"  # "seg" in the name and whole numbers
    np.testing.assert_allclose(again.scale, image.scale)
    np.testing.assert_allclose(again.translate, image.translate)
