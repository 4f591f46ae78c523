"""The sparsity sweep (METHOD §5, §7): for each sample, every requested metric x mask source x deactivation
ratio is decoded in one batch and scored teacher-forced; quality against the dense label and the
activation ratio are aggregated and written (utils/sweep_results.py).

A :class:`SweepRequest` is checked once (:func:`sweep_request`); :func:`plan_sweep` loads the scores,
calibrates the sources that need it and settles the curves (a :class:`SweepPlan`); :func:`run_sweep` hands
each sample to a :class:`SampleSweep`: its masks as a :class:`SampleJob`, their decoding, and its result
rows."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import artifacts
from .distributed import current_shard, map_samples, open_checkpoint
from .errors import PipelineError
from .fingerprint import sha256_file
from .generation import (cache_bytes_per_position, can_generate_many, decode_groups, decode_memory_budget,
                         masked_generate, masked_generate_many, prompt_state, token_masked_generate,
                         token_masked_generate_many)
from .masks import RankInputs, apply_layer_selection, check_ratios, kept_weight, layer_selection, unit_weights
from .metric_registry import check_metric_names, get_metric, metric_names
from .models import eos_token_ids
from .provenance import load_scores, score_fingerprints
from .quality import MEASURES, bleu, teacher_forced_quality, token_agreement
from .sites import ATTN, COMPONENTS, SiteHooks
from .sources import (DEFAULT_CALIB_NUM_DATA, calibrated_keep_scores, calibrated_sources, get_source,
                      parse_sources, source_keep_masks)
from .sweep_results import aggregate, sweep_settings, write_results
from .token_sources import build_maskers


@dataclass(frozen=True)
class SweepRequest:
    """The settings that define a sweep, checked and normalised by :func:`sweep_request`.  :meth:`recorded`
    is what ``results.json`` records and :func:`utils.sweep_results.sweep_done` compares."""
    metric_name: list           # ["all"] (every metric whose score files exist) or the metrics asked for
    sources: list               # in declaration order
    ratios: list
    mask_layers: object         # "all" or the layer indices masked
    cor_gxo_variant: str
    num_data: int | None        # None: every labelled sample
    calib_num_data: int | None  # calibration samples; None unless a source that needs them is asked for
    plot_metrics: list          # the quality measures plotted

    @property
    def explicit(self) -> bool:
        """Metrics named one by one: a missing score file is then an error, not a skip."""
        return self.metric_name != ["all"]

    @property
    def metrics(self) -> list[str]:
        """The metrics to load: those named, or every declared one for ``all``."""
        return list(self.metric_name) if self.explicit else list(metric_names())

    @property
    def layers(self):
        """The masked layers for :func:`utils.masks.layer_selection` (None: all)."""
        return None if self.mask_layers == "all" else self.mask_layers

    def recorded(self) -> dict:
        return asdict(self)


def sweep_request(metric_name, *, ratios, mask_layers=None, variant: str = "paper", sources=("oracle",),
                  num_data: int | None = None, calib_num_data: int | None = None,
                  plot_metrics=("bleu",)) -> SweepRequest:
    """The sweep a command asks for, checked.  ``metric_name``: a list of metrics, or ``["all"]`` (those whose
    files exist).  ``calib_num_data`` None: the default when a source that needs calibration is requested."""
    names = check_metric_names(metric_name, metric_names())
    sources = parse_sources(sources)
    plots = list(dict.fromkeys(plot_metrics))
    bad = [m for m in plots if m not in MEASURES]
    if bad or not plots:
        raise PipelineError(f"unknown --plot_metric {', '.join(bad)}; choose from {', '.join(MEASURES)}")
    if any(get_source(s).needs_calibration for s in sources):
        calib_num_data = DEFAULT_CALIB_NUM_DATA if calib_num_data is None else calib_num_data   # >= 1: main.py's flag
    elif calib_num_data is not None:
        which = " or ".join(calibrated_sources())
        raise PipelineError(f"--calib_num_data only applies to --source {which}; drop it or add {which}")
    return SweepRequest(metric_name=names, sources=sources, ratios=check_ratios(ratios),
                        mask_layers="all" if mask_layers is None else list(mask_layers), cor_gxo_variant=variant,
                        num_data=num_data, calib_num_data=calib_num_data, plot_metrics=plots)


def load_metric_scores(run, metric_names: list[str], explicit: bool) -> tuple[dict, list[str]]:
    """``({metric: {comp: {kind: list of tensors}}}, skipped metrics)``.  With ``explicit`` False
    (``--metric_name all``), a metric whose score files are *missing* is skipped with a note; a file that
    is there but damaged, from other labels, of the wrong shape or non-finite is an error naming it."""
    cache, out, skipped = {}, {}, []
    for metric in metric_names:
        needed = [artifacts.score(kind, comp) for comp in COMPONENTS for kind in get_metric(metric).kinds]
        missing = [a for a in needed if not run.paths.score(a.kind, a.component).is_file()]
        if missing and not explicit:
            print(f"note: skipping {metric}: {run.paths.score(missing[0].kind, missing[0].component)} is missing "
                  f"(run {missing[0].producer} to add it)", file=sys.stderr)
            skipped.append(metric)
            continue
        per = {}
        for a in needed:
            if a.name not in cache:
                cache[a.name] = load_scores(run.paths.score(a.kind, a.component), run.labels,
                                            a.expected_shape(run.layout), a.producer)
            per.setdefault(a.component, {})[a.kind] = cache[a.name]
        out[metric] = per
    if not out:
        raise PipelineError(f"no metric has its score files; run {artifacts.all_scores_hint()} first")
    return out, skipped


def metric_sample_count(per_metric: dict) -> int:
    return min(len(lst) for comp in per_metric.values() for lst in comp.values())


def check_calibration_samples(run, request: SweepRequest) -> list[str]:
    """The requested sources that read the calibration samples N .. N+M-1 (N = ``run.num_data``, M =
    ``calib_num_data``); refuses, in one line, labels holding fewer than N + M samples."""
    users = [s for s in request.sources if get_source(s).needs_calibration]
    if not users:
        return []
    N, M, labels, src = run.num_data, request.calib_num_data, run.labels, " and ".join(users)
    if N + M > len(labels):
        raise PipelineError(f"--source {src} calibrates on samples {N}..{N + M - 1} (after the {N} evaluated: "
                            f"--num_data {N}, --calib_num_data {M}), but {labels.path} holds {len(labels)}; "
                            f"give --num_data N with N + {M} <= {len(labels)}, lower --calib_num_data, or rerun "
                            f"{artifacts.LABELS.producer} --num_data {N + M} and the score steps")
    return users


def calibrate(run, request: SweepRequest, scores: dict, inputs: RankInputs) -> dict:
    """``{metric: {comp: [L, units]}}``: each metric's mean keep-score over the calibration samples
    N .. N+M-1 (N = the samples evaluated, M = ``calib_num_data``), when a requested source that masks from
    stored scores needs it; empty otherwise.  Every source that reads calibration samples needs them labelled.
    For ``all``, a metric whose score files hold too few samples is left out of those sources with a note."""
    users = check_calibration_samples(run, request)
    if not users:
        return {}
    N, M = run.num_data, request.calib_num_data
    users = [s for s in users if not get_source(s).per_token]
    src = " and ".join(users)
    out = {}
    for m in scores if users else []:
        have = metric_sample_count(scores[m])
        if have < N + M:
            msg = (f"--source {src} calibrates {m} on samples {N}..{N + M - 1}, but its score files hold "
                   f"{have} samples; rerun its score step with --num_data {N + M}, or lower --calib_num_data")
            if request.explicit:
                raise PipelineError(msg)
            for user in users:
                print(f"note: skipping {m}@{user}: {msg}", file=sys.stderr)
            continue
        out[m] = calibrated_keep_scores(scores[m], m, range(N, N + M), inputs)
    return out


def sample_keep_masks(per_metric: dict, metric: str, i: int, ratios, selected, inputs: RankInputs,
                      device=None, source: str = "oracle", calibrated=None) -> dict:
    """Bool keep-masks ``{comp: [R, T, L, units]}`` of one metric and mask source for sample ``i``; the
    keep-scores are ranked on ``device`` (the model's: sorting every step's and layer's scores is real
    work).  ``calibrated``: the metric's ``{comp: [L, units]}`` from :func:`calibrate`, for sources that
    need it."""
    out = {}
    for comp in COMPONENTS:
        rank = inputs.rank(metric, comp, {kind: lst[i].to(device) for kind, lst in per_metric[comp].items()})
        masks = source_keep_masks(source, rank, ratios, None if calibrated is None else calibrated[comp])
        out[comp] = apply_layer_selection(masks, selected)
    return out


def distinct_variants(keep: dict) -> tuple[list[int], list[int]]:
    """``(first, copy_of)``: the index of the first variant of each distinct mask (in order), and for every
    variant the position in ``first`` of the variant it equals.  ``keep[comp]``: bool ``[B, T, L, units]``;
    two variants are equal when every component's masks are."""
    first, copy_of, seen = [], [], {}
    flat = torch.cat([keep[c].reshape(keep[c].shape[0], -1) for c in COMPONENTS], dim=1).cpu()
    for b in range(flat.shape[0]):
        key = flat[b].numpy().tobytes()
        if key not in seen:
            seen[key] = len(first)
            first.append(b)
        copy_of.append(seen[key])
    return first, copy_of


GPU_SAMPLE_BATCH = 8   # samples decoded together on a GPU, where a pass costs its kernel launches: 8 x ~64
                       # variants is ~500 rows, still launch-bound for these models, and XSum's padded
                       # caches then take ~11 GB


def auto_sample_batch(device) -> int:
    """Samples the sweep decodes together by default: one on a CPU (arithmetic-bound, so batching saves
    nothing there and the padded attention would only add work), ``GPU_SAMPLE_BATCH`` on a GPU."""
    return GPU_SAMPLE_BATCH if torch.device(device).type == "cuda" else 1


@dataclass
class SampleJob:
    """One sample's masked variants, ready to decode.  ``active``: its (metric, source) pairs in curve order,
    each at every ratio.  Those of stored-score sources have their masks here (``unique``, ``copy_of``,
    ``kept``, ``total``: variant ``b`` of ``stored`` is (``stored[b // R]``, ratio ``b % R``)); those of per-token
    sources (``token``: {source: its metrics}) are chosen while decoding."""
    index: int
    active: list                # its (metric, source) pairs, in curve order
    label: list                 # the dense label's token ids
    prompt: torch.Tensor        # [1, P]
    stored: list                # the (metric, source) pairs masked from stored scores
    kept: torch.Tensor | None   # [V*R]: parameter weight each stored variant keeps over the masked steps
    total: torch.Tensor | None  # [V*R]: the weight of every unit over them
    unique: dict | None         # {comp: bool [D, T, L, units]}: the distinct masks, decoded and scored once
    copy_of: list               # per stored variant, its mask's index in ``unique``
    token: dict                 # {per-token source: [metric, ...]}
    state: tuple                # the dense prompt's first token and cache (utils.generation.prompt_state)


@dataclass
class SweepPlan:
    """What a sweep computes, settled before any sample runs (:func:`plan_sweep`)."""
    request: SweepRequest       # with the run's num_data
    scores: dict                # {metric: {comp: {kind: one tensor per sample}}}, the metrics with files
    skipped: list               # metrics left out for missing files (``all``)
    counts: dict                # {metric: samples it is evaluated on}
    variants: list              # the curves' (metric, source) pairs, in order
    inputs: RankInputs
    calibrated: dict            # {metric: {comp: [L, units]}} for the sources that need calibration
    selected: torch.Tensor      # [L]: the masked layers
    maskers: dict               # {per-token source: its masker (utils/token_masks.py)}, hooks attached

    def close(self) -> None:
        """Detach the per-token maskers' hooks."""
        for masker in self.maskers.values():
            masker.remove()


def plan_sweep(run, request: SweepRequest) -> SweepPlan:
    """Load the requested metrics' scores and settle the curves: every source for every metric with files,
    except a calibrated source for a metric that cannot be calibrated and a per-token source for a metric it
    cannot use; build the per-token sources' maskers (calibrated or loaded)."""
    request = replace(request, num_data=run.num_data)
    check_something_to_evaluate(run.labels.label_ids[:run.num_data], run.labels.path)
    scores, skipped = load_metric_scores(run, request.metrics, request.explicit)
    metrics = list(scores)
    counts = {m: min(run.num_data, metric_sample_count(scores[m])) for m in metrics}
    selected = layer_selection(request.layers, run.layout.num_layers)
    inputs = RankInputs.of(run.layout, metrics, request.cor_gxo_variant)
    calibrated = calibrate(run, request, scores, inputs)
    weights = unit_weights(run.layout)
    maskers, covered = build_maskers([s for s in request.sources if get_source(s).per_token],
                                     lambda src: get_source(src).masker(run, request, metrics, selected, weights))
    # the curves, in order: sources outer (oracle first: the curves of the oracle-only sweeps), metrics inner
    variants = []
    for src in request.sources:
        source = get_source(src)
        usable = covered[src] if source.per_token else [m for m in metrics if not source.needs_calibration
                                                        or m in calibrated]
        variants += [(m, src) for m in usable]
    if not variants:
        for masker in maskers.values():
            masker.remove()
        raise PipelineError(f"--source {' '.join(request.sources)} has no curve to evaluate for --metric_name "
                            f"{' '.join(request.metric_name)} (see the notes above)")
    return SweepPlan(request, scores, skipped, counts, variants, inputs, calibrated, selected, maskers)


def check_something_to_evaluate(label_ids: list, where) -> None:
    """Refuse, before anything is replaced, a sweep whose evaluated labels are all empty: every sample would
    be skipped and every curve would be NaN."""
    if label_ids and not any(label_ids):
        raise PipelineError(f"all {len(label_ids)} evaluated labels in {where} are empty (the model's first token "
                            "was its end-of-sequence token), so nothing can be evaluated; try another "
                            "--prompt_format, model or dataset, and rerun label_generation.py")


class SampleSweep:
    """The sweep of a group of samples: each one's :class:`SampleJob`, the decoding of the jobs (several
    samples per batch where allowed) and each sample's result rows."""

    def __init__(self, run, hooks: SiteHooks, plan: SweepPlan, batch_size: int):
        self.run, self.hooks, self.plan, self.batch_size = run, hooks, plan, batch_size
        self.ratios = plan.request.ratios
        self.weights = unit_weights(run.layout)
        self.eos = run.labels.settings.get("eos_token_ids") or eos_token_ids(run.model, run.tokenizer)
        self.device = next(run.model.parameters()).device

    def __call__(self, indices: list[int], bar) -> list[list[dict]]:
        """The result rows of each sample in ``indices`` (none for a sample with nothing to decode)."""
        jobs = {i: self.job(i) for i in indices}
        live = [job for job in jobs.values() if job is not None and job.unique is not None]
        decoded = dict(zip((j.index for j in live), self.decode(live))) if live else {}
        token = self.decode_token([job for job in jobs.values() if job is not None and job.token])
        out = []
        for i in indices:
            out.append(self.rows(jobs[i], decoded.get(i, []), token.get(i, {})) if jobs[i] is not None else [])
            bar.update(1)
        return out

    def job(self, i: int) -> SampleJob | None:
        """Sample i's distinct stored masks, per-token variants and dense prompt state (None: nothing to
        decode)."""
        plan, labels = self.plan, self.run.labels
        active = [(m, src) for m, src in plan.variants if i < plan.counts[m]]
        label = labels.label_ids[i]
        if not (active and label):
            return None
        stored = [(m, src) for m, src in active if not get_source(src).per_token]
        token = {}
        for m, src in active:
            if get_source(src).per_token:
                token.setdefault(src, []).append(m)
        prompt = torch.tensor([labels.prompt_ids[i]])
        job = SampleJob(index=i, active=active, label=label, prompt=prompt, stored=stored, kept=None, total=None,
                        unique=None, copy_of=[], token=token, state=prompt_state(self.run.model, prompt))
        if stored:
            masks = [sample_keep_masks(plan.scores[m], m, i, self.ratios, plan.selected, plan.inputs, self.device,
                                       source=src, calibrated=plan.calibrated.get(m))
                     for m, src in stored]
            keep = {c: torch.cat([mk[c] for mk in masks]) for c in COMPONENTS}   # [V*R, T, L, U]
            job.kept, job.total = kept_weight(keep, self.weights)
            # variants with the same masks (every metric at ratio 0, for one) decode and score once
            first, job.copy_of = distinct_variants(keep)
            job.unique = {c: keep[c][first] for c in COMPONENTS}
        return job

    def decode(self, jobs: list[SampleJob]) -> list[list]:
        """Each job's distinct stored variants decoded: several samples in one batch where allowed, in groups
        whose padded caches fit the device's memory."""
        model = self.run.model
        jobs = [j for j in jobs if j.unique is not None]
        if len(jobs) < 2 or not can_generate_many(model, [j.prompt.shape[1] for j in jobs],
                                                  [len(j.label) for j in jobs]):
            return [self._decode_alone(j) for j in jobs]
        sizes = [(j.unique[ATTN].shape[0], j.prompt.shape[1] + len(j.label), cache_bytes_per_position(j.state[1]))
                 for j in jobs]
        decoded = []
        for group in decode_groups(sizes, decode_memory_budget(self.device)):
            part = [jobs[g] for g in group]
            if len(part) == 1:
                decoded.append(self._decode_alone(part[0]))
                continue
            decoded.extend(masked_generate_many(model, self.hooks, [j.state for j in part], [j.unique for j in part],
                                                self.eos, [len(j.label) for j in part]))
        return decoded

    def _decode_alone(self, job: SampleJob) -> list:
        step = self.batch_size if self.batch_size > 0 else len(job.copy_of)
        decoded = []
        for s in range(0, job.unique[ATTN].shape[0], step):
            part = {c: job.unique[c][s:s + step] for c in COMPONENTS}
            decoded.extend(masked_generate(self.run.model, self.hooks, job.prompt, part, self.eos, len(job.label),
                                           state=job.state))
        return decoded

    def _token_rows(self, job: SampleJob, src: str) -> tuple[list, list]:
        """The (variant, ratio) rows of a per-token source's curves of this sample: metric-major, like the
        stored variants."""
        masker = self.plan.maskers[src]
        variants = [masker.variants.index(m) for m in job.token[src] for _ in self.ratios]
        return variants, [float(p) for _ in job.token[src] for p in self.ratios]

    def decode_token(self, jobs: list[SampleJob]) -> dict:
        """Every per-token source's variants of ``jobs``: ``{sample: {(metric, source, ratio index): (tokens,
        kept weight, total weight)}}``; several samples in one batch where allowed, as for stored masks."""
        model, R = self.run.model, len(self.ratios)
        out = {j.index: {} for j in jobs}
        for src, masker in self.plan.maskers.items():
            part = [j for j in jobs if src in j.token]
            decoded = {}
            if len(part) >= 2 and self.batch_size <= 0 and can_generate_many(
                    model, [j.prompt.shape[1] for j in part], [len(j.label) for j in part]):
                sizes = [(len(self._token_rows(j, src)[0]), j.prompt.shape[1] + len(j.label),
                          cache_bytes_per_position(j.state[1])) for j in part]
                for group in decode_groups(sizes, decode_memory_budget(self.device)):
                    js = [part[g] for g in group]
                    found = token_masked_generate_many(model, masker, [j.state for j in js],
                                                       [self._token_rows(j, src) for j in js], self.eos,
                                                       [len(j.label) for j in js])
                    decoded.update({j.index: f for j, f in zip(js, found)})
            else:
                for j in part:
                    decoded[j.index] = self._token_alone(j, src)
            for j in part:
                ids, kept, total = decoded[j.index]
                metrics = [m for m in j.token[src] for _ in self.ratios]
                out[j.index].update({(m, src, b % R): (ids[b], kept[b], total[b]) for b, m in enumerate(metrics)})
        return out

    def _token_alone(self, job: SampleJob, src: str) -> tuple:
        variants, ratios = self._token_rows(job, src)
        step = self.batch_size if self.batch_size > 0 else len(variants)
        ids, kept, total = [], [], []
        for s in range(0, len(variants), step):
            part = token_masked_generate(self.run.model, self.plan.maskers[src], job.prompt, variants[s:s + step],
                                         ratios[s:s + step], self.eos, len(job.label), state=job.state)
            ids += part[0]
            kept.append(part[1])
            total.append(part[2])
        return ids, torch.cat(kept), torch.cat(total)

    def _token_quality(self, job: SampleJob, src: str) -> dict:
        """``{(metric, source, ratio index): {"kl", "nll"} or None}``: teacher-forced, the masker choosing
        every label position's masks."""
        R = len(self.ratios)
        quality = teacher_forced_quality(self.run.model, self.hooks, job.prompt, job.label, None, self.batch_size,
                                         prompt_cache=job.state[1], masker=self.plan.maskers[src],
                                         rows=self._token_rows(job, src))
        metrics = [m for m in job.token[src] for _ in self.ratios]
        return {(m, src, b % R): None if quality is None else {k: v[b] for k, v in quality.items()}
                for b, m in enumerate(metrics)}

    def rows(self, job: SampleJob, decoded: list, token: dict) -> list[dict]:
        """One row per variant: its output, quality against the dense label and kept weight.  ``decoded``: the
        stored variants' tokens; ``token``: the per-token variants' (:meth:`decode_token`)."""
        run, R = self.run, len(self.ratios)
        found = {}
        if job.stored:
            quality = teacher_forced_quality(run.model, self.hooks, job.prompt, job.label, job.unique,
                                             self.batch_size, prompt_cache=job.state[1])
            for b, j in enumerate(job.copy_of):
                found[job.stored[b // R] + (b % R,)] = (decoded[j], job.kept[b], job.total[b], None if quality is None
                                                        else {k: v[j] for k, v in quality.items()})
        for src in job.token:
            for key, q in self._token_quality(job, src).items():
                found[key] = token[key] + (q,)
        rows = []
        for metric, src in job.active:
            for r, p in enumerate(self.ratios):
                ids, kept, total, quality = found[(metric, src, r)]
                text = run.tokenizer.decode(ids, skip_special_tokens=True)
                rows.append({"sample": job.index, "metric": metric, "source": src, "ratio": float(p),
                             "bleu": bleu(text, run.labels.texts[job.index]),
                             "token_agreement": token_agreement(ids, job.label),
                             "kl": None if quality is None else float(quality["kl"]),
                             "ppl": None if quality is None else math.exp(float(quality["nll"])),
                             "masked_steps": len(job.label) - 1,
                             "kept_weight": float(kept), "total_weight": float(total),
                             "output": text})
        return rows


def run_sweep(run, request: SweepRequest, *, batch_size: int = 0, sample_batch: int = 0) -> dict | None:
    """Masked generation of every sample for every (metric, source, ratio); returns and writes the results
    (None in the processes other than the first under torchrun).

    ``batch_size``: masked variants per forward (0: all of a sample's).  ``sample_batch``: samples decoded
    together (0: :func:`auto_sample_batch`); with a ``batch_size`` given, one sample at a time."""
    plan = plan_sweep(run, request)
    request = plan.request
    predictors = sorted({str(run.paths.predictor(m)) for m, src in plan.variants if src == "predictor"})
    # a predictor retrained while the sweep was interrupted makes its saved samples stale
    key = json.dumps({"run_id": run.labels.run_id, "variants": plan.variants, "counts": plan.counts,
                      "request": request.recorded(), "quality": list(MEASURES),
                      "scores": score_fingerprints(run.paths, list(plan.scores)),   # their content, not path
                      "predictors": {p: sha256_file(p) for p in predictors}})
    ckpt = open_checkpoint(run.paths.res / ".sweep", key)
    device = next(run.model.parameters()).device
    group = 1 if batch_size > 0 else sample_batch if sample_batch > 0 else auto_sample_batch(device)
    hooks = SiteHooks(run.model, run.layout)
    sweep = SampleSweep(run, hooks, plan, batch_size)
    bar = tqdm(total=run.num_data, desc="sweep", unit="sample", disable=not current_shard().is_main)
    try:
        with bar:
            per_sample = map_samples(ckpt, run.num_data, lambda indices: sweep(indices, bar),
                                     skipped=lambda i: bar.update(1), group=group)
    finally:
        hooks.remove()
        plan.close()
    if per_sample is None:  # another process writes the results
        return None
    rows = [row for sample_rows in per_sample for row in sample_rows]
    results = aggregate(rows, plan.variants, request.ratios, plan.counts)
    results["settings"] = sweep_settings(run, request, list(plan.scores), plan.skipped, sweep.weights,
                                         [Path(p) for p in predictors])
    results["settings"]["per_token"] = {src: masker.describe() for src, masker in plan.maskers.items()}
    write_results(run.paths.res, results, rows, request.plot_metrics)
    ckpt.finish()
    return results
