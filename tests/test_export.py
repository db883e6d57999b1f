"""``prosma export``: bioimage.io packages validated offline by bioimageio.core, and ONNX."""

from __future__ import annotations

import importlib.util
import socket

import numpy as np
import pytest

from hardening_support import save_tiny
from napari_prosma.cli import main
from napari_prosma.export import export_model
from napari_prosma.export._pydantic_compat import bioimageio_compat
from napari_prosma.models import read_model_card
from napari_prosma.preprocess import InputError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """bioimageio must validate from local files alone: any connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("an export test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def tiny(tmp_path, name="tiny", **kw):
    return save_tiny(tmp_path / "models", name=name, **kw)


def test_bioimageio_package_validates_offline(tmp_path):
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    out = export_model(tiny(tmp_path), "bioimageio", tmp_path / "pkg", check=False).path
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "README.md",
        "cover.png",
        "prosma_unet.py",
        "rdf.yaml",
        "test_input.npy",
        "test_output.npy",
        "weights.pt",
        "weights_torchscript.pt",
    ]
    with bioimageio_compat():
        descr = load_description(out / "rdf.yaml")
        summary = test_model(out / "rdf.yaml")
    assert summary.status == "passed", summary.format()
    reproduced = [d.name for d in summary.details if d.name.startswith("Reproduce")]
    assert len(reproduced) == 2  # pytorch_state_dict and torchscript
    assert type(descr).__name__ == "ModelDescr"
    assert {w for w, e in descr.weights if e is not None} == {"pytorch_state_dict", "torchscript"}
    assert str(descr.license) == "BSD-3-Clause" and descr.cite[0].url is not None
    (inp,), (outp,) = descr.inputs, descr.outputs
    assert [str(a.id) for a in inp.axes] == ["batch", "channel", "y", "x"]
    assert [p.id for p in inp.preprocessing] == [
        "ensure_dtype",
        "zero_mean_unit_variance",
        "ensure_dtype",
    ]
    assert [p.id for p in outp.postprocessing] == ["softmax", "ensure_dtype"]
    assert [str(n) for n in outp.axes[1].channel_names] == ["background", "thing"]


def test_bioimageio_pydantic_workaround_is_needed_and_restored(tmp_path):
    """Without the workaround this env's bioimageio.spec cannot load a valid package."""
    from bioimageio.spec import load_description

    from napari_prosma.export import _pydantic_compat

    out = export_model(tiny(tmp_path), "bioimageio", tmp_path / "pkg", check=False).path
    if _pydantic_compat.needed():
        assert type(load_description(out / "rdf.yaml")).__name__ == "InvalidDescr"
    with bioimageio_compat():
        assert type(load_description(out / "rdf.yaml")).__name__ == "ModelDescr"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        {
            "in_channels": 3,
            "normalization": {
                "mode": "fixed",
                "scale": 255.0,
                "mean": [0.4, 0.5, 0.6],
                "std": [0.2, 0.25, 0.3],
            },
        },
        {"normalization": {"mode": "percentile", "lower": 1.0, "upper": 99.0}},
        {"normalization": {"mode": "ct_window", "window": [20.0, 200.0]}},
        {"out_channels": 1, "normalization": {"mode": "none"}},
    ],
)
def test_each_normalisation_is_reproduced_by_bioimageio(tmp_path, kw):
    """bioimageio's preprocessing steps give the plugin's normalisation: the package's test
    output (the plugin's own) is reproduced through them."""
    from bioimageio.core import test_model

    out = export_model(tiny(tmp_path, **kw), "bioimageio", tmp_path / "pkg", check=False).path
    with bioimageio_compat():
        summary = test_model(out / "rdf.yaml", weight_format="pytorch_state_dict")
    assert summary.status == "passed", summary.format()


def test_architecture_file_and_torchscript_rebuild_the_plugin_network(tmp_path):
    import imageio.v3 as iio
    import torch

    from napari_prosma.checkpoint import load, read_card

    weights = tiny(tmp_path)
    out = export_model(weights, "bioimageio", tmp_path / "pkg", check=False).path
    spec = importlib.util.spec_from_file_location("exported_arch", out / "prosma_unet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    card = read_card(weights)
    rebuilt = mod.build_model(card.architecture, **card.arch_kwargs)
    rebuilt.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    rebuilt.eval()
    net, _ = load(weights)
    x = torch.randn(1, 1, 48, 32)  # not the test input's size
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=0)
        ts = torch.jit.load(str(out / "weights_torchscript.pt"))
        torch.testing.assert_close(ts(x), net(x), rtol=1e-5, atol=1e-5)
    cover = iio.imread(out / "cover.png")
    assert cover.shape[1] == 2 * cover.shape[0] and cover.shape[2] == 3
    assert "Weights sha256" in (out / "README.md").read_text()


def test_existing_output_is_never_touched(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        export_model(tiny(tmp_path), "onnx", tmp_path / "pkg")
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["mine.txt"]


def test_unexportable_normalisation_leaves_nothing(tmp_path):
    weights = tiny(tmp_path, normalization={"mode": "zscore", "nonzero": True})
    with pytest.raises(InputError, match="non-zero voxels"):
        export_model(weights, "bioimageio", tmp_path / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no hidden temp folder


def test_onnx_export_checks_and_runs_with_dynamic_sizes(tmp_path):
    import onnx
    import onnxruntime as ort
    import torch

    from napari_prosma.checkpoint import load

    weights = tiny(tmp_path, spatial_dims=3)
    result = export_model(weights, "onnx", tmp_path / "onnx")
    path = result.path / "tiny.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert any("onnxruntime" in n and "reproduces" in n for n in result.notes)
    assert (result.path / "tiny.json").is_file()
    net, _ = load(weights)
    x = np.random.default_rng(0).normal(size=(2, 1, 16, 32, 48)).astype(np.float32)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    with torch.no_grad():
        np.testing.assert_allclose(got, net(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_cli_export_prints_what_was_checked(tmp_path, capsys):
    rc = main(["export", str(tiny(tmp_path)), "--format", "onnx", "-o", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "onnx.checker passed" in out and str(tmp_path / "o") in out
    rc = main(["export", "no_such_model", "--format", "onnx", "-o", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "no bundled model" in err[0]
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_bundled_3d_model_exports_to_a_valid_package(tmp_path):
    result = export_model("hippocampus_prosma", "bioimageio", tmp_path / "pkg")
    assert "test_model passed" in result.notes[0]
    text = (result.path / "README.md").read_text()
    sha = read_model_card("hippocampus_prosma").weights_sha256
    assert sha[:16] in text and "hippocampus" in text.lower()  # the shipped weights' hash


def test_a_package_that_fails_its_own_test_is_not_kept(tmp_path, monkeypatch):
    from napari_prosma.export import _bioimageio

    real = _bioimageio.reference_output

    def wrong(net, card, raw):  # a test output the network does not produce
        x, prob = real(net, card, raw)
        return x, prob[:, ::-1].copy()

    monkeypatch.setattr(_bioimageio, "reference_output", wrong)
    with pytest.raises(InputError, match="failed its own test"):
        export_model(tiny(tmp_path), "bioimageio", tmp_path / "pkg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
