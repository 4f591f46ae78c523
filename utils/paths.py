"""The result folder's layout (METHOD §6)."""
from __future__ import annotations

from pathlib import Path

from .data import dataset_short_name


def default_result_dir(dataset: str) -> Path:
    return Path("result") / dataset_short_name(dataset)


class ResultPaths:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.labels = self.root / "labels.json"
        self.res = self.root / "res" / "both"

    def magnitude(self, comp: str) -> Path:
        return self.root / "magnitude" / f"magnitude_{comp}_list.pt"

    def score(self, kind: str, comp: str) -> Path:
        """``kind``: magnitude, gradient, gxo, ig or grad_norm."""
        if kind == "magnitude":
            return self.magnitude(comp)
        return self.root / "ig" / f"{kind}_{comp}_list.pt"

    def folders(self) -> list[Path]:
        return [self.root / "ig", self.root / "magnitude", self.res]
