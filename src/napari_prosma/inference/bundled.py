"""Which bundled model suits an image, by its kind (grey / rgb / volume)."""

from __future__ import annotations

#: Preferred bundled models per image kind, best first.
PREFERRED = {
    "rgb": ("kvasir_prosma",),
    "grey": ("busi_prosma",),
    "volume": ("hippocampus_prosma", "hippocampus_prosma_3d"),
}


def default_model_name(kind: str) -> str | None:
    """The bundled model for a ``"grey"``, ``"rgb"`` or ``"volume"`` image, or None.

    A preferred name wins; otherwise the first bundled card whose dimensions and channel
    count fit the kind.
    """
    from ..checkpoint import CheckpointError, bundled_dir, list_bundled, read_card

    names = list_bundled()
    for n in PREFERRED.get(kind, ()):
        if n in names:
            return n
    dims, channels = (3, 1) if kind == "volume" else (2, 3 if kind == "rgb" else 1)
    for n in names:
        try:
            card = read_card(bundled_dir() / n)
        except CheckpointError:
            continue
        if card.spatial_dims == dims and card.in_channels == channels:
            return n
    return None
