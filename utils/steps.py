"""The pipeline's steps as functions; the top-level scripts parse flags and call these."""
from __future__ import annotations

import json

import torch
from tqdm.auto import tqdm

from . import artifacts
from .attribution import Attributor
from .data import load_samples, samples_fingerprint
from .errors import PipelineError
from .labels import fit_positions, greedy_labels, label_batch_size
from .labelset import load_labels, new_labels, write_labels
from .distributed import current_shard, lock_result_dir, map_samples, open_checkpoint, shard_device
from .io import note
from .models import eos_token_ids, load_model_and_tokenizer, resolve_device, resolve_dtype, weights_fingerprint
from .paths import ResultPaths
from .prompts import label_inputs, resolve_prompt_format
from .provenance import dtype_name, retire_previous_run, retirement_folder, write_scores
from .run import open_run, seed_everything
from .sites import COMPONENTS


def create_folders(paths: ResultPaths) -> None:
    """Take the result folder's lock (a second process writing into it is refused), then create it."""
    lock_result_dir(paths.root)
    for folder in paths.folders():
        folder.mkdir(parents=True, exist_ok=True)


def generate_labels(paths: ResultPaths, *, model_name: str, dataset: str, num_data: int | None, device: str,
                    dtype: str, seed: int, prompt_format: str):
    """Dense greedy labels (METHOD §2) -> ``labels.json``; returns them (a LabelSet; None in the processes
    other than the first under torchrun).

    The settings include fingerprints of the samples' content and of the model's weights, so an edited
    dataset or replaced weights make a different run.
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
                "model_sha256": weights_fingerprint(model_name, model),
                "max_new_tokens": "token length of each sample's reference answer", "eos_token_ids": eos}
    prompts, budgets = label_inputs(tokenizer, samples, fmt)
    budgets = fit_positions(model, model_name, samples, prompts, budgets)   # before anything is written
    create_folders(paths)
    if current_shard().is_main:
        _announce_replacement(paths, settings)
    ckpt = open_checkpoint(paths.labels, json.dumps(settings, sort_keys=True))
    bar = tqdm(total=len(samples), desc="labels", unit="sample", disable=not current_shard().is_main)

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
    labels = new_labels(paths.labels, settings, texts=[r["text"] for r in rows], label_ids=[r["label"] for r in rows],
                        prompt_ids=[r["prompt"] for r in rows], samples=samples)
    # files of the run being replaced leave first: a crash in between leaves the old labels without their
    # scores (a later step says which to rerun), never new labels beside old scores
    retire_previous_run(paths, labels.run_id)
    write_labels(labels)
    ckpt.finish()
    return labels


def _announce_replacement(paths: ResultPaths, settings: dict) -> None:
    """Say, before the work starts, that existing labels of other settings will be replaced."""
    if not paths.labels.is_file():
        return
    try:
        old = load_labels(paths.labels)
    except PipelineError:
        note(f"{paths.labels} is damaged; it will be replaced")
        return
    old_settings, old_id = old.settings, old.run_id
    changed = [k for k in ("model", "model_sha256", "dataset", "num_data", "samples_sha256", "prompt_format",
                           "dtype", "seed")
               if old_settings.get(k, settings[k] if k == "samples_sha256" else None) != settings[k]]
    for implied, cause in (("samples_sha256", "num_data"), ("model_sha256", "model")):
        if implied in changed and cause in changed:
            changed.remove(implied)   # other samples, another model's weights: of course
    if changed:
        names = {"samples_sha256": "dataset content", "model_sha256": "model weights"}
        what = ", ".join(names.get(k, k) for k in changed)
        scores = [a for a in artifacts.SCORES.values() if (paths.root / a.path).is_file()]
        kinds = ", ".join(k for k in artifacts.SCORE_KINDS if any(a.kind == k for a in scores))
        swept = [f for f in paths.res.iterdir() if f.is_file() and not f.name.startswith(".")] \
            if paths.res.is_dir() else []
        moving = []
        if scores:
            moving.append(f"its {len(scores)} score file(s) ({kinds})")
        if swept:
            owner = "the" if scores else "its"
            moving.append(f"{owner} {len(swept)} sweep file(s) (curves, figures) in {paths.res}")
        where = retirement_folder(paths.root, old_id)
        tail = f"{' and '.join(moving)} will move to {where}/" if moving else "it has no score or sweep files yet"
        note(f"{paths.labels} (run {old_id}: {old_settings.get('model')}, {old_settings.get('num_data')} samples) "
             f"will be replaced ({what} changed); {tail}")


def compute_scores(run, kinds: list[str], *, components=COMPONENTS, ig_steps: int = 0, batch_size: int | None = None,
                   step_mode: str = "auto") -> None:
    """Score ``run.num_data`` samples and write one file per (kind, component).

    ``kinds`` is a subset of magnitude, gradient, gxo, ig; gradient/gxo also write the per-layer
    gradient norms (cor_gxo needs them).  ``step_mode`` (auto, cached, batched, prefix) picks how the
    steps of a sample run (utils/attribution.py: ``resolve_step_mode``); IG always runs cached.
    ``batch_size`` bounds the token positions of one forward/backward pass, for IG and for batched steps
    (None: automatic)."""
    gradients = any(artifacts.KINDS[k].computed_by == "backward" for k in kinds)
    out_kinds = list(kinds) + (["grad_norm"] if gradients else [])
    wanted = [artifacts.score(k, c) for k in out_kinds for c in components]
    labels = run.labels
    key = json.dumps({"run_id": labels.run_id, "kinds": sorted(a.name for a in wanted), "n_steps": ig_steps,
                      "num_data": run.num_data})
    first = run.paths.score(out_kinds[0], components[0])
    ckpt = open_checkpoint(first.with_name(f".{'-'.join(sorted(kinds))}_{'-'.join(components)}"), key)
    with Attributor(run.model) as attributor:
        results = _score_samples(run, attributor, ckpt, [a.name for a in wanted], gradients,
                                 ig_steps if "ig" in kinds else 0, batch_size, step_mode,
                                 desc=f"{'+'.join(kinds)} scores")
    if results is None:  # another process writes the files
        return
    for art in wanted:
        meta = {"run_id": labels.run_id, "settings": labels.settings, "num_samples": run.num_data,
                "n_steps": ig_steps if "ig" in kinds else None,
                "producer": artifacts.scores_command(kinds, art.component), "layers": run.layout.num_layers,
                "heads": run.layout.num_heads, "neurons": run.layout.intermediate, "kind": art.kind,
                "component": art.component}
        write_scores(run.paths.score(art.kind, art.component), [r[art.name] for r in results], meta)
    ckpt.finish()


def _score_samples(run, attributor, ckpt, wanted, gradients, ig_steps, batch_size, step_mode,
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
                                             ig_steps=ig_steps, batch_size=batch_size, step_mode=step_mode,
                                             on_step=lambda: bar.update(1))
            return {name: scores[name] for name in wanted}

        return map_samples(ckpt, run.num_data, score_one, skipped=lambda i: bar.update(len(labels.label_ids[i])))


def magnitude_step(args, component: str) -> None:
    """Mag_attention.py / Mag_mlp.py: the magnitudes of one component's units, for the run ``args`` names."""
    run = open_run(args)
    compute_scores(run, ["magnitude"], components=(component,))
    if current_shard().is_main:
        print(f"wrote {run.paths.score('magnitude', component)}")
