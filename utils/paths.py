"""The result folder's layout (METHOD §6), from the artefact registry (utils/artifacts.py)."""
from __future__ import annotations

from pathlib import Path

from . import artifacts
from .data import dataset_short_name


def default_result_dir(dataset: str) -> Path:
    return Path("result") / dataset_short_name(dataset)


class ResultPaths:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.labels = self.root / artifacts.LABELS.path
        self.res = self.root / artifacts.SWEEP_DIR
        self.results = self.root / artifacts.SWEEP_RESULTS.path

    def score(self, kind: str, comp: str) -> Path:
        """``kind``: magnitude, gradient, gxo, ig or grad_norm."""
        return self.root / artifacts.score(kind, comp).path

    def predictor(self, metric: str) -> Path:
        """The ``predictor`` source's trained predictors of ``metric`` (``.json`` beside: their report)."""
        return self.root / artifacts.PREDICTOR_DIR / f"{metric}.pt"

    def folders(self) -> list[Path]:
        return [self.root / folder for folder in artifacts.score_folders()] + [self.res]
