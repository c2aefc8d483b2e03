"""A magicgui value widget holding one integer per spatial axis."""

from __future__ import annotations

from functools import partial

from magicgui.widgets import CheckBox, Container, SpinBox


class AxisInts(Container):
    """One spin box per spatial axis, with a toggle that links them.

    ``value`` is a tuple with one int per shown axis; set it to an int (every axis, linked) or
    to one int per axis (unlinks them), like any magicgui value widget.
    """

    def __init__(self, label: str, value: int, minimum: int = 1, tooltip: str = ""):
        self.boxes = [
            SpinBox(value=value, min=minimum, max=100_000, label=a, tooltip=tooltip) for a in "zyx"
        ]
        self.linked = CheckBox(
            value=True, text="linked", tooltip="One value for every axis; untick to set them apart."
        )
        super().__init__(
            widgets=[*self.boxes, self.linked],
            layout="horizontal",
            label=label,
            labels=False,
            tooltip=tooltip,
        )
        for box in self.boxes:
            box.changed.connect(partial(self._on_box, box))
        self.set_axes(2)

    def set_axes(self, n: int):
        for i, box in enumerate(self.boxes):
            box.visible = i >= 3 - n
        self._n = n

    @property
    def n_axes(self) -> int:
        return self._n

    def set_value(self, values) -> None:
        """Set one value for every axis, or one per axis (which unlinks them)."""
        values = [int(values)] if isinstance(values, int) else [int(v) for v in values]
        if len(values) not in (1, self._n):
            raise ValueError(
                f"`{self.label}` takes 1 or {self._n} values (one per spatial axis), got {values}"
            )
        self.linked.value = len(values) == 1
        for box, v in zip(
            self.boxes[3 - self._n :], values * self._n if len(values) == 1 else values
        ):
            box.value = v

    def _on_box(self, source, value):
        if self.linked.value:
            for box in self.boxes:
                if box is not source and box.value != value:
                    box.value = value

    @property
    def value(self) -> tuple[int, ...]:
        return tuple(b.value for b in self.boxes[3 - self._n :])

    @value.setter
    def value(self, values) -> None:
        self.set_value(values)
