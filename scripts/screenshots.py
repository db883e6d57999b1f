"""Render screenshots of the napari-prosma widgets in use into docs/.

    python scripts/screenshots.py            # needs napari + Qt; starts Xvfb if no display
    python scripts/screenshots.py --out DIR  # somewhere else
    python scripts/screenshots.py --model-2d runs/busi/best.safetensors --model-3d ...

Each shot is the whole napari window: a shipped sample, segmented through the Segment
widget, with the Gate inspector docked where relevant. A bundled model is used where one
fits the sample (``busi_prosma``, ``kvasir_prosma``, ``hippocampus_prosma``); until those
exist, a freshly initialised placeholder model of the same shape is used (its labels are
meaningless, the widgets are not), and the script says so.

Don't set QT_QPA_PLATFORM=offscreen: it has no OpenGL and the canvas comes out black.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = (1560, 960)


def _ensure_display() -> None:
    """Re-run under xvfb-run when there is no display (Linux without X)."""
    if (
        sys.platform.startswith("linux")
        and not os.environ.get("DISPLAY")
        and not os.environ.get("WAYLAND_DISPLAY")
        and not os.environ.get("PROSMA_SCREENSHOT_CHILD")
    ):
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            sys.exit("no display and no xvfb-run: install Xvfb (scripts/setup.sh does)")
        env = {**os.environ, "PROSMA_SCREENSHOT_CHILD": "1"}
        env.pop("QT_QPA_PLATFORM", None)
        cmd = [xvfb, "-a", "-s", "-screen 0 1920x1200x24", sys.executable, *sys.argv]
        sys.exit(subprocess.call(cmd, env=env))


def _model(
    name: str, tmp: Path, class_names: list[str], given: Path | None = None, **arch
) -> tuple[str, bool]:
    """``(spec, placeholder)``: the checkpoint given, the bundled model ``name``, or a
    random-init stand-in."""
    from napari_prosma.checkpoint import ModelCard, list_bundled, save
    from napari_prosma.nets import build_model

    if given is not None:
        return str(given.resolve()), False
    if name in list_bundled():
        return name, False
    import torch

    torch.manual_seed(0)  # the same stand-in every time
    net = build_model("prosma_unet", widths="small", **arch).eval()
    card = ModelCard(
        architecture="prosma_unet",
        arch_kwargs=net.config,
        name=f"{name} (placeholder)",
        class_names=class_names,
        intended_use="Placeholder with random weights, for screenshots of the widgets only.",
    )
    return str(save(net, tmp / name, card)), True


def _window(viewer):
    win = viewer.window._qt_window
    win.resize(*SIZE)
    win.showNormal()
    return win


def _settle(viewer, ms: int = 400) -> None:
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()
    QApplication.processEvents()


def _shot(viewer, path: Path) -> None:
    _settle(viewer)
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def _segment(viewer, spec: str, *, prob: bool = False, tta: bool = False, scope: str = "whole"):
    dock, seg = viewer.window.add_plugin_dock_widget("napari-prosma", "Segment")
    if spec not in [seg.model.combo.itemData(i) for i in range(seg.model.combo.count())]:
        seg.model.add_checkpoint(spec)
    else:
        seg.model.combo.setCurrentIndex(seg.model.combo.findData(spec))
    seg.device_combo.setCurrentIndex(seg.device_combo.findData("auto"))
    seg.prob_check.setChecked(prob)
    seg.tta_check.setChecked(tta)
    seg.scope_combo.setCurrentIndex(seg.scope_combo.findData(scope))
    seg.confirm = lambda text: print(f"[asked] {text}") or True  # no modal question here
    if seg.run(sync=True) is None:
        raise SystemExit("the segmentation failed; see the message above")
    return dock, seg


def _finetune(viewer, spec: str, steps: int = 40) -> None:
    """Segment the CT sample, paint the manual labels in as the user's corrections, and
    fine-tune (in this thread) through the Fine-tune widget."""
    samples = REPO / "src/napari_prosma/_samples"
    image = viewer.open(str(samples / "spleen_ct.nii.gz"), plugin="napari-prosma")[0]
    truth = viewer.open(str(samples / "spleen_ct_label.nii.gz"), plugin="napari-prosma")[0]
    truth.visible = False
    viewer.dims.set_current_step(0, 14)
    seg_dock, seg = _segment(viewer, spec)
    labels = seg.last_labels
    labels.data[:] = truth.data  # the corrections, painted into the Segment labels layer
    labels.refresh()
    viewer.layers.remove(truth)
    seg_dock.hide()
    _, ft = viewer.window.add_plugin_dock_widget("napari-prosma", "Fine-tune")
    ft.image_combo.setCurrentIndex(ft.image_combo.findData(image.name))
    ft.device_combo.setCurrentIndex(ft.device_combo.findData("auto"))
    ft.steps_spin.setValue(steps)
    ft.time_spin.setValue(0)
    ft.task_edit.setText("Spleen in abdominal CT slices")  # the new version says what it is for
    ft.classes_edit.setText("spleen")
    ft.label_edit.setText("spleen CT")
    ft.extra_config = {"eval_every": max(steps // 6, 1), "patience": 100, "lr": 1e-3}
    if ft.run(sync=True) is None:
        raise SystemExit("fine-tuning failed; see the message above")
    viewer.layers[f"{image.name} corrected"].visible = False
    viewer.layers.selection.active = viewer.layers[f"{image.name} labels"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="output folder")
    parser.add_argument(
        "--model-2d",
        type=Path,
        help="checkpoint for the BUSI ultrasound (default: bundled busi_prosma)",
    )
    parser.add_argument(
        "--model-3d",
        type=Path,
        help="checkpoint for the hippocampus MRI (default: bundled hippocampus_prosma)",
    )
    parser.add_argument(
        "--finetune-steps", type=int, default=60, help="optimiser steps of the fine-tuning shot"
    )
    args = parser.parse_args(argv)
    _ensure_display()
    os.environ.pop("QT_QPA_PLATFORM", None)
    os.environ.setdefault("PROSMA_MODEL_DIR", tempfile.mkdtemp(prefix="prosma-shots-store-"))

    import napari

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="prosma-shots-"))
    placeholders = []

    # 1-2: a 2D ultrasound image, segmented; then its gates
    busi, ph = _model(
        "busi_prosma",
        tmp,
        ["background", "lesion"],
        args.model_2d,
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
    )
    placeholders += ["busi_prosma"] if ph else []
    viewer = napari.Viewer(show=True, title="napari-prosma: Segment")
    _window(viewer)
    viewer.open_sample("napari-prosma", "busi_benign")
    viewer.layers[1].visible = False  # the ground truth
    seg_dock, _ = _segment(viewer, busi, prob=True, tta=True)
    _shot(viewer, out / "segment_2d.png")
    seg_dock.hide()
    _, gates = viewer.window.add_plugin_dock_widget("napari-prosma", "Gate inspector")
    gates.psi_checks[1].setChecked(True)
    viewer.title = "napari-prosma: Gate inspector"
    _shot(viewer, out / "gates_2d.png")
    viewer.close()

    # 5: Fine-tune: the 2D model segments a CT volume slice by slice (a domain it never
    # saw), the user's corrections (here: the sample's manual spleen labels) teach it
    viewer = napari.Viewer(show=True, title="napari-prosma: Fine-tune")
    _window(viewer)
    _finetune(viewer, busi, steps=args.finetune_steps)
    _shot(viewer, out / "finetune_2d.png")
    viewer.close()

    # 3-4: a 3D MRI volume with a 3D model; then its gates, following the slice
    hip, ph = _model(
        "hippocampus_prosma",
        tmp,
        ["background", "anterior", "posterior"],
        args.model_3d,
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
    )
    placeholders += ["hippocampus_prosma"] if ph else []
    viewer = napari.Viewer(show=True, title="napari-prosma: Segment a volume")
    _window(viewer)
    viewer.open(
        str(REPO / "src/napari_prosma/_samples/hippocampus_mri.nii.gz"), plugin="napari-prosma"
    )
    viewer.dims.set_current_step(0, 17)
    seg_dock, _ = _segment(viewer, hip)
    _shot(viewer, out / "segment_3d.png")
    seg_dock.hide()
    _, gates = viewer.window.add_plugin_dock_widget("napari-prosma", "Gate inspector")
    gates.psi_checks[2].setChecked(True)
    viewer.title = "napari-prosma: Gate inspector on a volume"
    _shot(viewer, out / "gates_3d.png")
    viewer.close()

    if placeholders:
        print(
            "note: no bundled model named " + ", ".join(placeholders) + "; the shots use "
            "randomly initialised placeholders of the same shape (meaningless labels)."
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
