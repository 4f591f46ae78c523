"""The registry of what a run folder holds (METHOD §6): every artefact kind with its path relative to the
result folder, the step script that writes it, and its shape.  Paths, "rerun X.py" advice, the done
checks and the provenance all read these entries; no other module spells a file name or a script name.

Score files are addressed by (kind, component): kind is one of :data:`SCORE_KINDS` (each declared once in
:data:`KINDS`), component one of ``utils.sites.COMPONENTS``."""
from __future__ import annotations

from dataclasses import dataclass

from .sites import ATTN, COMPONENTS, MLP

# -- the step scripts (the library names them only through these) -----------------------------------------
FOLDERS_SCRIPT = "folder_creation.py"
LABELS_SCRIPT = "label_generation.py"
MAGNITUDE_SCRIPTS = {ATTN: "Mag_attention.py", MLP: "Mag_mlp.py"}
SCORES_SCRIPT = "attribution_attention.py"
SWEEP_SCRIPT = "main.py"
PREDICTOR_SCRIPT = "train_predictor.py"
PIPELINE_SCRIPT = "run_pipeline.py"

SWEEP_DIR = "res/both"
PREDICTOR_DIR = "predictor"     # <metric>.pt: one metric's trained predictors; <metric>.json: their report
RESULT_FILES = ("results.json", "results.csv", "per_sample.json")   # every sweep writes these three
EVAL_DIR = "eval"               # evaluate.py: results.json, .csv, the figure; tasks/, ppl/: one file per task, corpus


@dataclass(frozen=True)
class Artifact:
    name: str             # e.g. gxo_attention (also the key the attribution code returns its scores under)
    path: str             # relative to the result folder
    producer: str         # the command that writes it ("rerun <producer>")
    shape: str            # what it holds, for people
    kind: str | None = None
    component: str | None = None

    def expected_shape(self, layout):
        """``T -> shape`` of one sample's tensor with T label tokens (score files only)."""
        if KINDS[self.kind].per_layer:
            return lambda T: (T, layout.num_layers)
        units = layout.units(self.component)
        return lambda T: (T, layout.num_layers, units)


@dataclass(frozen=True)
class ScoreKind:
    """A per-token score the model computes (METHOD §3), declared once: where its files go, the command that
    writes them, and which pass of the attribution code computes it.  A metric's ranking reads kinds
    (utils/metric_registry.py); a new kind needs this declaration and its computation in utils/attribution.py."""
    name: str
    folder: str                 # relative to the result folder
    commands: dict              # {component: the command that writes this kind's file of that component}
    computed_by: str            # "forward" (activations), "backward" (one gradient per token), "ig" (IG passes)
    per_layer: bool = False     # one value per layer ([T, L]) instead of one per unit ([T, L, units])


def _scores_script(kind: str) -> dict:
    return {comp: f"{SCORES_SCRIPT} --metric {kind}" for comp in COMPONENTS}


KINDS = {k.name: k for k in (
    ScoreKind("magnitude", "magnitude", MAGNITUDE_SCRIPTS, "forward"),
    ScoreKind("gradient", "ig", _scores_script("gradient"), "backward"),
    ScoreKind("gxo", "ig", _scores_script("gxo"), "backward"),
    ScoreKind("ig", "ig", _scores_script("ig"), "ig"),
    # written whenever gradient or gxo is; its command names gxo, which cor_gxo (its reader) needs as well
    ScoreKind("grad_norm", "ig", _scores_script("gxo"), "backward", per_layer=True),
)}
SCORE_KINDS = tuple(KINDS)


def _score_entry(kind: ScoreKind, comp: str) -> Artifact:
    units = "H" if comp == ATTN else "I"
    dims = "[T, L]" if kind.per_layer else f"[T, L, {units}]"
    return Artifact(f"{kind.name}_{comp}", f"{kind.folder}/{kind.name}_{comp}_list.pt", kind.commands[comp],
                    f"list of float32 {dims} per sample", kind.name, comp)


LABELS = Artifact("labels", "labels.json", LABELS_SCRIPT,
                  "label texts and token ids, prompt token ids, sample ids, questions, references, settings, run_id")
SCORES = {(kind.name, comp): _score_entry(kind, comp) for kind in KINDS.values() for comp in COMPONENTS}
SWEEP_RESULTS = Artifact("results", f"{SWEEP_DIR}/results.json", SWEEP_SCRIPT,
                         "per metric, source and ratio: activation ratio and quality; written last")
REGISTRY = {a.name: a for a in (LABELS, *SCORES.values(), SWEEP_RESULTS)}


def score(kind: str, comp: str) -> Artifact:
    return SCORES[(kind, comp)]


def score_key(kind: str, comp: str) -> str:
    """The key of (kind, component) in the attribution code's per-sample score dicts: the artefact's name."""
    return SCORES[(kind, comp)].name


def score_folders() -> list[str]:
    """The folders score files live in (relative), in a fixed order."""
    return sorted({a.path.rsplit("/", 1)[0] for a in SCORES.values()})


def scores_command(kinds, comp: str) -> str:
    """The command that writes ``kinds`` of component ``comp`` (recorded as the files' ``producer``)."""
    if list(kinds) == ["magnitude"]:
        return MAGNITUDE_SCRIPTS[comp]
    return f"{SCORES_SCRIPT} --metric {' '.join(kinds)}"


def all_scores_hint() -> str:
    """Every script that writes score files, for "run ... first"."""
    return f"{', '.join(MAGNITUDE_SCRIPTS.values())} and {SCORES_SCRIPT}"
