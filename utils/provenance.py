"""What produced each file, so that a later step refuses to combine files from different runs.

``labels.json`` (utils/labelset.py) holds the run's settings (among them the sha256 of the model's weights
and of the samples) and a ``run_id``.  Every score file ``X.pt`` has a ``X.meta.json`` beside it naming the
``run_id`` it was computed from and the sha256 of the ``.pt``'s own bytes; the ``.pt`` itself stays exactly
the released pipeline's layout (a list of float32 tensors).  The chain is METHOD §9's."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import artifacts
from .data import Sample, load_samples, samples_fingerprint
from .errors import PipelineError
from .fingerprint import sha256_file
from .io import DAMAGED, note, read_json, write_json, write_torch
from .labelset import LabelSet, load_labels
from .metric_registry import get_metric
from .models import model_fingerprint, resolve_dtype, weights_fingerprint
from .sites import COMPONENTS

PROVENANCE_KEYS = ("model", "dataset", "prompt_format", "dtype", "seed")


def dtype_name(dtype: str) -> str:
    """The name a run records for a ``--dtype`` (aliases resolved: fp32 -> float32)."""
    return str(resolve_dtype(dtype)).replace("torch.", "")


def first_mismatch(requested: dict, settings: dict):
    """The first ``(key, wanted, recorded)`` where ``requested`` contradicts a run's ``settings``; None if
    they agree.  A None request asks nothing; prompt_format auto matches what it resolved to."""
    for key, want in requested.items():
        if want is None or (key == "prompt_format" and want == "auto"):
            continue
        if key == "dtype":
            want = dtype_name(want)
        if str(want) != str(settings.get(key)):
            return key, want, settings.get(key)
    return None


def check_requested(requested: dict, labels: LabelSet) -> None:
    """Flags the user gave explicitly must agree with the run that made the labels (a dataset file by its
    samples' content, not its path)."""
    requested = {key: requested.get(key) for key in PROVENANCE_KEYS}
    if requested["dataset"] is not None and _is_file_dataset(requested["dataset"]):
        _check_dataset_content(requested.pop("dataset"), labels)
    mismatch = first_mismatch(requested, labels.settings)
    if mismatch is not None:
        key, want, have = mismatch
        raise PipelineError(f"--{'model_name' if key == 'model' else key} {want} differs from the run that "
                            f"made {labels.path} ({key} = {have}); drop the flag to use the labels' "
                            f"setting, or rerun {artifacts.LABELS.producer} with it")


def _is_file_dataset(dataset: str) -> bool:
    from .data import HUB_TRUTHFULQA, OFFLINE_TRUTHFULQA, XSUM

    return dataset not in (HUB_TRUTHFULQA, OFFLINE_TRUTHFULQA, XSUM)


def recorded_samples(labels: LabelSet) -> str:
    """The samples' fingerprint the labels record (computed from the samples they hold if they predate it)."""
    return labels.settings.get("samples_sha256") or samples_fingerprint(
        [Sample(i, q, r) for i, q, r in zip(labels.sample_ids, labels.questions, labels.references)])


def _check_dataset_content(dataset: str, labels: LabelSet) -> None:
    """``--dataset FILE`` given to a later step: its first samples must be those the labels were made from."""
    samples = load_samples(dataset)[:len(labels)]
    if len(samples) < len(labels) or samples_fingerprint(samples) != recorded_samples(labels):
        raise PipelineError(f"--dataset {dataset} does not hold the samples {labels.path} was made from (its first "
                            f"{len(labels)} samples' content differs from the run's, dataset "
                            f"{labels.settings.get('dataset')}); drop the flag to use the labels' samples, or rerun "
                            f"{artifacts.LABELS.producer} with it")


def check_weights(labels: LabelSet, model) -> None:
    """The model loaded for a later step must have the weights the labels were made with (a model folder
    whose files were replaced after the labels would score, or resume, another model's run)."""
    recorded = labels.settings.get("model_sha256")
    if recorded is None:      # labels from before the fingerprint was recorded: nothing to compare
        return
    now = weights_fingerprint(labels.settings["model"], model)
    if now != recorded:
        raise PipelineError(f"the weights of {labels.settings['model']} changed after {labels.path} was made "
                            f"(sha256 {recorded[:12]}, now {now[:12]}): its labels and scores belong to the old "
                            f"weights; rerun {artifacts.LABELS.producer} (run_pipeline.py redoes every step)")


def meta_path(path: Path) -> Path:
    return path.with_name(path.name[:-len(".pt")] + ".meta.json")


def write_scores(path: Path, tensors: list, meta: dict) -> None:
    """Write a score list and its provenance, which records the sha256 of the file's bytes (the meta goes
    last: a crash in between leaves no meta, which readers report as a file to regenerate)."""
    for i, t in enumerate(tensors):
        if not torch.isfinite(t).all():
            raise PipelineError(f"non-finite scores for sample {i} in {path.name}; the model overflowed "
                                "(try --dtype float32) and nothing was written")
    meta_path(path).unlink(missing_ok=True)
    write_torch(path, tensors)
    write_json(meta_path(path), {**meta, "sha256": sha256_file(path)})


def content_matches(path: Path, meta: dict) -> bool:
    """``path`` holds the bytes its meta records (not replaced, cut or emptied since it was written)."""
    return meta.get("sha256") is not None and sha256_file(path) == meta["sha256"]


def load_scores(path: Path, labels: LabelSet, expected_shape, producer: str) -> list:
    """Read a score list and check it belongs to ``labels`` and fits the model.

    ``expected_shape(T)`` gives the shape sample with T label tokens must have; ``producer`` names the
    command that writes the file (for the error message)."""
    if not path.is_file():
        raise PipelineError(f"missing {path}: run {producer} first")
    meta_file = meta_path(path)
    if not meta_file.is_file():
        raise PipelineError(f"{path} has no provenance file ({meta_file.name}); rerun {producer}")
    try:
        meta = read_json(meta_file)
        meta.get("run_id")
    except (*DAMAGED, AttributeError):
        raise PipelineError(f"{meta_file} is damaged (cannot be read); rerun {producer}") from None
    if meta.get("run_id") != labels.run_id:
        raise PipelineError(f"{path} was computed from other labels (run {meta.get('run_id')}, "
                            f"{meta.get('settings', {}).get('model')}) than {labels.path} (run {labels.run_id}, "
                            f"{labels.settings['model']}); rerun {producer}")
    try:
        tensors = torch.load(path, weights_only=True)
    except DAMAGED as err:
        raise PipelineError(f"{path} is damaged (cannot be read: {type(err).__name__}); rerun {producer}") from None
    if not isinstance(tensors, list) or len(tensors) > len(labels) or \
            not all(isinstance(t, torch.Tensor) for t in tensors):
        raise PipelineError(f"{path} does not hold one tensor per labelled sample; rerun {producer}")
    if meta.get("sha256") is None:
        raise PipelineError(f"{meta_file} records no content hash (written by an earlier version of the pipeline, "
                            f"so {path.name} cannot be checked); rerun {producer}")
    if not content_matches(path, meta) or len(tensors) != meta.get("num_samples"):
        # another run's file of the same shape, or this one cut or emptied: its meta no longer describes it
        raise PipelineError(f"{path} is not the file its {meta_file.name} describes ({len(tensors)} samples, "
                            f"content sha256 {sha256_file(path)[:12]}; the meta records {meta.get('num_samples')}, "
                            f"{str(meta.get('sha256'))[:12]}): it was replaced or changed after it was written; "
                            f"rerun {producer}")
    for i, t in enumerate(tensors):
        want = tuple(expected_shape(len(labels.label_ids[i])))
        if tuple(t.shape) != want:
            raise PipelineError(f"{path}: sample {i} has shape {tuple(t.shape)}, but this model and label need "
                                f"{want}; the file belongs to another model: rerun {producer}")
        if not torch.isfinite(t).all():
            raise PipelineError(f"{path}: sample {i} holds non-finite scores; rerun {producer} "
                                "(with --dtype float32 if it overflowed)")
    return tensors


# -- is a step already done? (run_pipeline.py skips finished steps when run again) ------------------------
def labels_done(path: Path, requested: dict) -> bool:
    """``labels.json`` is complete, readable, and was made with ``requested`` (model, dataset, num_data,
    dtype, seed, prompt_format, samples_sha256; a prompt_format of auto matches whatever it resolved to)."""
    if not path.is_file():
        return False
    try:
        labels = load_labels(path)
    except PipelineError:
        return False
    # the model's weights by content (a folder whose files were replaced is another model); labels from
    # before the fingerprint was recorded are not done
    if requested.get("model") is not None:
        requested = dict(requested, model_sha256=model_fingerprint(str(requested["model"])))
    have = dict(labels.settings, samples_sha256=recorded_samples(labels))
    return first_mismatch(requested, have) is None


def scores_done(path: Path, run_id: str, num_samples: int, n_steps: int | None = None) -> bool:
    """``path`` (a score file) is complete, readable and finite, from the run ``run_id``, for ``num_samples``
    samples (and, for IG, ``n_steps`` steps).  A damaged or non-finite file is not done: the pipeline
    recomputes it."""
    meta_file = meta_path(path)
    if not (path.is_file() and meta_file.is_file()):
        return False
    try:
        meta = read_json(meta_file)
        if not (meta.get("run_id") == run_id and meta.get("num_samples") == num_samples
                and (n_steps is None or meta.get("n_steps") == n_steps) and content_matches(path, meta)):
            return False
        tensors = torch.load(path, weights_only=True, mmap=True)   # mmap: a large file is not copied
    except (*DAMAGED, AttributeError):
        return False
    return (isinstance(tensors, list) and len(tensors) == num_samples
            and all(isinstance(t, torch.Tensor) and bool(torch.isfinite(t).all()) for t in tensors))


def score_fingerprints(paths, metrics) -> dict:
    """``{score file (relative): sha256 of its content}`` for every file ``metrics`` read: what a step that
    reads scores keys its saved samples on (new scores, e.g. IG with other steps, are other inputs)."""
    used = sorted({(kind, comp) for m in metrics for comp in COMPONENTS for kind in get_metric(m).kinds})
    return {str(paths.score(k, c).relative_to(paths.root)): sha256_file(paths.score(k, c)) for k, c in used}


# -- new labels replace a run: its files must not stay beside the new ones --------------------------------
PREVIOUS_RUNS = "previous_runs"


def _file_run_id(path: Path):
    """The labels run a result file was made from (None: unknown, e.g. no or damaged provenance)."""
    try:
        if path.suffix == ".pt":
            return read_json(meta_path(path)).get("run_id")
        data = read_json(path)
        if path.name in ("labels.json", "summary.json") or path.parent.name == artifacts.PREDICTOR_DIR:
            # the labels themselves; the attribution error's summary; a predictor's report
            return data.get("run_id")
        return (data.get("settings") or {}).get("labels_run_id")
    except (*DAMAGED, AttributeError):
        return None


def retirement_folder(root: Path, owner) -> Path:
    """A folder under ``previous_runs/`` that no earlier retirement used: ``<run_id>``, else
    ``<run_id>.2``, ``<run_id>.3``... (a run retired twice, A -> B -> A -> B, keeps both copies)."""
    base = root / PREVIOUS_RUNS / (owner or "unknown_run")
    folder, k = base, 1
    while folder.exists():
        k += 1
        folder = base.with_name(f"{base.name}.{k}")
    return folder


def _score_moves(paths, run_id: str) -> list:
    moves = []
    for folder in (paths.root / name for name in artifacts.score_folders()):
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*_list.pt")):
            owner = _file_run_id(f)
            if owner != run_id:
                moves += [(f, owner)] + ([(meta_path(f), owner)] if meta_path(f).is_file() else [])
        for f in sorted(folder.glob("*.meta.json")):        # provenance whose scores are gone
            if not f.with_name(f.name[:-len(".meta.json")] + ".pt").is_file():
                moves.append((f, _file_run_id(f.with_name(f.name[:-len(".meta.json")] + ".pt"))))
    return moves


def _folder_moves(folder: Path, record: Path, run_id: str, judge_json: bool) -> list:
    """The files of a result folder whose run is not ``run_id``.  ``record`` names the folder's run;
    with ``judge_json``, a JSON file that records its own labels run is judged by it instead."""
    if not folder.is_dir():
        return []
    overall = _file_run_id(record) if record.is_file() else None
    moves = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        own = _file_run_id(f) if judge_json and f.suffix == ".json" and f.name != "per_sample.json" else None
        owner = own or overall
        if owner != run_id:
            moves.append((f, owner))
    return moves


def _predictor_moves(folder: Path, run_id: str) -> list:
    """Trained predictors (``<metric>.pt``, whose ``<metric>.json`` report records their labels run) of
    other runs."""
    if not folder.is_dir():
        return []
    moves = []
    for f in sorted(folder.glob("*.pt")):
        report = f.with_suffix(".json")
        owner = _file_run_id(report) if report.is_file() else None
        if owner != run_id:
            moves += [(f, owner)] + ([(report, owner)] if report.is_file() else [])
    return moves


def _eval_moves(folder: Path, run_id: str) -> list:
    """evaluate.py's files (``eval/``, METHOD §11) of other runs: a saved task or corpus file (``tasks/``,
    ``ppl/``) judged by the labels run in its key, ``results.json`` by its settings, the others (``results.csv``,
    the figure) by ``results.json``'s run."""
    if not folder.is_dir():
        return []

    def own_run(f: Path):
        try:
            data = read_json(f)
            return (data.get("key") or {}).get("run_id") or (data.get("settings") or {}).get("labels_run_id")
        except (*DAMAGED, AttributeError):
            return None

    record = folder / "results.json"
    overall = own_run(record) if record.is_file() else None
    moves = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        owner = (own_run(f) if f.suffix == ".json" else None) or overall
        if owner != run_id:
            moves.append((f, owner))
    return moves


def retire_previous_run(paths, run_id: str) -> list[Path]:
    """Move every score, sweep, predictor, attribution-error and evaluation file under ``paths`` that does not
    belong to the labels run ``run_id`` into a fresh ``previous_runs/<their run_id>[.k]/`` (same sub-folders;
    nothing an earlier retirement kept is overwritten), copy the labels being replaced there too (they are what
    makes those files usable; the new labels replace the file itself atomically), drop other runs' saved
    samples, and say so in one line.  Returns the retired files' new paths."""
    from .attribution_error import OUTPUT_DIR     # the optional step's folder (it imports this module's peers)

    root = paths.root
    moves = _score_moves(paths, run_id)
    # files that record their labels run (results.json, <metric>.json) are judged by it; the others
    # (per_sample.json, results.csv, the figure) belong to whatever results.json belongs to
    moves += _folder_moves(paths.res, paths.results, run_id, judge_json=True)
    moves += _folder_moves(root / OUTPUT_DIR, root / OUTPUT_DIR / "summary.json", run_id, judge_json=False)
    moves += _predictor_moves(root / artifacts.PREDICTOR_DIR, run_id)
    moves += _eval_moves(root / artifacts.EVAL_DIR, run_id)
    old_labels = _file_run_id(paths.labels) if paths.labels.is_file() else run_id
    folders, moved = {}, []

    def destination(f: Path, owner) -> Path:
        if owner not in folders:
            folders[owner] = retirement_folder(root, owner)
        dst = folders[owner] / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst

    if old_labels != run_id:
        dst = destination(paths.labels, old_labels)
        shutil.copy2(paths.labels, dst)
        moved.append(dst)
    for f, owner in moves:
        dst = destination(f, owner)
        f.replace(dst)
        moved.append(dst)
    dropped = 0
    for parts in [*root.glob("*/*.parts"), *root.glob("res/*/*.parts"), *root.glob("*.parts")]:
        if parts.name == f"{artifacts.LABELS.path}.parts":   # the labels step's own checkpoint
            continue
        try:
            key = (parts / "key.txt").read_text()
        except (OSError, UnicodeDecodeError):
            key = ""
        if run_id not in key:
            shutil.rmtree(parts, ignore_errors=True)
            dropped += 1
    if moved or dropped:
        dropped_text = f" and dropped {dropped} folder(s) of their saved samples" if dropped else ""
        where = ", ".join(str(f.relative_to(root)) for f in folders.values())
        note(f"{paths.labels} now holds run {run_id}: moved {len(moved)} file(s) of earlier runs to "
             f"{where or root / PREVIOUS_RUNS}/{dropped_text}")
    return moved
