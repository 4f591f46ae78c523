"""Integrated gradients of every head and MLP neuron (METHOD §3): the engine behind the ``ig_steps`` of
:meth:`utils.attribution.Attributor.score_sample`.

IG scales one component of one layer by alpha_k = k/n (:func:`ig_alphas`) at every position the step
computes.  Each (component, layer, alpha) is one element of a batch that shares the step's dense KV cache;
batch elements are independent, so one backward of the summed loss gives every element its own
gradient.  Below its own layer an element is the dense model, so the batch is *staggered*: row 0 runs
the dense model from the embeddings up, and an element's row joins at the input of its layer as a copy
of row 0 (detached: its gradient is only needed from its site upward; :func:`staggered_rows`).  Layer l
thus runs 1 + (elements of layers <= l) rows, about half the arithmetic of running every element through
every layer, and each backward stops at its element's layer.  ``budget`` bounds the token positions a
pass computes (memory): the prompt step fits about ``budget // prompt length`` elements in a pass
(:meth:`IntegratedGradients.prompt_row_cost`).  alpha_n = 1 leaves the model dense: where the dense
step's gradients are at hand they are that term and its elements are not run.

Steps t >= 1 compute one position each, so one step per pass leaves a GPU idle on per-pass overhead.
Packed (:meth:`IntegratedGradients.packed_steps`), the elements of all later steps share as few passes as
the budget allows, several steps per pass, after the dense steps ran and kept their final KV cache.  Each
step in a pass has its own dense row.  No row gets a cache of its own: the pass runs the rows' new tokens
with no cache object and ``position_ids = P-1+t``, and every attention module reads the ONE shared final
cache (:func:`utils.kv_cache.shared_prefix_attention`, switched in through transformers'
AttentionInterface for the pass only): a row of step t attends to the first P+t-1 cached positions, bit
for bit the cache step t ran against (the cache only grows), plus its own new key/value.  A row then
costs its one position plus its attention logits over the cached positions
(:meth:`IntegratedGradients.cache_weight`), not a copy of the cache: with a long prompt a pass holds tens
of times more rows than per-row cache copies allowed.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .kv_cache import SharedPrefix, repeated_cache
from .sites import COMPONENTS
from .units import head_mean

# integrated-gradients steps allowed: far beyond the 20-300 the field uses, small enough that the alpha grid
# and the step bookkeeping fit in memory (a huge count would grow the process until the kernel kills it)
MAX_IG_STEPS = 100_000


def ig_alphas(n_steps: int) -> list[float]:
    """The IG grid: alpha_k = k / n_steps for k = 1..n_steps (the last, 1, is the dense model)."""
    return [k / n_steps for k in range(1, n_steps + 1)]


def alphas_run(n_steps: int, dense_grads) -> list[float]:
    """The alphas whose elements run as rows: the whole grid, or all but alpha_n = 1 when the dense step's
    gradients stand in for it (:func:`add_alpha_one`)."""
    grid = ig_alphas(n_steps)
    return grid if dense_grads is None else grid[:-1]


def add_alpha_one(sums: dict, dense_grads) -> dict:
    """Add the alpha_n = 1 term, the dense gradient, to each site's sum over the other alphas (last, as
    the loop over the grid would)."""
    if dense_grads is None:
        return sums
    return {site: (sums[site] + g[0].float()) if site in sums else g[0].float()
            for site, g in dense_grads.items()}


def ig_from_gradients(comp: str, x: torch.Tensor, g_mean: torch.Tensor, head_dim: int) -> torch.Tensor:
    """IG of one site: ``x ⊙ mean_k g(alpha_k)``, a per-head mean for heads."""
    return head_mean(comp, x.float() * g_mean.float(), head_dim)


def saved_per_position(layout) -> int:
    """Elements one decoder layer saves for the backward per computed position: about 4 hidden, 3
    intermediate and 2 attention widths.  The unit of every memory estimate of a pass's position budget."""
    return 4 * layout.hidden + 3 * layout.intermediate + 2 * layout.num_heads * layout.head_dim


def pack_rows(elements, prompt_len: int, budget: int, cache_weight: float) -> list[list]:
    """Consecutive chunks of packed IG elements ``(t, comp, layer, alpha)``, each within ``budget``: a row of
    step t costs its one position plus its P+t-1 cached positions at ``cache_weight`` each
    (:meth:`IntegratedGradients.cache_weight`)."""
    chunks, current, cost = [], [], 0.0
    for e in elements:
        row_cost = 1.0 + cache_weight * (prompt_len + e[0] - 1)
        if current and cost + row_cost > budget:
            chunks.append(current)
            current, cost = [], 0.0
        current.append(e)
        cost += row_cost
    if current:
        chunks.append(current)
    return chunks


@contextlib.contextmanager
def staggered_rows(decoder_layers, rows: list[int], source: torch.Tensor | None = None, full: int | None = None):
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

    handles = [block.register_forward_pre_hook(grow(l), with_kwargs=True) for l, block in enumerate(decoder_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class IntegratedGradients:
    """Mean IG gradients of one sample's steps: ``{(comp, layer): mean over the grid of dLoss/d(unit
    output)}`` (``[W]``), run through the one-pass primitives of ``passes``
    (:class:`~utils.passes.DensePasses`: its site hooks, ``forward``, ``decoder_cache`` and
    ``shared_prefix_logits``)."""

    def __init__(self, passes):
        self.passes = passes
        self.hooks = passes.hooks
        self.layout = passes.layout

    # -- what a row costs, in computed positions of a backward pass -------------------------------------
    def cache_weight(self) -> float:
        """Memory of one cached position a packed IG row attends to, relative to one computed position of
        a backward pass.  The rows share one cache (:class:`~utils.kv_cache.SharedPrefix`), so a row holds
        no keys or values, only its attention logits over the position: about four per query head at a
        time (scores, masked scores, float32 probabilities kept for the backward, their gradient), against
        the activations a layer saves per computed position (:func:`saved_per_position`)."""
        return 4 * self.layout.num_heads / saved_per_position(self.layout)

    def prompt_row_cost(self, prompt_len: int) -> float:
        """Budget cost of one IG element of the prompt step (:meth:`step`, split): its last position,
        computed with autograd, is one; each of its ``prompt_len - 1`` earlier positions runs without
        autograd, so it saves no activations: it keeps its keys and values in every layer, holds one
        layer's activations and attention scores while that layer runs, and is attended to by the last
        position (:meth:`cache_weight`).  Counted as whole positions they would cut the prompt step into
        several times more passes than its memory needs (on a GPU, where a pass costs its launches, the
        prompt step was most of a short sample's IG passes)."""
        lay = self.layout
        act = saved_per_position(lay)
        kv = 2 * lay.num_kv_heads * lay.head_dim
        earlier = prompt_len - 1
        per_position = (lay.num_layers * kv + act + lay.num_heads * earlier) / (lay.num_layers * act)
        return 1.0 + earlier * (per_position + self.cache_weight())

    # -- one step per pass ------------------------------------------------------------------------------
    def step(self, input_ids, target, cache, n_steps: int, budget: int, dense_grads=None) -> dict:
        """Mean over the grid of the gradient at every site, each site scaled alone: ``{(comp, l): [W]}``.

        The probe sits at the step's last position, and nothing at an earlier position depends on it
        (causal attention), so its gradient flows back through that position's column only; the earlier
        positions enter as keys and values, constants of the backward.  The prompt step (``cache`` None,
        several positions) therefore runs its positions before the last without autograd (scaled like
        the rest, each row into its own cache) and then the last position with autograd against that
        cache: the same gradients, with a backward over one position instead of the whole prompt.

        ``dense_grads`` (``{(comp, l): [1, W]}``, the dense step's gradients): alpha_n = 1 leaves the model
        dense, so its gradient is the dense one and those elements are not run (:func:`add_alpha_one`)."""
        L = self.layout.num_layers
        split = cache is None and input_ids.shape[1] > 1
        device = input_ids.device
        # ordered by layer, so each chunk's rows join the staggered batch in order
        elements = [(c, l, alpha) for l in range(L) for c in COMPONENTS for alpha in alphas_run(n_steps, dense_grads)]
        # an element of the split prompt step computes one position with autograd, the rest without
        per_pass = max(1, int(budget // (self.prompt_row_cost(input_ids.shape[1]) if split
                                          else input_ids.shape[1])))
        sums = {}
        for start in range(0, len(elements), per_pass):
            chunk = elements[start:start + per_pass]
            B = len(chunk)
            layer_of = torch.tensor([l for _, l, _ in chunk])
            rows = [1 + int((layer_of <= l).sum()) for l in range(L)]      # row 0: the dense row
            scales = {c: torch.ones(B + 1, L) for c in COMPONENTS}         # filled on the CPU, sent once
            for b, (c, l, alpha) in enumerate(chunk):
                scales[c][b + 1, l] = alpha
            scales = {c: s.to(device) for c, s in scales.items()}
            step_ids = input_ids
            if cache is not None:
                batch_cache = repeated_cache(cache, rows)
            elif split:
                # the prompt's positions before the last, scaled like the rest, without autograd: they
                # become each row's own cache (layer l holds rows[l] rows, as the staggered batch runs it)
                with torch.no_grad(), self.hooks.settings(scales=scales), \
                        staggered_rows(self.layout.decoder_layers, rows):
                    batch_cache = self.passes.decoder_cache(input_ids[:, :-1])
                step_ids = input_ids[:, -1:]
            else:
                batch_cache = None
            with torch.enable_grad(), self.hooks.settings(scales=scales, probe=True), \
                    staggered_rows(self.layout.decoder_layers, rows):
                logits, _ = self.passes.forward(step_ids, batch_cache, use_cache=batch_cache is not None)
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
        return {key: value / n_steps for key, value in add_alpha_one(sums, dense_grads).items()}

    # -- several steps per pass -------------------------------------------------------------------------
    def packed_steps(self, prompt_len: int, labels, cache, n_steps: int, budget: int, on_token=None,
                     dense_grads=None) -> dict:
        """IG of steps t = 1..T-1, several steps' elements per pass: ``{t: {(comp, l): mean_k g}}``.

        ``cache`` is the sample's dense cache of at least P+T-2 positions
        (:meth:`utils.passes.DensePasses._prefix_steps`); the cache step t runs against is its first
        P+t-1 positions.  A pass holds one dense row per step it covers plus that step's elements
        (``(comp, layer, alpha)``), staggered by layer as in :meth:`step`.  The rows run with no cache
        object and ``position_ids = P-1+t``; their attention reads ``cache`` itself, shared
        (:class:`~utils.kv_cache.SharedPrefix`), row of step t up to its first P+t-1 positions.
        ``on_token(t)`` follows the pass that finishes step t.  ``dense_grads``: per step, as for
        :meth:`step`."""
        L, T, device = self.layout.num_layers, labels.shape[0], labels.device
        elements = [(t, c, l, alpha) for t in range(1, T) for l in range(L) for c in COMPONENTS
                    for alpha in alphas_run(n_steps, dense_grads)]
        chunks = pack_rows(elements, prompt_len, budget, self.cache_weight())
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
            comp_of = torch.tensor([COMPONENTS.index(e[1]) for e in chunk])
            alpha = torch.tensor([e[3] for e in chunk])
            scales = {}
            for ci, c in enumerate(COMPONENTS):
                mine = (comp_of == ci).nonzero().squeeze(1)
                scales[c] = torch.ones(K + B, L).index_put_((K + mine, layer_of[mine]), alpha[mine]).to(device)
            # row of step t sees the first P+t-1 positions of the shared cache, then its own token
            prefix = SharedPrefix(cache, prompt_len + step_of_row - 1, width)
            with torch.enable_grad(), self.hooks.settings(scales=scales, probe=True), \
                    staggered_rows(self.layout.decoder_layers, rows, source=src, full=K + B):
                # a layer that bypassed the shared cache attended to its own token only: results would be wrong
                logits = self.passes.shared_prefix_logits(labels[step_of_row - 1][:, None],
                                                    (prompt_len - 1 + step_of_row)[:, None], prefix,
                                                    "packed IG cannot run on this model, run it with "
                                                    "ig_packed=False")
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
            sums = {t: add_alpha_one(site, dense_grads[t]) for t, site in sums.items()}
        return {t: {key: v / n_steps for key, v in site.items()} for t, site in sums.items()}
