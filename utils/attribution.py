"""Per-token scores of every head and MLP neuron (METHOD §3), the fast way.

For one sample, generation step t runs the prompt (t = 0) or label token t-1 (t > 0) against the KV cache
of earlier steps, teacher-forced on the dense label, and the loss is CE(logits at the last position,
label[t]).  One forward and one backward per step give magnitude, gradient, GxO and the per-layer
gradient norms for *all* layers and both components: zero probes at every site's last position collect
dLoss/d(unit output) in a single ``torch.autograd.grad`` call.

Integrated gradients scale one component of one layer by alpha_k = k/n at every position the step
computes.  Each (component, layer, k) is one element of a batch that shares the step's dense KV cache;
batch elements are independent, so one backward of the summed loss gives every element its own
gradient.  Below its own layer an element is the dense model, so the batch is *staggered*: row 0 runs
the dense model from the embeddings up, and an element's row joins at the input of its layer as a copy
of row 0 (detached: its gradient is only needed from its site upward).  Layer l thus runs
1 + (elements of layers <= l) rows, about half the arithmetic of running every element through every
layer, and each backward stops at its element's layer.  ``ig_batch_size`` bounds the token positions a
pass computes (memory): the prompt step fits ``ig_batch_size // prompt length`` elements in a pass.

``step_mode="batched"`` computes gradient, GxO and magnitudes of all steps of a sample as one batch
instead (no integrated gradients): element t is the whole teacher-forced sequence prompt + label[:T-1]
with its probe and loss at position P-1+t (``step_batch_size // (P+T-1)`` elements per pass).
Causal attention makes the positions after P-1+t irrelevant to that loss, so this equals the per-step
computation; it does T times the arithmetic in a few large passes, which a GPU runs far faster than T
small ones (a CPU does not: ``auto`` picks it on CUDA only).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kv_cache import cache_argument_name, detach_cache_, forward_kwargs, output_cache, repeated_cache
from .sites import ATTN, COMPONENTS, SiteHooks

SCORE_METRICS = ("gradient", "gxo", "ig")
STEP_MODES = ("auto", "cached", "batched")


@dataclass
class StepScores:
    """Scores of one step; each tensor is float32 ``[L, units]`` (``grad_norm``: ``[L]``)."""
    magnitude: dict = field(default_factory=dict)
    gradient: dict = field(default_factory=dict)
    gxo: dict = field(default_factory=dict)
    ig: dict = field(default_factory=dict)
    grad_norm: dict = field(default_factory=dict)


def unit_scores(comp: str, x: torch.Tensor, g: torch.Tensor | None, head_dim: int) -> dict:
    """Magnitude, gradient and GxO of one site from its output ``x`` and gradient ``g`` (both ``[W]``)."""
    x = x.float()
    if comp == ATTN:
        xh = x.view(-1, head_dim)
        out = {"magnitude": xh.norm(dim=-1)}
        if g is not None:
            gh = g.float().view(-1, head_dim)
            out.update(gradient=gh.mean(-1), gxo=(gh * xh).mean(-1), grad_norm=g.float().norm())
    else:
        out = {"magnitude": x.abs()}
        if g is not None:
            g = g.float()
            out.update(gradient=g, gxo=g * x, grad_norm=g.norm())
    return out


def ig_from_gradients(comp: str, x: torch.Tensor, g_mean: torch.Tensor, head_dim: int) -> torch.Tensor:
    """IG of one site: ``x ⊙ mean_k g(alpha_k)``, averaged over each head's dims."""
    prod = x.float() * g_mean.float()
    return prod.view(-1, head_dim).mean(-1) if comp == ATTN else prod


class Attributor:
    """Scores the units of ``model`` along teacher-forced label sequences."""

    def __init__(self, model, hooks: SiteHooks | None = None):
        self.model = model
        self.hooks = hooks or SiteHooks(model)
        self.layout = self.hooks.layout
        self._cache_name = cache_argument_name(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def close(self) -> None:
        """Remove the hooks this attributor put on the model."""
        self.hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one forward pass -------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, cache, use_cache: bool = True):
        kwargs = forward_kwargs(self._cache_name, input_ids, cache, use_cache=use_cache)
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1].float(), (output_cache(out) if use_cache else None)

    def _dense_step(self, input_ids, target, cache, with_grad: bool):
        """The dense pass of one step: records x (and g when ``with_grad``); returns the new cache."""
        with torch.set_grad_enabled(with_grad), self.hooks.settings(record=True, probe=with_grad):
            logits, cache = self._forward(input_ids, cache)
            grads = None
            if with_grad:
                loss = F.cross_entropy(logits, target)
                probes = self.hooks.all_probes()
                grads = dict(zip([(c, l) for c in COMPONENTS for l in range(self.layout.num_layers)],
                                 torch.autograd.grad(loss, probes)))
            xs = {c: list(self.hooks.recorded[c]) for c in COMPONENTS}
        detach_cache_(cache)
        return xs, grads, cache

    @contextlib.contextmanager
    def _staggered_rows(self, rows: list[int]):
        """While active, decoder layer l runs ``rows[l]`` batch rows: the rows it lacks join as copies of
        row 0 (the dense row), detached, so nothing flows back below the layer where a row joined."""
        def grow(layer: int):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                missing = rows[layer] - h.shape[0]
                if missing <= 0:
                    return None
                h = torch.cat([h, h[:1].detach().expand(missing, *h.shape[1:])])
                if args:
                    return (h,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}
            return hook

        handles = [block.register_forward_pre_hook(grow(l), with_kwargs=True)
                   for l, block in enumerate(self.layout.decoder_layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _ig_step(self, input_ids, target, cache, n_steps: int, batch_size: int) -> dict:
        """Mean over alpha_k of the gradient at every site, each site scaled alone: ``{(comp, l): [W]}``."""
        L = self.layout.num_layers
        device = input_ids.device
        # ordered by layer, so each chunk's rows join the staggered batch in order
        elements = [(c, l, k) for l in range(L) for c in COMPONENTS for k in range(1, n_steps + 1)]
        per_pass = max(1, batch_size // input_ids.shape[1])
        sums = {}
        for start in range(0, len(elements), per_pass):
            chunk = elements[start:start + per_pass]
            B = len(chunk)
            layer_of = torch.tensor([l for _, l, _ in chunk])
            rows = [1 + int((layer_of <= l).sum()) for l in range(L)]      # row 0: the dense row
            scales = {c: torch.ones(B + 1, L) for c in COMPONENTS}         # filled on the CPU, sent once
            for b, (c, l, k) in enumerate(chunk):
                scales[c][b + 1, l] = k / n_steps
            scales = {c: s.to(device) for c, s in scales.items()}
            batch_cache = repeated_cache(cache, rows) if cache is not None else None
            with torch.enable_grad(), self.hooks.settings(scales=scales, probe=True), self._staggered_rows(rows):
                logits, _ = self._forward(input_ids, batch_cache, use_cache=cache is not None)
                # elements are independent, so the summed loss gives each its own gradient
                loss = F.cross_entropy(logits[1:], target.expand(B), reduction="sum")
                sites = sorted({(c, l) for c, l, _ in chunk})
                grads = torch.autograd.grad(loss, [self.hooks.probes[c][l] for c, l in sites])
            # a site's elements are consecutive rows: one sum per site, not one op per element
            span = {}
            for b, (c, l, _) in enumerate(chunk):
                span.setdefault((c, l), [b + 1, b + 1])[1] = b + 1
            for site, g in zip(sites, grads):
                first, last = span[site]
                part = g[first:last + 1].float().sum(0)
                sums[site] = sums[site] + part if site in sums else part
            del batch_cache
        return {key: value / n_steps for key, value in sums.items()}

    def _batched_steps(self, prompt_ids, labels, with_grad: bool, batch_size: int):
        """x (and g) at every step's position, all steps teacher-forced as batch elements.

        Returns per step t: ``({comp: [x_l]}, {(comp, l): g} or None)`` like the cached dense pass."""
        P, T = prompt_ids.shape[1], labels.shape[0]
        seq = torch.cat([prompt_ids[0], labels[:-1]])[None]          # [1, P+T-1]
        out = []
        per_pass = max(1, batch_size // seq.shape[1])
        for start in range(0, T, per_pass):
            steps = torch.arange(start, min(start + per_pass, T), device=seq.device)
            B = steps.shape[0]
            positions = P - 1 + steps
            with torch.set_grad_enabled(with_grad), \
                    self.hooks.settings(record=True, probe=with_grad, positions=positions):
                logits = self.model(**forward_kwargs(self._cache_name, seq.expand(B, -1), use_cache=False)).logits
                grads = None
                if with_grad:
                    rows = logits[torch.arange(B, device=seq.device), positions].float()
                    # elements are independent, so the summed loss gives each its own gradient
                    loss = F.cross_entropy(rows, labels[steps], reduction="sum")
                    grads = torch.autograd.grad(loss, self.hooks.all_probes())
                recorded = {c: list(self.hooks.recorded[c]) for c in COMPONENTS}
            L = self.layout.num_layers
            for b in range(B):
                xs = {c: [recorded[c][l][b:b + 1] for l in range(L)] for c in COMPONENTS}
                g = None
                if grads is not None:
                    g = {(c, l): grads[i * L + l][b:b + 1] for i, c in enumerate(COMPONENTS) for l in range(L)}
                out.append((xs, g))
        return out

    # -- one sample -------------------------------------------------------------------------------
    def score_sample(self, prompt_ids: torch.Tensor, label_ids: list[int], *, gradients: bool = True,
                     ig_steps: int = 0, ig_batch_size: int = 2048, on_step=None, step_mode: str = "cached",
                     step_batch_size: int = 2048) -> dict:
        """Scores for every step of one sample.

        Returns a dict of float32 CPU tensors: ``magnitude_{attention,mlp}`` ``[T, L, units]``, and when
        ``gradients``: ``gradient_*``, ``gxo_*`` and ``grad_norm_*`` (``[T, L]``); when ``ig_steps``:
        ``ig_*``.  ``step_mode``: ``cached`` (one token per pass against the KV cache), ``batched`` (all
        steps as one batch; not with IG) or ``auto`` (batched on CUDA).  ``ig_batch_size`` and
        ``step_batch_size`` bound the token positions one forward/backward pass computes (memory).
        """
        device = next(self.model.parameters()).device
        if step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, not {step_mode!r}")
        if step_mode == "auto":
            step_mode = "batched" if device.type == "cuda" and not ig_steps else "cached"
        if step_mode == "batched" and ig_steps:
            raise ValueError("integrated gradients run in step_mode='cached'")
        prompt_ids = prompt_ids.to(device)
        labels = torch.tensor(label_ids, dtype=torch.long, device=device)
        hd = self.layout.head_dim
        steps: list[dict] = []
        cache = None
        batched = (self._batched_steps(prompt_ids, labels, gradients, step_batch_size)
                   if step_mode == "batched" and label_ids else None)
        for t in range(len(label_ids)):
            ig = None
            if batched is not None:
                xs, grads = batched[t]
            else:
                step_input = prompt_ids if t == 0 else labels[t - 1:t].view(1, 1)
                target = labels[t:t + 1]
                ig = self._ig_step(step_input, target, cache, ig_steps, ig_batch_size) if ig_steps else None
                xs, grads, cache = self._dense_step(step_input, target, cache, with_grad=gradients)
            row = {}
            for c in COMPONENTS:
                per_layer = [unit_scores(c, xs[c][l][0], grads[(c, l)][0] if grads else None, hd)
                             for l in range(self.layout.num_layers)]
                for key in per_layer[0]:
                    row[f"{key}_{c}"] = torch.stack([p[key] for p in per_layer])
                if ig is not None:
                    row[f"ig_{c}"] = torch.stack([ig_from_gradients(c, xs[c][l][0], ig[(c, l)], hd)
                                                  for l in range(self.layout.num_layers)])
            steps.append(row)
            if on_step is not None:
                on_step()
        if not steps:  # an empty label (the model stopped at once): zero steps, same layout
            return self._empty(gradients, ig_steps)
        return {key: torch.stack([s[key] for s in steps]).float().cpu() for key in steps[0]}

    def _empty(self, gradients: bool, ig_steps: int) -> dict:
        L, out = self.layout.num_layers, {}
        for c in COMPONENTS:
            U = self.layout.units(c)
            names = ["magnitude"] + (["gradient", "gxo"] if gradients else []) + (["ig"] if ig_steps else [])
            out.update({f"{n}_{c}": torch.zeros(0, L, U) for n in names})
            if gradients:
                out[f"grad_norm_{c}"] = torch.zeros(0, L)
        return out
