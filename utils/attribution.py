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
layer, and each backward stops at its element's layer.  ``batch_size`` bounds the token positions a
pass computes (memory): the prompt step fits ``batch_size // prompt length`` elements in a pass.

Steps t >= 1 compute one position each, so one step per pass leaves a GPU idle on per-pass overhead.
With ``ig_packed`` the dense steps run first and their final KV cache is kept; the elements of all later
steps are then packed into as few passes as the budget allows, several steps per pass.  Each step in a
pass has its own dense row.  No row gets a cache of its own: the pass runs the rows' new tokens with no
cache object and ``position_ids = P-1+t``, and every attention module reads the ONE shared final cache
(:func:`utils.kv_cache.shared_prefix_attention`, switched in through transformers' AttentionInterface for
the pass only): a row of step t attends to the first P+t-1 cached positions, bit for bit the cache step t
ran against (the cache only grows), plus its own new key/value.  A row then costs its one position plus
its attention logits over the cached positions (``_cache_weight``), not a copy of the cache: with a long
prompt a pass holds tens of times more rows than per-row cache copies allowed.  Sliding-window layers
keep only their last window - 1 positions, so a sequence longer than the window keeps the
one-step-per-pass path, as does a model whose attention does not dispatch through the AttentionInterface
(:meth:`Attributor.can_pack_ig`).  ``batch_size=None`` picks the budget from free CUDA memory.

``step_mode="batched"`` computes gradient, GxO and magnitudes of all steps of a sample as one batch
instead (no integrated gradients): element t is the whole teacher-forced sequence prompt + label[:T-1]
with its probe and loss at position P-1+t (``batch_size // (P+T-1)`` elements per pass).
Causal attention makes the positions after P-1+t irrelevant to that loss, so this equals the per-step
computation; it does T times the arithmetic in a few large passes, which a GPU runs far faster than T
small ones (a CPU does not: ``auto`` picks it on CUDA only).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F

from .artifacts import score_key
from .errors import PipelineError
from .kv_cache import (SharedPrefix, cache_argument_name, detach_cache_, forward_kwargs, output_cache,
                       repeated_cache, shared_prefix_pass, sliding_window)
from .sites import ATTN, COMPONENTS, SiteHooks
from .units import head_mean

SCORE_METRICS = ("gradient", "gxo", "ig")
DEFAULT_POSITION_BUDGET = 2048   # token positions per pass where free memory cannot be asked (CPU)
STEP_MODES = ("auto", "cached", "batched", "prefix")


def last_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` float logits of the last position.  With one position (``logits_to_keep=1``) a squeeze: its
    backward is a view, where indexing's backward writes a zero tensor the size of all rows' logits and
    copies into it (two passes over rows x vocabulary in every IG backward)."""
    last = logits.squeeze(1) if logits.shape[1] == 1 else logits[:, -1]
    return last.float()


def unit_scores(comp: str, x: torch.Tensor, g: torch.Tensor | None, head_dim: int) -> dict:
    """Magnitude, gradient and GxO of one site from its output ``x`` and gradient ``g`` (both ``[W]``);
    a head's magnitude is the norm of its output slice, its gradient and GxO per-head means (utils/units.py)."""
    x = x.float()
    if comp == ATTN:
        out = {"magnitude": x.view(-1, head_dim).norm(dim=-1)}
    else:
        out = {"magnitude": x.abs()}
    if g is not None:
        g = g.float()
        out.update(gradient=head_mean(comp, g, head_dim), gxo=head_mean(comp, g * x, head_dim), grad_norm=g.norm())
    return out


def ig_from_gradients(comp: str, x: torch.Tensor, g_mean: torch.Tensor, head_dim: int) -> torch.Tensor:
    """IG of one site: ``x ⊙ mean_k g(alpha_k)``, a per-head mean for heads."""
    return head_mean(comp, x.float() * g_mean.float(), head_dim)


def resolve_step_mode(step_mode: str, device: torch.device, ig: bool, gradients: bool = True) -> str:
    """``auto`` -> ``batched`` for gradient/GxO on CUDA, ``prefix`` on a CPU (IG always runs cached; a CPU
    pays for arithmetic, which batching gradients multiplies, and for passes, which ``cached`` multiplies;
    ``prefix`` does neither).  Without gradients (magnitudes only) ``batched`` is one teacher-forced pass
    per sample, less work than T cached passes on any device, so ``auto`` picks it everywhere.
    :meth:`Attributor.score_sample` runs ``prefix`` as ``cached`` where the model cannot share its cache
    (:meth:`Attributor.can_pack_ig`)."""
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode must be one of {STEP_MODES}, not {step_mode!r}")
    if step_mode == "auto":
        if ig:
            return "cached"
        return "batched" if torch.device(device).type == "cuda" or not gradients else "prefix"
    if step_mode in ("batched", "prefix") and ig:
        raise ValueError("integrated gradients run in step_mode='cached'")
    return step_mode


class Attributor:
    """Scores the units of ``model`` along teacher-forced label sequences."""

    def __init__(self, model, hooks: SiteHooks | None = None):
        self.model = model
        self.hooks = hooks or SiteHooks(model)
        self.layout = self.hooks.layout
        self._cache_name = cache_argument_name(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._budget_cap = None      # automatic IG budget after an out-of-memory retry

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
        return last_logits(out.logits), (output_cache(out) if use_cache else None)

    def _cache_of(self, input_ids):
        """The KV cache of a pass over ``input_ids`` that needs no logits: the decoder alone
        (``base_model``), so not even the last position pays for the vocabulary projection (which, on a
        sliced, staggered batch, ran as a slow batched matmul)."""
        return output_cache(self.model.base_model(input_ids=input_ids, use_cache=True))

    def _split_rows(self, recorded: dict, grads, rows: int) -> list:
        """Per batch row b: ``({comp: [x_l]}, {(comp, l): g} or None)``, each ``[1, width]``, from a pass's
        recorded outputs (``{comp: [[rows, width]] per layer}``) and its probe gradients (``all_probes``
        order: component-major, then layer)."""
        L = self.layout.num_layers
        out = []
        for b in range(rows):
            xs = {c: [recorded[c][l][b:b + 1] for l in range(L)] for c in COMPONENTS}
            g = None
            if grads is not None:
                g = {(c, l): grads[i * L + l][b:b + 1] for i, c in enumerate(COMPONENTS) for l in range(L)}
            out.append((xs, g))
        return out

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

    def _prefix_steps(self, prompt_ids, labels, with_grad: bool):
        """The dense passes of every step of a sample in two passes: ``([(xs, grads)] per step, cache)``.

        A step's loss depends on its own new position only through that position's column of the network
        (causal attention: later positions do not feed it), and the earlier positions' keys and values are
        constants of the step (the cached path detaches them).  So one no-grad pass over the first P+T-2
        tokens of the teacher-forced sequence gives the cache of every step, and one pass of T rows, row t
        the step's one new token (the last prompt token for t = 0, label[t-1] after) at position P-1+t,
        reading its first P-1+t cached positions through the shared-prefix attention, gives every step's x
        and, with one backward of the summed losses, its own gradient: rows are independent and no
        gradient flows into the shared cache.  This is the cached path's arithmetic (T new positions) in
        two passes instead of T.  The cache (P+T-2 positions) is what packed IG reads."""
        P, T = prompt_ids.shape[1], labels.shape[0]
        L, device = self.layout.num_layers, labels.device
        seq = torch.cat([prompt_ids[0], labels[:-1]])          # step t's new token is seq[P-1+t]
        width = P + T - 2                                       # the longest prefix a step reads
        with torch.no_grad():
            cache = self._cache_of(seq[None, :width])
        positions = P - 1 + torch.arange(T, device=device)
        prefix = SharedPrefix(cache, positions, width)
        kwargs = forward_kwargs(self._cache_name, seq[P - 1:, None], use_cache=False)
        kwargs["position_ids"] = positions[:, None]
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        with torch.set_grad_enabled(with_grad), self.hooks.settings(record=True, probe=with_grad), \
                shared_prefix_pass(self.model, prefix):
            logits = last_logits(self.model(**kwargs).logits)
            if prefix.calls != L:
                raise PipelineError(f"{type(self.model).__name__} ran the shared-cache attention in "
                                    f"{prefix.calls} of {L} layers; run it with step_mode='cached'")
            grads = None
            if with_grad:
                # rows are independent, so the summed loss gives each step its own gradient
                loss = F.cross_entropy(logits, labels, reduction="sum")
                grads = torch.autograd.grad(loss, self.hooks.all_probes())
            recorded = {c: list(self.hooks.recorded[c]) for c in COMPONENTS}      # [T, width] per layer
        return self._split_rows(recorded, grads, T), cache

    def can_share_prefix(self, prompt_len: int, label_len: int) -> bool:
        """``prefix`` steps need what packed IG needs (:meth:`can_pack_ig`) and at least one cached position."""
        return prompt_len + label_len >= 3 and self.can_pack_ig(prompt_len, label_len)

    @contextlib.contextmanager
    def _staggered_rows(self, rows: list[int], source: torch.Tensor | None = None, full: int | None = None):
        """While active, decoder layer l runs ``rows[l]`` batch rows: the rows it lacks join as copies of
        their dense row (row ``source[r]``; default row 0), detached, so nothing flows back below the layer
        where a row joined.  Per-row block arguments built for all ``full`` rows (attention mask, position
        ids, rotary tables of the packed IG pass) are cut to the rows the layer runs."""
        def cut(value, n):
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == full:
                return value[:n]
            if isinstance(value, tuple) and any(torch.is_tensor(v) for v in value):
                return tuple(cut(v, n) for v in value)
            return value

        def grow(layer: int):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                n = rows[layer]
                missing = n - h.shape[0]
                if missing == 0 and (full is None or n == full):
                    return None
                if missing < 0:     # the packed pass embeds all rows; the first layer runs the dense ones
                    h = h[:n]
                elif source is None:
                    h = torch.cat([h, h[:1].detach().expand(missing, *h.shape[1:])])
                elif missing > 0:
                    h = torch.cat([h, h.detach().index_select(0, source[h.shape[0]:n])])
                if full is not None and n < full:
                    args = tuple(cut(a, n) for a in args)
                    kwargs = {k: cut(v, n) for k, v in kwargs.items()}
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

    def _ig_step(self, input_ids, target, cache, n_steps: int, batch_size: int, dense_grads=None) -> dict:
        """Mean over alpha_k of the gradient at every site, each site scaled alone: ``{(comp, l): [W]}``.

        The probe sits at the step's last position, and nothing at an earlier position depends on it
        (causal attention), so its gradient flows back through that position's column only; the earlier
        positions enter as keys and values, constants of the backward.  The prompt step (``cache`` None,
        several positions) therefore runs its positions before the last without autograd (scaled like
        the rest, each row into its own cache) and then the last position with autograd against that
        cache: the same gradients, with a backward over one position instead of the whole prompt.

        ``dense_grads`` (``{(comp, l): [1, W]}``, the dense step's gradients): alpha_n = 1 leaves the model
        dense, so its gradient is the dense one and those elements are not run (:meth:`_alpha_one`)."""
        L = self.layout.num_layers
        split = cache is None and input_ids.shape[1] > 1
        device = input_ids.device
        # ordered by layer, so each chunk's rows join the staggered batch in order
        elements = [(c, l, k) for l in range(L) for c in COMPONENTS
                    for k in self._alphas_run(n_steps, dense_grads)]
        # an element of the split prompt step computes one position with autograd, the rest without
        per_pass = max(1, int(batch_size // (self._prompt_row_cost(input_ids.shape[1]) if split
                                              else input_ids.shape[1])))
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
            step_ids = input_ids
            if cache is not None:
                batch_cache = repeated_cache(cache, rows)
            elif split:
                # the prompt's positions before the last, scaled like the rest, without autograd: they
                # become each row's own cache (layer l holds rows[l] rows, as the staggered batch runs it)
                with torch.no_grad(), self.hooks.settings(scales=scales), self._staggered_rows(rows):
                    batch_cache = self._cache_of(input_ids[:, :-1])
                step_ids = input_ids[:, -1:]
            else:
                batch_cache = None
            with torch.enable_grad(), self.hooks.settings(scales=scales, probe=True), self._staggered_rows(rows):
                logits, _ = self._forward(step_ids, batch_cache, use_cache=batch_cache is not None)
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
        return {key: value / n_steps for key, value in self._alpha_one(sums, dense_grads).items()}

    @staticmethod
    def _alphas_run(n_steps: int, dense_grads) -> range:
        """The k of alpha_k = k / n_steps whose elements run as rows: all, or all but k = n_steps when the
        dense step's gradients stand in for it (:meth:`_alpha_one`)."""
        return range(1, n_steps + 1 if dense_grads is None else n_steps)

    @staticmethod
    def _alpha_one(sums: dict, dense_grads) -> dict:
        """Add the alpha_n = 1 term, the dense gradient, to each site's sum over the other alphas (last, as
        the loop over k would)."""
        if dense_grads is None:
            return sums
        return {site: (sums[site] + g[0].float()) if site in sums else g[0].float()
                for site, g in dense_grads.items()}

    def _packed_ig_steps(self, prompt_len: int, labels, cache, n_steps: int, budget: int, on_token=None,
                         dense_grads=None) -> dict:
        """IG of steps t = 1..T-1, several steps' elements per pass: ``{t: {(comp, l): mean_k g}}``.

        ``cache`` is the sample's dense cache of at least P+T-2 positions (:meth:`_prefix_steps`); the cache
        step t runs against is its first P+t-1 positions.  A pass holds one dense row
        per step it covers plus that step's elements (``(comp, layer, k)``), staggered by layer as in
        ``_ig_step``.  The rows run with no cache object and ``position_ids = P-1+t``; their attention
        reads ``cache`` itself, shared (:class:`~utils.kv_cache.SharedPrefix`), row of step t up to its
        first P+t-1 positions.  A row's cost is its one position plus its cached positions weighted by
        ``_cache_weight``."""
        L, T, device = self.layout.num_layers, labels.shape[0], labels.device
        weight = self._cache_weight()
        elements = [(t, c, l, k) for t in range(1, T) for l in range(L) for c in COMPONENTS
                    for k in self._alphas_run(n_steps, dense_grads)]
        chunks, current, cost = [], [], 0.0
        for e in elements:
            row_cost = 1.0 + weight * (prompt_len + e[0] - 1)
            if current and cost + row_cost > budget:
                chunks.append(current)
                current, cost = [], 0.0
            current.append(e)
            cost += row_cost
        if current:
            chunks.append(current)
        last_of = {}                        # the chunk that finishes each step (progress)
        for i, chunk in enumerate(chunks):
            for e in chunk:
                last_of[e[0]] = i
        sums = {t: {} for t in range(1, T)}
        for i, chunk in enumerate(chunks):
            steps = sorted({e[0] for e in chunk})
            K = len(steps)
            index = {t: j for j, t in enumerate(steps)}
            chunk = sorted(chunk, key=lambda e: (e[2], e[0], COMPONENTS.index(e[1]), e[3]))  # by layer
            B = len(chunk)
            # a pass holds thousands of rows on a GPU: per-row bookkeeping as tensor ops, not Python loops
            layer_of = torch.tensor([e[2] for e in chunk])
            rows = (K + torch.bincount(layer_of, minlength=L).cumsum(0)).tolist()
            src = torch.tensor(list(range(K)) + [index[e[0]] for e in chunk], device=device)
            step_of_row = torch.tensor(steps, device=device)[src]                     # t of each row
            width = prompt_len + steps[-1] - 1                                        # longest prefix
            ids = labels[step_of_row - 1][:, None]
            positions = (prompt_len - 1 + step_of_row)[:, None]
            comp_of = torch.tensor([COMPONENTS.index(e[1]) for e in chunk])
            alpha = torch.tensor([e[3] / n_steps for e in chunk])
            scales = {}
            for ci, c in enumerate(COMPONENTS):
                mine = (comp_of == ci).nonzero().squeeze(1)
                scales[c] = torch.ones(K + B, L).index_put_((K + mine, layer_of[mine]), alpha[mine]).to(device)
            # row of step t sees the first P+t-1 positions of the shared cache, then its own token
            prefix = SharedPrefix(cache, prompt_len + step_of_row - 1, width)
            kwargs = forward_kwargs(self._cache_name, ids, use_cache=False)
            kwargs["position_ids"] = positions
            if self._keep_last:
                kwargs["logits_to_keep"] = 1
            with torch.enable_grad(), self.hooks.settings(scales=scales, probe=True), \
                    self._staggered_rows(rows, source=src, full=K + B), shared_prefix_pass(self.model, prefix):
                logits = last_logits(self.model(**kwargs).logits)
                if prefix.calls != L:
                    # a layer that bypassed it attended to its own token only: results would be wrong
                    raise PipelineError(f"{type(self.model).__name__} ran the shared-cache attention in "
                                        f"{prefix.calls} of {L} layers; packed IG cannot run on this model, "
                                        "run it with ig_packed=False")
                targets = labels[step_of_row[K:]]
                loss = F.cross_entropy(logits[K:], targets, reduction="sum")
                sites = sorted({(c, l) for _, c, l, _ in chunk})
                grads = torch.autograd.grad(loss, [self.hooks.probes[c][l] for c, l in sites])
            del prefix
            # each site's rows summed per step with one index_add
            members = {}
            for b, (t, c, l, _) in enumerate(chunk):
                members.setdefault((c, l), []).append(b)
            for (c, l), g in zip(sites, grads):
                bs = members[(c, l)]
                row_idx = torch.tensor([K + b for b in bs], device=device)
                slot = torch.tensor([index[chunk[b][0]] for b in bs], device=device)
                part = g.new_zeros(K, g.shape[-1], dtype=torch.float32)
                part.index_add_(0, slot, g.index_select(0, row_idx).float())
                for t in sorted({chunk[b][0] for b in bs}):
                    acc = sums[t]
                    acc[(c, l)] = acc[(c, l)] + part[index[t]] if (c, l) in acc else part[index[t]]
            if on_token is not None:
                for t in steps:
                    if last_of[t] == i:
                        on_token(t)
        if on_token is not None:
            for t in range(1, T):
                if t not in last_of:        # n_steps = 1: alpha = 1 alone, no pass ran for the step
                    on_token(t)
        if dense_grads is not None:
            sums = {t: self._alpha_one(site, dense_grads[t]) for t, site in sums.items()}
        return {t: {key: v / n_steps for key, v in site.items()} for t, site in sums.items()}

    def _packed_sample(self, prompt_ids, labels, gradients, ig_steps, budget, on_step):
        """Dense steps first (:meth:`_prefix_steps`; their cache is the one every IG pass reuses), then IG of
        step 0 (the prompt) and of all later steps packed: ``[(xs, grads, ig)]`` per step."""
        # with gradients always: they are IG's alpha = 1 term (:meth:`_alpha_one`)
        dense, cache = self._prefix_steps(prompt_ids, labels, True)
        grads = [g for _, g in dense]
        tick = (lambda _t: on_step()) if on_step is not None else None
        ig = {0: self._ig_step(prompt_ids, labels[0:1], None, ig_steps, budget, dense_grads=grads[0])}
        if tick is not None:
            tick(0)
        ig.update(self._packed_ig_steps(prompt_ids.shape[1], labels, cache, ig_steps, budget, on_token=tick,
                                        dense_grads=grads))
        return [(xs, g if gradients else None, ig[t]) for t, (xs, g) in enumerate(dense)]

    def _saved_per_position(self) -> int:
        """Elements one decoder layer saves for the backward per computed position: about 4 hidden, 3
        intermediate and 2 attention widths.  The unit of every memory estimate of the position budget."""
        lay = self.layout
        return 4 * lay.hidden + 3 * lay.intermediate + 2 * lay.num_heads * lay.head_dim

    def position_budget(self, requested: int | None = None) -> int:
        """Token positions per IG pass: ``requested`` if given; on CUDA, what 60% of the free memory holds
        (the activations every layer saves per position, and a row's logits); elsewhere :data:`DEFAULT_POSITION_BUDGET`."""
        if requested:
            return int(requested)
        if self._budget_cap is not None:          # an earlier pass ran out of memory at a larger one
            return self._budget_cap
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            return DEFAULT_POSITION_BUDGET
        elt = next(self.model.parameters()).element_size()
        vocab = self.model.get_output_embeddings().weight.shape[0]
        per_position = self.layout.num_layers * self._saved_per_position() * elt + 4 * vocab * 4
        free, _ = torch.cuda.mem_get_info(device)
        # an overestimate already (frozen weights save fewer activations); an out-of-memory pass halves it
        return max(DEFAULT_POSITION_BUDGET, int(0.6 * free / per_position))

    def _cache_weight(self) -> float:
        """Memory of one cached position a packed IG row attends to, relative to one computed position of
        a backward pass.  The rows share one cache (:class:`~utils.kv_cache.SharedPrefix`), so a row holds
        no keys or values, only its attention logits over the position: about four per query head at a
        time (scores, masked scores, float32 probabilities kept for the backward, their gradient), against
        the activations a layer saves per computed position (:meth:`_saved_per_position`)."""
        return 4 * self.layout.num_heads / self._saved_per_position()

    def _prompt_row_cost(self, prompt_len: int) -> float:
        """Budget cost of one IG element of the prompt step (:meth:`_ig_step`, split): its last position,
        computed with autograd, is one; each of its ``prompt_len - 1`` earlier positions runs without
        autograd, so it saves no activations: it keeps its keys and values in every layer, holds one
        layer's activations and attention scores while that layer runs, and is attended to by the last
        position (:meth:`_cache_weight`).  Counted as whole positions they would cut the prompt step into
        several times more passes than its memory needs (on a GPU, where a pass costs its launches, the
        prompt step was most of a short sample's IG passes)."""
        lay = self.layout
        act = self._saved_per_position()
        kv = 2 * lay.num_kv_heads * lay.head_dim
        earlier = prompt_len - 1
        per_position = (lay.num_layers * kv + act + lay.num_heads * earlier) / (lay.num_layers * act)
        return 1.0 + earlier * (per_position + self._cache_weight())

    def can_pack_ig(self, prompt_len: int, label_len: int) -> bool:
        """Packed IG needs a model whose attention modules dispatch through transformers'
        AttentionInterface (``_supports_attention_backend``: the shared-cache attention is switched in
        there) and the whole sequence in every layer's cache: a sliding-window layer keeps only its last
        window - 1 positions, so a sequence longer than the window keeps the one-step-per-pass path."""
        if not getattr(self.model, "_supports_attention_backend", False):
            return False
        window = sliding_window(self.model)
        return window is None or prompt_len + label_len <= window

    def _batched_steps(self, prompt_ids, labels, with_grad: bool, batch_size: int):
        """x (and g) at every step's position, all steps teacher-forced as batch elements.

        Returns per step t: ``({comp: [x_l]}, {(comp, l): g} or None)`` like the cached dense pass."""
        P, T = prompt_ids.shape[1], labels.shape[0]
        seq = torch.cat([prompt_ids[0], labels[:-1]])[None]          # [1, P+T-1]
        if not with_grad:
            # No gradients, no per-step losses to keep apart: causal attention makes position P-1+t of the
            # one teacher-forced sequence exactly what step t computes, so one row records every step.
            # (A batch-1 pass reads the weights once per sample instead of once per token.)
            kwargs = forward_kwargs(self._cache_name, seq, use_cache=False)
            if self._keep_last:
                kwargs["logits_to_keep"] = 1                             # no step needs the logits
            positions = P - 1 + torch.arange(T, device=seq.device)
            with torch.no_grad(), self.hooks.settings(record=True, positions=positions):
                self.model(**kwargs)
                recorded = {c: list(self.hooks.recorded[c]) for c in COMPONENTS}   # [T, width] per layer
            return self._split_rows(recorded, None, T)
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
            out.extend(self._split_rows(recorded, grads, B))
        return out

    # -- one sample -------------------------------------------------------------------------------
    def score_sample(self, prompt_ids: torch.Tensor, label_ids: list[int], *, gradients: bool = True,
                     ig_steps: int = 0, batch_size: int | None = DEFAULT_POSITION_BUDGET, on_step=None,
                     step_mode: str = "cached", ig_packed: bool = True) -> dict:
        """Scores for every step of one sample.

        Returns a dict of float32 CPU tensors: ``magnitude_{attention,mlp}`` ``[T, L, units]``, and when
        ``gradients``: ``gradient_*``, ``gxo_*`` and ``grad_norm_*`` (``[T, L]``); when ``ig_steps``:
        ``ig_*``.  ``step_mode``: ``cached`` (one token per pass against the KV cache), ``batched`` (all
        steps as one batch; not with IG), ``prefix`` (every step's new token as one row of one pass against
        the shared dense cache, :meth:`_prefix_steps`; not with IG; ``cached`` where the model cannot share
        its cache) or ``auto`` (:func:`resolve_step_mode`).  ``batch_size`` bounds
        the token positions one forward/backward pass computes (memory), for IG and for batched steps; a
        cached position held by an IG row counts as ``_cache_weight()`` of one, a prompt position an IG
        element of the prompt step runs without autograd as :meth:`_prompt_row_cost` says.  ``batch_size=None``
        chooses it from free device memory (:meth:`position_budget`).  ``ig_packed`` runs the IG elements of
        several steps per pass (:meth:`_packed_ig_steps`; default, on every device: with the shared-cache
        attention it also beats one step per pass on a CPU, 2.2x with a 400-token prompt); False: one step
        per pass.
        """
        device = next(self.model.parameters()).device
        step_mode = resolve_step_mode(step_mode, device, ig=bool(ig_steps), gradients=gradients)
        prompt_ids = prompt_ids.to(device)
        labels = torch.tensor(label_ids, dtype=torch.long, device=device)
        hd = self.layout.head_dim
        P, T = prompt_ids.shape[1], len(label_ids)
        auto_budget = not batch_size
        batch_size = self.position_budget(batch_size)
        steps: list[dict] = []
        cache = None
        batched = None                         # [(xs, grads)] per step, when computed ahead of the loop
        if step_mode == "batched" and label_ids:
            batched = self._batched_steps(prompt_ids, labels, gradients, batch_size)
        elif step_mode == "prefix" and label_ids and self.can_share_prefix(P, T):
            batched, _ = self._prefix_steps(prompt_ids, labels, gradients)   # else: the cached loop below
        precomputed = None
        if ig_steps and ig_packed and T > 1 and self.can_pack_ig(P, T):
            ticked = [0]                       # progress already reported (a retry does not repeat it)

            def tick():
                ticked[0] += 1
                if on_step is not None and ticked[0] > done_before:
                    on_step()
            done_before = 0
            while True:
                done_before, ticked[0] = max(done_before, ticked[0]), 0
                try:
                    precomputed = self._packed_sample(prompt_ids, labels, gradients, ig_steps, batch_size, tick)
                    break
                except torch.OutOfMemoryError:
                    # the automatic budget is an estimate: halve it for this and later samples
                    if not auto_budget or batch_size <= DEFAULT_POSITION_BUDGET:
                        raise
                    torch.cuda.empty_cache()
                    batch_size = self._budget_cap = batch_size // 2
        for t in range(T):
            ig = None
            if precomputed is not None:
                xs, grads, ig = precomputed[t]
            elif batched is not None:
                xs, grads = batched[t]
            else:
                step_input = prompt_ids if t == 0 else labels[t - 1:t].view(1, 1)
                target = labels[t:t + 1]
                ig = self._ig_step(step_input, target, cache, ig_steps, batch_size) if ig_steps else None
                xs, grads, cache = self._dense_step(step_input, target, cache, with_grad=gradients)
            row = {}
            for c in COMPONENTS:
                per_layer = [unit_scores(c, xs[c][l][0], grads[(c, l)][0] if grads else None, hd)
                             for l in range(self.layout.num_layers)]
                for key in per_layer[0]:
                    row[score_key(key, c)] = torch.stack([p[key] for p in per_layer])
                if ig is not None:
                    row[score_key("ig", c)] = torch.stack([ig_from_gradients(c, xs[c][l][0], ig[(c, l)], hd)
                                                  for l in range(self.layout.num_layers)])
            steps.append(row)
            if on_step is not None and precomputed is None:
                on_step()
        if not steps:  # an empty label (the model stopped at once): zero steps, same layout
            return self._empty(gradients, ig_steps)
        return {key: torch.stack([s[key] for s in steps]).float().cpu() for key in steps[0]}

    def _empty(self, gradients: bool, ig_steps: int) -> dict:
        L, out = self.layout.num_layers, {}
        for c in COMPONENTS:
            U = self.layout.units(c)
            names = ["magnitude"] + (["gradient", "gxo"] if gradients else []) + (["ig"] if ig_steps else [])
            out.update({score_key(n, c): torch.zeros(0, L, U) for n in names})
            if gradients:
                out[score_key("grad_norm", c)] = torch.zeros(0, L)
        return out
