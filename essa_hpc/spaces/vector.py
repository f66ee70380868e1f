"""The vector space: a candidate row is the point itself (docs/design.md, "Search spaces").

``svd_lora`` (ESSA's singular values, mapped to the model by the backend's ``SvdLora`` view) and the
fake backend's analytic space are vector spaces: the optimizer owns the mean, nothing is applied to
the model after ``tell``, the optimizer's digest and state are the whole story, and export is the
PEFT adapter of a vector (``svd_lora.export_adapter``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class VectorSpace:
    """Rows are search vectors of length ``dim``; ``view`` is what the backend maps them with."""

    seeded = False
    export_name = "adapter"

    def __init__(self, name: str, dim: int, view: Any = None, export: Callable[[np.ndarray, Path], None] | None = None) -> None:
        self.name, self._dim, self._view, self._export = name, int(dim), view, export

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def exports(self) -> bool:
        """Whether ``export`` writes anything (the fake backend has no model)."""
        return self._export is not None

    def backend_view(self) -> Any:
        return self._view

    def apply(self, opt: Any) -> None:
        """The optimizer's mean is the point: nothing to move."""

    def digest(self) -> str:
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"search space {self.name}: the checkpoint holds a space state ({sorted(state)}), this space keeps none")

    def export(self, x: np.ndarray, out: Path) -> None:
        if self._export is not None:
            self._export(np.asarray(x, dtype=np.float64), out)
