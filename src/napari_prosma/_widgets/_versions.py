"""The versions panel of the Fine-tune widget: the fine-tuned versions of the model store,
newest first with their held-out Dice and date, with Activate and Revert to parent.

A model made active here is announced on the viewer's hub (``active_model_changed``), so
every model chooser follows it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..report import version_label
from . import _core
from ._common import button_row, guarded, hub_for, notify_error, notify_info, notify_warning
from ._tooltips import VERSION_COLUMNS, VERSIONS


class VersionsPanel(QWidget):
    """The store's versions (★ = active) with Activate and Revert to parent.

    Attributes:
        table, activate_button, revert_button, store_label: the controls.

    Args:
        viewer: the napari viewer (its hub hears of the model made active).
        store: gives the :class:`~napari_prosma.versions.ModelStore` to show.
        spec_of: a version id, bundled name or path -> what a model chooser holds.
        say: shows one line in the owner's status.
    """

    def __init__(
        self,
        viewer: Any,
        store: Callable[[], Any],
        spec_of: Callable[[str], str],
        say: Callable[[str], Any],
    ):
        super().__init__()
        self.hub = hub_for(viewer)
        self._store, self._spec_of, self._say = store, spec_of, say
        self._rows: list[Any] = []
        self.table = QTableWidget(0, len(VERSION_COLUMNS))
        self.table.setHorizontalHeaderLabels(VERSION_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        header = self.table.horizontalHeader()
        # the version name takes what is left (elided, full id as tooltip); Dice, Date and
        # Parent are never clipped
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in range(1, len(VERSION_COLUMNS)):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.setMinimumHeight(110)
        self.activate_button = QPushButton("Activate")
        self.activate_button.setToolTip(VERSIONS["activate"])
        self.revert_button = QPushButton("Revert to parent")
        self.revert_button.setToolTip(VERSIONS["revert"])
        self.store_label = QLabel("")
        self.store_label.setWordWrap(True)
        self.store_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.table)
        lay.addLayout(button_row(self.activate_button, self.revert_button))
        lay.addWidget(self.store_label)
        self.activate_button.clicked.connect(lambda: self.activate())
        self.revert_button.clicked.connect(lambda: self.revert())

    def refresh(self) -> None:
        """Re-read the store and fill the list (newest first, ★ = active)."""
        store = self._store()
        try:
            rows = _core.version_rows(store)
        except OSError as exc:
            notify_warning(f"the model versions could not be read: {exc}")
            rows = []
        self._rows = rows
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            worse = row.improved is False
            star, active = ("★ ", "  (active)") if row.active else ("", "")
            name = row.label or version_label(row.id)
            tip = row.id + active + (f"\ntask: {row.task}" if row.task else "")
            cells = [
                (star + name, tip),
                (
                    row.dice_text() + ("  ⚠" if worse else ""),
                    "held-out Dice of the parent → the new model"
                    + ("; it got worse" if worse else ""),
                ),
                (row.date, "created (UTC)"),
                (row.parent_text(), row.parent or ""),
            ]
            for c, (text, tip) in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(tip)
                item.setData(Qt.ItemDataRole.UserRole, row.id)
                self.table.setItem(r, c, item)
        self.activate_button.setEnabled(bool(rows))
        self.revert_button.setEnabled(bool(rows))
        self.store_label.setText(f"Versions are saved in {store.root}")

    def selected(self) -> str | None:
        """The id of the selected version, or None."""
        items = self.table.selectedItems()
        return items[0].data(Qt.ItemDataRole.UserRole) if items else None

    def select(self, vid: str) -> None:
        """Select the row of version ``vid``."""
        for r, row in enumerate(self._rows):
            if row.id == vid:
                self.table.selectRow(r)
                return

    def _made_active(self, model_id: str) -> None:
        self.refresh()
        self.hub.active_model_changed.emit(self._spec_of(model_id))

    @guarded("Activating the version")
    def activate(self, vid: str | None = None) -> None:
        """Make a version (the selected one by default) the active model everywhere."""
        vid = vid or self.selected()
        if vid is None:
            notify_info("select a version in the list first")
            return
        store = self._store()
        store.get(vid)  # a plain KeyError message if it is gone
        store.activate(vid)
        self._made_active(vid)
        self._say(f"{vid} is the active model.")
        notify_info(f"{vid} is now the active model")

    @guarded("Reverting to the parent model")
    def revert(self, vid: str | None = None) -> None:
        """Make the parent of a version (the selected one, else the active one) active."""
        store = self._store()
        vid = vid or self.selected() or store.active()
        if vid is None:
            notify_info("select a version in the list first")
            return
        try:
            parent = store.get(vid).parent
        except KeyError:
            notify_info(f"{vid} is not a fine-tuned version, so it has no parent here")
            return
        if not parent:
            notify_warning(f"the version {vid} does not record its parent")
            return
        try:
            _core.read_model_card(self._spec_of(parent))
        except Exception:
            notify_error(
                f"the model {vid} was trained from ({parent}) is not available any more, so "
                "it cannot be made active; choose another model or version"
            )
            return
        store.activate(parent)
        self._made_active(parent)
        self._say(f"Reverted: {parent} is the active model again.")
        notify_info(f"{parent} (the model {vid} was trained from) is active again")
