"""napari-prosma: ProSMA-UNet segmentation with inspectable sparse skip gates.

The core (``nets``, ``checkpoint``, ``inference``, ``finetune``, ``io``, ``cli``) imports
without napari or Qt; torch is imported lazily by the modules that need it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
