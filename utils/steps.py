"""The pipeline's steps as functions; the top-level scripts parse flags and call these."""
from __future__ import annotations

import json

import torch
from tqdm.auto import tqdm

from .attribution import STEP_MODES, Attributor
from .cli import common_parser, open_run, seed_everything
from .data import load_samples, samples_fingerprint
from .errors import PipelineError
from .labels import greedy_labels, label_batch_size
from .distributed import current_shard, lock_result_dir, map_samples, open_checkpoint, shard_device
from .io import DAMAGED, note, read_json, write_json
from .models import eos_token_ids, load_model_and_tokenizer, resolve_device, resolve_dtype
from .paths import ResultPaths
from .prompts import label_inputs, resolve_prompt_format
from .provenance import dtype_name, retire_previous_run, run_id_of, write_scores
from .sites import COMPONENTS


def create_folders(paths: ResultPaths) -> None:
    """Take the result folder's lock (a second process writing into it is refused), then create it."""
    lock_result_dir(paths.root)
    for folder in paths.folders():
        folder.mkdir(parents=True, exist_ok=True)


def generate_labels(paths: ResultPaths, *, model_name: str, dataset: str, num_data: int | None, device: str,
                    dtype: str, seed: int, prompt_format: str) -> dict:
    """Dense greedy labels (METHOD §2) -> ``labels.json``; returns its content.

    The settings include a fingerprint of the samples' content, so an edited dataset is a different run.
    Labels of a different run are replaced (said in one line before the work starts), and the previous
    run's score and sweep files are moved to ``previous_runs/`` so the folder holds one run only."""
    # every flag is checked, and the model loaded, before anything is written
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    samples = load_samples(dataset, num_data)
    seed_everything(seed)
    model, tokenizer = load_model_and_tokenizer(model_name, shard_device(torch_device), torch_dtype)
    fmt = resolve_prompt_format(prompt_format, tokenizer, getattr(model.config, "model_type", None))
    eos = eos_token_ids(model, tokenizer)
    settings = {"model": model_name, "dataset": dataset, "num_data": len(samples), "prompt_format": fmt,
                "dtype": dtype_name(dtype), "seed": seed, "samples_sha256": samples_fingerprint(samples),
                "max_new_tokens": "token length of each sample's reference answer", "eos_token_ids": eos}
    create_folders(paths)
    if current_shard().is_main:
        _announce_replacement(paths, settings)
    ckpt = open_checkpoint(paths.labels, json.dumps(settings, sort_keys=True))
    bar = tqdm(total=len(samples), desc="labels", unit="sample", disable=not current_shard().is_main)

    prompts, budgets = label_inputs(tokenizer, samples, fmt)
    shard, per_batch, pending = current_shard(), label_batch_size(model), {}

    def label_one(i):
        # samples are decoded a batch at a time (utils/labels.py: equal to batch-1 greedy decoding) but
        # still saved one by one, so an interrupted run resumes where it stopped
        if i not in pending:
            group = [j for j in range(i, len(samples)) if shard.owns(j) and not ckpt.done(j)][:per_batch]
            found = greedy_labels(model, [prompts[j] for j in group], [budgets[j] for j in group], eos,
                                  tokenizer.pad_token_id, batch_size=per_batch)
            pending.update(zip(group, found))
        label = pending.pop(i)
        bar.update(1)
        return {"prompt": prompts[i], "label": label, "text": tokenizer.decode(label, skip_special_tokens=True)}

    with bar:
        rows = map_samples(ckpt, len(samples), label_one, skipped=lambda i: bar.update(1))
    if rows is None:  # another process writes the file
        return None
    label_ids = [r["label"] for r in rows]
    content = {"labels": [r["text"] for r in rows], "label_token_ids": label_ids,
               "prompt_token_ids": [r["prompt"] for r in rows], "sample_ids": [s.id for s in samples],
               "questions": [s.question for s in samples], "references": [s.reference for s in samples],
               "settings": settings, "run_id": run_id_of(settings, label_ids)}
    # files of the run being replaced leave first: a crash in between leaves the old labels without their
    # scores (a later step says which to rerun), never new labels beside old scores
    retire_previous_run(paths, content["run_id"])
    write_json(paths.labels, content)
    ckpt.finish()
    return content


def _announce_replacement(paths: ResultPaths, settings: dict) -> None:
    """Say, before the work starts, that existing labels of other settings will be replaced."""
    if not paths.labels.is_file():
        return
    try:
        old = read_json(paths.labels)
        old_settings, old_id = old["settings"], old["run_id"]
    except (*DAMAGED, AttributeError):
        note(f"{paths.labels} is damaged; it will be replaced")
        return
    changed = [k for k in ("model", "dataset", "num_data", "samples_sha256", "prompt_format", "dtype", "seed")
               if old_settings.get(k, settings[k] if k == "samples_sha256" else None) != settings[k]]
    if "num_data" in changed and "samples_sha256" in changed:
        changed.remove("samples_sha256")   # other samples, of course
    if changed:
        what = ", ".join("dataset content" if k == "samples_sha256" else k for k in changed)
        note(f"{paths.labels} (run {old_id}: {old_settings.get('model')}, {old_settings.get('num_data')} samples) "
             f"will be replaced ({what} changed); its score and sweep files will move to "
             f"{paths.root / 'previous_runs' / str(old_id)}/")


def validate_score_flags(kinds, *, n_steps: int, batch_size: int, step_mode: str) -> None:
    """The attribution step's flags, checked before any work starts (also by run_pipeline.py)."""
    if "ig" in kinds and n_steps < 1:
        raise PipelineError(f"--n_steps must be at least 1 (got {n_steps})")
    if step_mode not in STEP_MODES:
        raise PipelineError(f"unknown --step_mode {step_mode!r}; choose {', '.join(STEP_MODES)}")
    if step_mode == "batched" and "ig" in kinds:
        raise PipelineError("--step_mode batched does not run integrated gradients; use auto or cached for ig")
    if batch_size is not None and batch_size < 1:
        raise PipelineError(f"--batch_size must be at least 1 (got {batch_size}); leave it out for the automatic size")


def compute_scores(run, kinds: list[str], *, components=COMPONENTS, ig_steps: int = 0, ig_batch_size: int | None = None,
                   producer: str, step_mode: str = "auto") -> None:
    """Score ``run.num_data`` samples and write one file per (kind, component).

    ``kinds`` is a subset of magnitude, gradient, gxo, ig; gradient/gxo also write the per-layer
    gradient norms (cor_gxo needs them).  ``step_mode`` (auto, cached, batched) picks how the steps of a
    sample run (utils/attribution.py); IG always runs cached.  ``ig_batch_size`` bounds the token positions of
    one forward/backward pass, for IG and for batched steps."""
    gradients = bool({"gradient", "gxo"} & set(kinds))
    validate_score_flags(kinds, n_steps=ig_steps, batch_size=ig_batch_size, step_mode=step_mode)
    out_kinds = list(kinds) + (["grad_norm"] if gradients else [])
    wanted = [f"{k}_{c}" for k in out_kinds for c in components]
    labels = run.labels
    key = json.dumps({"run_id": labels.run_id, "kinds": sorted(wanted), "n_steps": ig_steps,
                      "num_data": run.num_data})
    first = run.paths.score(out_kinds[0], components[0])
    ckpt = open_checkpoint(first.with_name(f".{'-'.join(sorted(kinds))}_{'-'.join(components)}"), key)
    with Attributor(run.model) as attributor:
        results = _score_samples(run, attributor, ckpt, wanted, gradients, ig_steps if "ig" in kinds else 0,
                                 ig_batch_size, step_mode, desc=f"{'+'.join(kinds)} scores")
    if results is None:  # another process writes the files
        return
    meta = {"run_id": labels.run_id, "settings": labels.settings, "num_samples": run.num_data,
            "n_steps": ig_steps if "ig" in kinds else None, "producer": producer,
            "layers": run.layout.num_layers, "heads": run.layout.num_heads,
            "neurons": run.layout.intermediate}
    for name in wanted:
        kind, comp = name.rsplit("_", 1)
        write_scores(run.paths.score(kind, comp), [r[name] for r in results], dict(meta, kind=kind, component=comp))
    ckpt.finish()


def _score_samples(run, attributor, ckpt, wanted, gradients, ig_steps, ig_batch_size, step_mode,
                   desc) -> list[dict]:
    """Score every sample not yet in ``ckpt`` (progress in tokens), saving each as it finishes."""
    labels = run.labels
    device = next(run.model.parameters()).device
    total_tokens = sum(len(labels.label_ids[i]) for i in range(run.num_data))
    with tqdm(total=total_tokens, desc=desc, unit="tok", disable=not current_shard().is_main) as bar:
        def score_one(i):
            bar.set_postfix(sample=f"{i + 1}/{run.num_data}")
            prompt = torch.tensor([labels.prompt_ids[i]], device=device)
            scores = attributor.score_sample(prompt, labels.label_ids[i], gradients=gradients,
                                             ig_steps=ig_steps, ig_batch_size=ig_batch_size,
                                             step_mode=step_mode,
                                             step_batch_size=attributor.position_budget(ig_batch_size),
                                             on_step=lambda: bar.update(1))
            return {name: scores[name] for name in wanted}

        return map_samples(ckpt, run.num_data, score_one, skipped=lambda i: bar.update(len(labels.label_ids[i])))


def magnitude_step(comp: str, script: str, description: str, defaults: dict, argv=None) -> None:
    """Mag_attention.py / Mag_mlp.py: magnitudes of one component for every labelled sample."""
    args = common_parser(description, defaults).parse_args(argv)
    run = open_run(args)
    compute_scores(run, ["magnitude"], components=(comp,), producer=script)
    if current_shard().is_main:
        print(f"wrote {run.paths.magnitude(comp)}")
