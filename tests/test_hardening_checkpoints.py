"""Untrusted checkpoint files (issue #7): truncated, wrong tensor shapes, card fields
missing or of the wrong type, NaN weights, and pickles carrying code, which must never
run. Complements ``test_checkpoint.py``; every case also goes through ``prosma info
--check`` (one plain line, exit code 1)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from hardening_support import save_tiny, tiny_model
from napari_prosma.checkpoint import (
    REQUIRED_FIELDS,
    CheckpointError,
    file_sha256,
    load,
    read_card,
    seal_card,
)
from napari_prosma.cli import main


class _RunsCode:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def good(tmp_path) -> Path:
    return save_tiny(tmp_path / "good", "m")


def _copy_card(good: Path, weights: Path) -> None:
    shutil.copy(good.with_suffix(".json"), weights.with_suffix(".json"))


def _cli_refuses(path: Path, capsys, *words: str) -> str:
    rc = main(["info", str(path), "--check"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- code in pickles


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("how", ["torch.save", "raw pickle", "nested"])
def test_pickles_carrying_code_never_run(tmp_path, good, capsys, suffix, how):
    marker = tmp_path / "PWNED"
    evil = tmp_path / f"evil{suffix}"
    payload = _RunsCode(marker)
    if how == "torch.save":
        torch.save({"head.weight": payload}, evil)
    elif how == "raw pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:  # a real state dict with one poisoned entry deep inside
        net, _ = tiny_model()
        state = dict(net.state_dict())
        state["extra"] = [1, {"x": payload}]
        torch.save({"state_dict": state}, evil)
    _copy_card(good, evil)
    with pytest.raises(CheckpointError, match="could not be read safely"):
        load(evil)
    _cli_refuses(evil, capsys, "never executed")
    assert not marker.exists()


def test_pickle_renamed_to_safetensors_never_runs(tmp_path, good, capsys):
    marker = tmp_path / "PWNED"
    fake = tmp_path / "fake.safetensors"
    torch.save({"w": _RunsCode(marker)}, fake)
    _copy_card(good, fake)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(fake, verify_hash=False)
    _cli_refuses(fake, capsys, "fake.safetensors")
    assert not marker.exists()


# ---------------------------------------------------------------------------- broken weights


@pytest.mark.parametrize("keep", [0, 8, 100, 0.5, 0.99])
def test_truncated_weights_at_any_length(good, capsys, keep):
    w = good
    data = w.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    w.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="does not match its model card"):
        load(w)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(w, verify_hash=False)
    _cli_refuses(w, capsys, "m.safetensors")


def test_safetensors_header_claiming_a_huge_size(good):
    """A header length of 1 TiB: refused at once, without trying to allocate it."""
    good.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(good, verify_hash=False)


def test_truncated_pt_file(tmp_path, good, capsys):
    net, _ = tiny_model()
    pt = tmp_path / "cut.pt"
    torch.save(net.state_dict(), pt)
    pt.write_bytes(pt.read_bytes()[:3000])
    _copy_card(good, pt)
    with pytest.raises(CheckpointError, match="could not be read safely"):
        load(pt)
    _cli_refuses(pt, capsys)


def test_weights_of_another_model(tmp_path, good, capsys):
    """3D weights beside a 2D card: the message names a tensor and both shapes."""
    other = save_tiny(tmp_path / "other", "m", spatial_dims=3)
    shutil.copy(other, good)
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape \(.*\) but the card"):
        load(good, verify_hash=False)
    _cli_refuses(good, capsys, "does not match its model card")


def test_nan_weights_are_refused(good, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(good)
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    save_file(state, good)
    card = json.loads(good.with_suffix(".json").read_text())
    card["weights_sha256"] = file_sha256(good)  # as if the card were written for these weights
    good.with_suffix(".json").write_text(json.dumps(card))
    seal_card(good)
    with pytest.raises(CheckpointError, match=r"'head\.bias' holds NaN"):
        load(good)
    _cli_refuses(good, capsys, "NaN")


# ---------------------------------------------------------------------------- broken cards


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_each_missing_card_field_is_named(good, capsys, field):
    card = good.with_suffix(".json")
    data = json.loads(card.read_text())
    del data[field]
    card.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"lacks required field.*{field}"):
        read_card(good)
    _cli_refuses(good, capsys, field)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("format_version", "one", "'format_version' must be a number"),
        ("format_version", None, "'format_version' must be a number"),
        ("arch_kwargs", [1, 2], "'arch_kwargs' must be an object"),
        ("architecture", "vit", "unknown architecture"),
        ("normalization", "zscore", "'normalization' must be an object"),
        ("normalization", {"mode": "magic"}, "unknown normalisation mode"),
        ("normalization", {"mode": "fixed", "mean": [1, 2, 3]}, "3 values for 1 channel"),
        ("normalization", {"mode": "ct_window", "window": "wide"}, "'normalization' cannot"),
        ("patch_size", [-5, 0], "'patch_size' must be"),
        ("patch_size", "big", "'patch_size' must be"),
        ("spacing", [0, 1], "'spacing' must be"),
        ("class_names", "bg", "'class_names' must be"),
        ("weights_sha256", 123, "'weights_sha256' must be"),
        ("training", [1], "'training' must be an object"),
    ],
)
def test_card_fields_of_the_wrong_type_are_named(good, capsys, field, value, words):
    """A hand-edited or damaged card fails at once, naming the field, instead of with a
    raw TypeError deep inside inference."""
    card = good.with_suffix(".json")
    data = json.loads(card.read_text())
    data[field] = value
    card.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load(good)
    assert words in str(info.value), str(info.value)
    _cli_refuses(good, capsys, "m.json")


@pytest.mark.parametrize("text", ["", "[1, 2]", "{", "\x00\xff\xfe", '"just a string"'])
def test_card_that_is_not_a_json_object(good, capsys, text):
    good.with_suffix(".json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"m\.json"):
        load(good)
    _cli_refuses(good, capsys, "m.json")


def test_predict_with_a_broken_model_writes_nothing(tmp_path, good, capsys):
    good.write_bytes(good.read_bytes()[:500])
    out = tmp_path / "out"
    from napari_prosma._samples import sample_path

    rc = main(
        [
            "predict",
            str(sample_path("busi_benign")),
            "-o",
            str(out),
            "--model",
            str(good),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "only partly written" in err[0], err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------- hashes (issue 12 #10)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalization", {"mode": "fixed", "scale": 1.0, "mean": [0.0], "std": [1.0]}),
        ("class_names", ["background", "tumour"]),
        ("spacing", [2.0, 1.0, 1.0]),
    ],
)
def test_a_card_edited_by_hand_is_refused_until_sealed(good, capsys, field, value):
    """A hand-edited normalisation or class list loaded silently; now the card's hash
    (``card_sha256``) no longer matches and the card is refused, by read_card too."""
    card = good.with_suffix(".json")
    data = json.loads(card.read_text())
    data[field] = value
    card.write_text(json.dumps(data, indent=4))
    with pytest.raises(CheckpointError, match="was changed after it was written"):
        load(good)
    with pytest.raises(CheckpointError, match="was changed after it was written"):
        read_card(good)
    _cli_refuses(good, capsys, "m.json", "was changed", "seal_card")
    seal_card(good)  # an edit made on purpose
    assert getattr(load(good)[1], field) == value


def test_formatting_does_not_change_the_card_hash(good):
    card = good.with_suffix(".json")
    data = json.loads(card.read_text())
    card.write_text(json.dumps(dict(reversed(list(data.items()))), indent=None))
    load(good)


@pytest.mark.parametrize("field", ["weights_sha256", "card_sha256"])
def test_a_card_without_its_hashes_is_refused(good, capsys, field):
    """A card whose weights_sha256 was removed loaded its weights unchecked."""
    card = good.with_suffix(".json")
    data = json.loads(card.read_text())
    del data[field]
    card.write_text(json.dumps(data))
    if field == "weights_sha256":
        seal_card(good)  # even a sealed card must name its weights' hash
    words = "carries no weights_sha256" if field == "weights_sha256" else "carries no card_sha256"
    with pytest.raises(CheckpointError, match=words):
        load(good)
    _cli_refuses(good, capsys, words)


def test_bundled_and_golden_cards_carry_valid_hashes():
    from napari_prosma.checkpoint import bundled_dir, card_digest, checkpoint_paths, list_bundled

    names = list_bundled()
    assert set(names) >= {"busi_prosma", "kvasir_prosma", "hippocampus_prosma"}
    here = Path(__file__).parent / "data"
    for path in [bundled_dir() / f"{n}.json" for n in names] + [
        here / "golden_2d.json",
        here / "golden_3d.json",
    ]:
        data = json.loads(path.read_text())
        assert data["card_sha256"] == card_digest(data), path
        weights, _ = checkpoint_paths(path)
        assert data["weights_sha256"] == file_sha256(weights), path
        read_card(path)
