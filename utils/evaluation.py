"""The evaluation step (METHOD §11): multiple-choice accuracy through lm-evaluation-harness and perplexity of
held-out text, for the dense model and under label-free masks at each metric and deactivation ratio: one mask
per request or calibrated (``static``, ``prompt``), or chosen per token inside the masked forward by a masker
of utils/token_masks.py (``online``, ``predictor``, ``teal``).

Where a mask acts.  A multiple-choice request is a context and a continuation per choice.  The context's
positions except its last run dense (one KV cache per request, shared by every choice and mask); the mask
acts at every position whose output is scored: the context's last position (it predicts the first
continuation token) and the continuation's tokens except the last.  Perplexity scores every position, so
the mask acts at all of them.  A per-token masker decides each of those positions' masks from what the
masked model has computed at that position (as in the sweep's teacher-forced pass).

lm-eval drives :class:`HarnessLM` once per variant (dense, then each metric x source x ratio): the first
call scores every variant of every request in one pass over the data (:meth:`MaskBook.loglikelihoods`),
the later calls read the table, so lm-eval's own aggregation and standard errors apply to each variant."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import PipelineError
from .kv_cache import cache_argument_name, forward_kwargs, output_cache, repeated_cache
from .masks import apply_layer_selection, unit_weights
from .metric_registry import get_metric
from .quality import logits_budget
from .sites import COMPONENTS
from .sources import prompt_scores, source_keep_masks

EVAL_SOURCES = ("static", "prompt", "online", "predictor", "teal")   # label-free; oracle needs the model's answer
PPL_SOURCES = ("static", "online", "predictor", "teal")   # a held-out text has no request for ``prompt``


@dataclass(frozen=True)
class Variant:
    """One evaluated model: dense (``metric`` None), or a metric's mask from a source at a ratio."""
    metric: str | None = None
    source: str | None = None
    ratio: float | None = None

    @property
    def curve(self) -> str:
        return "dense" if self.metric is None else f"{self.metric}@{self.source}"

    def as_dict(self) -> dict:
        return {"curve": self.curve, "metric": self.metric, "source": self.source, "ratio": self.ratio}


def kept_share(keep: dict, weights) -> float:
    """Share of the maskable parameter weight a mask ``{comp: bool [L, units]}`` keeps (METHOD §5's weights)."""
    heads, neurons = keep[COMPONENTS[0]], keep[COMPONENTS[1]]
    kept = heads.sum().item() * weights.head + neurons.sum().item() * weights.neuron
    return kept / (heads.shape[0] * weights.layer_total)


@dataclass(frozen=True)
class TokenRow:
    """A per-token variant's batch row: its masker (utils/token_masks.py), which of the masker's variants
    (the metric, or the predictor trained on it) and the deactivation ratio.  The masker chooses the masks of
    every position of the row's passes."""
    masker: object
    variant: int
    ratio: float

    def position_weight(self) -> float:
        """The full weight of one position, every layer counted (the kept share's denominator)."""
        return self.masker.layout.num_layers * self.masker.layer_weight()


class MaskBook:
    """Each variant's mask for a request's context: None (dense); ``{comp: bool [L, units]}``, the calibrated
    one for ``static`` or, for ``prompt``, the ranking of the context's own prompt step
    (utils.sources.prompt_scores), computed once per context and metric; or a :class:`TokenRow` for a per-token
    source (``maskers``: ``{source: masker}``).  Scores requests and texts under them
    (:meth:`loglikelihoods`, :meth:`text_nll`) and records each variant's kept weight: a one-mask variant's
    kept share once per request, a per-token variant's weight kept at every position where its masks act
    (:meth:`activation_ratio`)."""

    def __init__(self, model, hooks, layout, variants: list, *, calibrated: dict | None = None, selected=None,
                 cor_gxo_variant: str = "paper", maskers: dict | None = None):
        self.model, self.hooks, self.layout, self.variants = model, hooks, layout, variants
        self.calibrated, self.cor_gxo_variant = calibrated or {}, cor_gxo_variant
        self.selected = selected if selected is not None else torch.ones(layout.num_layers, dtype=torch.bool)
        self.weights = unit_weights(layout)
        self.reset()
        self._static = {}
        self._attributor = None
        self._rows = {}
        maskers = maskers or {}
        for i, v in enumerate(variants):
            if v.source == "prompt" and "ig" in {k for k in get_metric(v.metric).kinds}:
                raise PipelineError(f"--source prompt with the {v.metric} metric would run integrated gradients "
                                    "for every request; use it with --source static")
            if v.source in maskers:
                masker = maskers[v.source]
                if v.metric not in masker.variants:
                    raise PipelineError(f"--source {v.source} has no {v.metric} variant (it has "
                                        f"{', '.join(masker.variants)}); drop {v.metric} or that source")
                self._rows[i] = TokenRow(masker, masker.variants.index(v.metric), float(v.ratio))

    def reset(self) -> None:
        """Forget the kept weight recorded so far (a new task or corpus)."""
        self._kept = [0.0] * len(self.variants)
        self._total = [0.0] * len(self.variants)

    def _masks(self, source: str, rank: dict, ratio: float, calibrated=None) -> dict:
        out = {}
        for comp in COMPONENTS:
            masks = source_keep_masks(source, rank[comp][None], [ratio],
                                      None if calibrated is None else calibrated[comp])   # [1, 1, L, units]
            out[comp] = apply_layer_selection(masks[0, 0], self.selected).cpu()
        return out

    def masks(self, context: list[int]) -> list:
        """Each variant's mask for ``context``; records the one-mask variants' kept shares."""
        prompt_ranks = {}
        out = []
        for i, v in enumerate(self.variants):
            if i in self._rows:
                out.append(self._rows[i])      # its kept weight is counted where it is scored
                continue
            if v.metric is None:
                keep = None
            elif v.source == "static":
                key = (v.metric, v.ratio)
                if key not in self._static:
                    cal = self.calibrated[v.metric]
                    zeros = {c: torch.zeros_like(cal[c]) for c in COMPONENTS}
                    self._static[key] = self._masks("static", zeros, v.ratio, cal)
                keep = self._static[key]
            elif v.source == "prompt":
                if v.metric not in prompt_ranks:
                    prompt_ranks[v.metric] = prompt_scores(self.model, torch.tensor([context]), v.metric,
                                                           variant=self.cor_gxo_variant,
                                                           attributor=self.attributor())
                keep = self._masks("prompt", prompt_ranks[v.metric], v.ratio)
            else:
                raise PipelineError(f"--source {v.source} does not apply to the evaluation; choose from "
                                    f"{', '.join(EVAL_SOURCES)}")
            self._kept[i] += 1.0 if keep is None else kept_share(keep, self.weights)
            self._total[i] += 1.0
            out.append(keep)
        return out

    def _count_rows(self, masks: list, kept: torch.Tensor, positions: int) -> None:
        for i, m in enumerate(masks):
            if isinstance(m, TokenRow):
                self._kept[i] += float(kept[i].sum())
                self._total[i] += positions * m.position_weight()

    def loglikelihoods(self, context: list[int], continuations: list[list[int]]):
        """:func:`choice_loglikelihoods` of one request under every variant's mask, kept weight recorded."""
        masks = self.masks(context)
        ll, greedy, kept = choice_loglikelihoods(self.model, self.hooks, context, continuations, masks)
        self._count_rows(masks, kept, sum(len(c) for c in continuations))
        return ll, greedy

    def text_nll(self, ids: list[int], masks: list) -> torch.Tensor:
        """:func:`text_nll` of one text under ``masks`` (this book's :meth:`masks`, which for the sources of
        perplexity do not depend on the text), kept weight recorded."""
        nll, kept = text_nll(self.model, self.hooks, ids, masks)
        self._count_rows(masks, kept, max(len(ids) - 1, 0))
        return nll

    def attributor(self):
        if self._attributor is None:
            from .attribution import Attributor
            self._attributor = Attributor(self.model, self.hooks)
        return self._attributor

    def activation_ratio(self, i: int) -> float:
        """Variant i's kept share of the maskable weight: a one-mask variant's mean over the requests scored
        so far (a static mask's own share); a per-token variant's weight kept over the full weight of every
        position where its masks acted, token-weighted (METHOD §11)."""
        return float(self._kept[i] / self._total[i]) if self._total[i] else 1.0


def _stack_masks(masks: list, layout) -> dict | None:
    """``{comp: float [B, L, units]}`` for :class:`~utils.sites.SiteHooks` (a dense row keeps all); None
    when every row is dense."""
    if all(m is None for m in masks):
        return None
    out = {}
    for comp in COMPONENTS:
        full = torch.ones(layout.num_layers, layout.units(comp), dtype=torch.bool)
        out[comp] = torch.stack([full if m is None else m[comp] for m in masks])
    return out


def _rows_per_pass(device, length: int, vocab: int) -> int:
    return max(1, logits_budget(device) // max(1, length * vocab))


def _token_groups(masks: list) -> list:
    """``[(masker, [variant index, ...])]``: the :class:`TokenRow` variants of ``masks``, per masker."""
    groups = {}
    for v, m in enumerate(masks):
        if isinstance(m, TokenRow):
            groups.setdefault(id(m.masker), (m.masker, []))[1].append(v)
    return list(groups.values())


@torch.no_grad()
def choice_loglikelihoods(model, hooks, context: list[int], continuations: list[list[int]], masks: list):
    """Log-likelihood of each continuation after ``context`` under each mask: ``(ll, greedy, kept)``, float64
    ``[V, K]``, bool ``[V, K]`` (greedy: every continuation token is the argmax) and float64 ``[V, K]``, for
    ``masks`` a list of V entries: None (dense), ``{comp: bool [L, units]}``, or a :class:`TokenRow` (its
    masker chooses each position's masks; ``kept``: the weight it kept over the row's positions, 0 for the
    other entries).  The context's positions but the last run dense once; each (mask, choice) row runs the
    context's last token and the continuation's tokens but the last against that cache, masked."""
    if not context or any(not c for c in continuations):
        raise PipelineError("a request with an empty context or continuation cannot be scored")
    device = next(model.parameters()).device
    cache_name = cache_argument_name(model)
    prefix = torch.tensor([context[:-1]], device=device)
    cache = output_cache(model(**forward_kwargs(cache_name, prefix))) if prefix.shape[1] else None
    V, K = len(masks), len(continuations)
    width = max(len(c) for c in continuations)
    inputs = torch.zeros(K, width, dtype=torch.long)
    for k, cont in enumerate(continuations):
        inputs[k, :len(cont)] = torch.tensor([context[-1]] + cont[:-1])   # right-padded: causal, never read
    ll = torch.zeros(V, K, dtype=torch.float64)
    greedy = torch.zeros(V, K, dtype=torch.bool)
    kept = torch.zeros(V, K, dtype=torch.float64)
    vocab = model.get_output_embeddings().weight.shape[0]

    def run(part, length, setting):
        ids = inputs[[k for _, k in part], :length].to(device)
        kwargs = forward_kwargs(cache_name, ids, None if cache is None else repeated_cache(cache, len(part)))
        with setting:
            logits = model(**kwargs).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for r, (v, k) in enumerate(part):
            target = torch.tensor(continuations[k], device=device)
            lp = logp[r, :len(target)]
            ll[v, k] = lp.gather(-1, target[:, None]).sum().double().item()
            greedy[v, k] = bool((lp.argmax(-1) == target).all())

    rows = [(v, k) for v in range(V) if not isinstance(masks[v], TokenRow) for k in range(K)]
    step = _rows_per_pass(device, width, vocab)
    for s in range(0, len(rows), step):
        part = rows[s:s + step]
        run(part, width, hooks.settings(masks=_stack_masks([masks[v] for v, _ in part], hooks.layout)))
    # per-token rows: no padding (the masker counts every position of a pass), so one length per pass
    for masker, variants in _token_groups(masks):
        for length in sorted({len(c) for c in continuations}):
            rows = [(v, k) for k in range(K) if len(continuations[k]) == length for v in variants]
            step = _rows_per_pass(device, length, vocab)
            for s in range(0, len(rows), step):
                part = rows[s:s + step]
                rows_of = masker.rows([masks[v].variant for v, _ in part], [masks[v].ratio for v, _ in part])
                run(part, length, rows_of)
                kept[[v for v, _ in part], [k for _, k in part]] = masker.take_kept().double().cpu()
    return ll, greedy, kept


@torch.no_grad()
def text_nll(model, hooks, ids: list[int], masks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood (nats) of tokens 1 .. n-1 of ``ids``, each given the ones before it, per
    mask (``[V]`` float64; ``masks`` as for :func:`choice_loglikelihoods`), and the weight each
    :class:`TokenRow` kept (``[V]`` float64, 0 for the others); the mask acts at every position."""
    V = len(masks)
    kept = torch.zeros(V, dtype=torch.float64)
    if len(ids) < 2:
        return torch.zeros(V, dtype=torch.float64), kept
    device = next(model.parameters()).device
    seq = torch.tensor([ids], device=device)
    target = seq[0, 1:]
    vocab = model.get_output_embeddings().weight.shape[0]
    step = _rows_per_pass(device, len(ids) - 1, vocab)
    nll = torch.zeros(V, dtype=torch.float64)

    def run(part, setting):
        with setting:
            logits = model(input_ids=seq[:, :-1].expand(len(part), -1), use_cache=False).logits.float()
        out = torch.logsumexp(logits, -1) - logits.gather(-1, target.view(1, -1, 1).expand(len(part), -1, 1))[..., 0]
        nll[part] = out.sum(-1).double().cpu()

    stored = [v for v in range(V) if not isinstance(masks[v], TokenRow)]
    for s in range(0, len(stored), step):
        part = stored[s:s + step]
        run(part, hooks.settings(masks=_stack_masks([masks[v] for v in part], hooks.layout)))
    for masker, variants in _token_groups(masks):
        for s in range(0, len(variants), step):
            part = variants[s:s + step]
            run(part, masker.rows([masks[v].variant for v in part], [masks[v].ratio for v in part]))
            kept[part] = masker.take_kept().double().cpu()
    return nll, kept


# -- lm-evaluation-harness ------------------------------------------------------------------------------------
def _harness():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise PipelineError("the evaluation step needs lm-evaluation-harness: pip install lm-eval "
                            "(or bash scripts/setup.sh)") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TemplateLM


@contextmanager
def _quiet_bars():
    """lm-eval's own progress bars (one per variant and task) off; ours stay."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def add_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token (Gemma does, SmolLM2's does not): contexts
    are encoded as the model was trained, as lm-eval's HF model does."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def harness_lm(model, hooks, tokenizer, book: MaskBook, progress: bool = True):
    """An lm-eval ``LM`` (a ``TemplateLM``: lm-eval's own context/continuation tokenisation) whose
    ``loglikelihood`` answers for variant ``lm.variant``."""
    TemplateLM = _harness()

    class HarnessLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.variant = 0
            self.table = {}
            self.bos = add_bos(tokenizer)

        @property
        def eot_token_id(self):
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self):
            return tokenizer.bos_token_id if self.bos else tokenizer.eos_token_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            ids = tokenizer(string, add_special_tokens=False)["input_ids"]
            bos = self.bos if add_special_tokens is None else add_special_tokens and self.bos
            return [tokenizer.bos_token_id] + ids if bos else ids

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True, **kwargs):
            missing = {}
            for _, ctx, cont in requests:
                key = (tuple(ctx), tuple(cont))
                if key not in self.table:
                    missing.setdefault(tuple(ctx), []).append(tuple(cont))
            for ctx, conts in tqdm(missing.items(), desc="requests", unit="context", disable=not progress):
                conts = list(dict.fromkeys(conts))
                ll, greedy = book.loglikelihoods(list(ctx), [list(c) for c in conts])
                for k, cont in enumerate(conts):
                    self.table[(ctx, cont)] = (ll[:, k].tolist(), greedy[:, k].tolist())
            return [(self.table[(tuple(c), tuple(d))][0][self.variant],
                     bool(self.table[(tuple(c), tuple(d))][1][self.variant])) for _, c, d in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise PipelineError("the evaluation step scores multiple-choice tasks only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise PipelineError("the evaluation step scores multiple-choice tasks only")

    return HarnessLM()


def harness_task(task):
    """An lm-eval task over ``task.rows`` (utils.eval_tasks): zero-shot, the context ``query``, the
    choices each after lm-eval's default target delimiter (one space), its metrics with lm-eval's mean
    aggregation."""
    _harness()
    import datasets
    from lm_eval.api.task import ConfigurableTask

    rows = [{"query": r["query"], "choices": r["choices"], "gold": r["gold"]} for r in task.rows]
    config = {"task": task.name, "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}),
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
              "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "num_fewshot": 0,
              "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in task.metrics]}
    with _quiet_bars():
        return ConfigurableTask(config=config)


def evaluate_task(lm, task, variants: list) -> list[dict]:
    """lm-eval's results of ``task`` for every variant: ``{metric: value, metric_stderr: value, n, items}``,
    ``items`` every row's value of each metric in row order (0 or 1 for acc: what a paired comparison of
    two variants over the same rows needs, compare.py).  The first variant's run scores every variant
    (``lm``'s table); the others read it."""
    from lm_eval.evaluator import evaluate

    harness = harness_task(task)
    out = []
    for i, _ in enumerate(variants):
        lm.variant = i
        with _quiet_bars():
            res = evaluate(lm, {task.name: harness}, limit=None, bootstrap_iters=1000, log_samples=True)
        got = res["results"][task.name]
        samples = sorted(res["samples"][task.name], key=lambda d: d["doc_id"])
        row = {"n": int(got.get("sample_len", len(task.rows))),
               "items": {m: [float(d[m]) for d in samples] for m in task.metrics}}
        for m in task.metrics:
            row[m] = float(got[f"{m},none"])
            stderr = got.get(f"{m}_stderr,none")
            row[f"{m}_stderr"] = None if stderr in (None, "N/A") else float(stderr)
        out.append(row)
    return out

