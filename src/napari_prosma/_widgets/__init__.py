"""napari widgets of napari-prosma (Qt). Import the submodules directly:
``segment.SegmentWidget``, ``gates.GateInspectorWidget``; ``_core`` is the Qt-free part."""
