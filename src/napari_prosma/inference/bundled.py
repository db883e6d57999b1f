"""Moved to :mod:`napari_prosma.models`; kept so existing imports keep working."""

from __future__ import annotations

from ..models import PREFERRED, default_model_name

__all__ = ["PREFERRED", "default_model_name"]
