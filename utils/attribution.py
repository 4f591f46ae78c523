"""Per-token scores of every head and MLP neuron (METHOD §3), the fast way: the runner of one sample's
passes.  Integrated gradients run in :mod:`utils.ig`; the automatic position budget and its
out-of-memory retry use :mod:`utils.memory`.

For one sample, generation step t runs the prompt (t = 0) or label token t-1 (t > 0) against the KV cache
of earlier steps, teacher-forced on the dense label, and the loss is CE(logits at the last position,
label[t]).  One forward and one backward per step give magnitude, gradient, GxO and the per-layer
gradient norms for *all* layers and both components: zero probes at every site's last position collect
dLoss/d(unit output) in a single ``torch.autograd.grad`` call.

``batch_size`` bounds the token positions a pass computes (memory); ``batch_size=None`` picks it from
free CUDA memory (:meth:`Attributor.position_budget`).  With ``ig_packed`` the dense steps run first, as
the rows of one pass against a shared cache (:meth:`Attributor._prefix_steps`), and the IG elements of
all later steps are then packed into as few passes as the budget allows, every row reading that one
cache (:meth:`utils.ig.IntegratedGradients.packed_steps`).  Sliding-window layers keep only their last
window - 1 positions, so a sequence longer than the window keeps the one-step-per-pass path, as does a
model whose attention does not dispatch through the AttentionInterface (:meth:`Attributor.can_pack_ig`).

``step_mode="batched"`` computes gradient, GxO and magnitudes of all steps of a sample as one batch
instead (no integrated gradients): element t is the whole teacher-forced sequence prompt + label[:T-1]
with its probe and loss at position P-1+t (``batch_size // (P+T-1)`` elements per pass).
Causal attention makes the positions after P-1+t irrelevant to that loss, so this equals the per-step
computation; it does T times the arithmetic in a few large passes, which a GPU runs far faster than T
small ones (a CPU does not: ``auto`` picks it on CUDA only).  ``step_mode="prefix"`` runs the dense
steps as the rows of one pass against the shared cache (:meth:`Attributor._prefix_steps`).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .artifacts import score_key
from .errors import PipelineError
from .ig import IntegratedGradients, ig_from_gradients, saved_per_position
from .kv_cache import (SharedPrefix, cache_argument_name, detach_cache_, forward_kwargs, output_cache,
                       shared_prefix_pass, sliding_window)
from .memory import free_memory_budget, halve_on_oom
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
        self.ig = IntegratedGradients(self.hooks, self._forward, self._cache_of, self._shared_prefix_logits)

    def close(self) -> None:
        """Remove the hooks this attributor put on the model."""
        self.hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one forward pass -------------------------------------------------------------------------
    def _pass_kwargs(self, input_ids: torch.Tensor, cache=None, use_cache: bool = True, position_ids=None) -> dict:
        """Keyword arguments of a pass whose logits are read at the last position only."""
        kwargs = forward_kwargs(self._cache_name, input_ids, cache, use_cache=use_cache)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        return kwargs

    def _forward(self, input_ids: torch.Tensor, cache, use_cache: bool = True):
        out = self.model(**self._pass_kwargs(input_ids, cache, use_cache=use_cache))
        return last_logits(out.logits), (output_cache(out) if use_cache else None)

    def _cache_of(self, input_ids):
        """The KV cache of a pass over ``input_ids`` that needs no logits: the decoder alone
        (``base_model``), so not even the last position pays for the vocabulary projection (which, on a
        sliced, staggered batch, ran as a slow batched matmul)."""
        return output_cache(self.model.base_model(input_ids=input_ids, use_cache=True))

    def _shared_prefix_logits(self, input_ids, position_ids, prefix: SharedPrefix, fix: str) -> torch.Tensor:
        """Last logits of a pass of one-token rows (``input_ids`` ``[rows, 1]`` at ``position_ids``), no cache
        object: every attention module reads ``prefix`` instead (:func:`utils.kv_cache.shared_prefix_pass`).
        A layer that bypassed it attended to its row's own token only, so a model where not every layer read
        it is refused, with ``fix`` as the message's remedy."""
        with shared_prefix_pass(self.model, prefix):
            logits = last_logits(self.model(**self._pass_kwargs(input_ids, use_cache=False,
                                                                position_ids=position_ids)).logits)
        L = self.layout.num_layers
        if prefix.calls != L:
            raise PipelineError(f"{type(self.model).__name__} ran the shared-cache attention in "
                                f"{prefix.calls} of {L} layers; {fix}")
        return logits

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
        device = labels.device
        seq = torch.cat([prompt_ids[0], labels[:-1]])          # step t's new token is seq[P-1+t]
        width = P + T - 2                                       # the longest prefix a step reads
        with torch.no_grad():
            cache = self._cache_of(seq[None, :width])
        positions = P - 1 + torch.arange(T, device=device)
        prefix = SharedPrefix(cache, positions, width)
        with torch.set_grad_enabled(with_grad), self.hooks.settings(record=True, probe=with_grad):
            logits = self._shared_prefix_logits(seq[P - 1:, None], positions[:, None], prefix,
                                                "run it with step_mode='cached'")
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

    def can_pack_ig(self, prompt_len: int, label_len: int) -> bool:
        """Packed IG needs a model whose attention modules dispatch through transformers'
        AttentionInterface (``_supports_attention_backend``: the shared-cache attention is switched in
        there) and the whole sequence in every layer's cache: a sliding-window layer keeps only its last
        window - 1 positions, so a sequence longer than the window keeps the one-step-per-pass path."""
        if not getattr(self.model, "_supports_attention_backend", False):
            return False
        window = sliding_window(self.model)
        return window is None or prompt_len + label_len <= window

    def _packed_sample(self, prompt_ids, labels, gradients, ig_steps, budget, on_token):
        """Dense steps first (:meth:`_prefix_steps`; their cache is the one every IG pass reuses), then IG of
        step 0 (the prompt) and of all later steps packed: ``[(xs, grads, ig)]`` per step.  ``on_token(t)``
        follows each step's IG."""
        # with gradients always: they are IG's alpha = 1 term (utils.ig.add_alpha_one)
        dense, cache = self._prefix_steps(prompt_ids, labels, True)
        grads = [g for _, g in dense]
        ig = {0: self.ig.step(prompt_ids, labels[0:1], None, ig_steps, budget, dense_grads=grads[0])}
        on_token(0)
        ig.update(self.ig.packed_steps(prompt_ids.shape[1], labels, cache, ig_steps, budget, on_token=on_token,
                                       dense_grads=grads))
        return [(xs, g if gradients else None, ig[t]) for t, (xs, g) in enumerate(dense)]

    def _packed_sample_within_memory(self, prompt_ids, labels, gradients, ig_steps, budget, auto_budget, on_step):
        """:meth:`_packed_sample`; with an automatic budget (an estimate), retried at half the budget after
        running out of memory, and the smaller budget kept for later samples.  Progress a failed attempt
        reported is not reported again."""
        reported = [0]

        def attempt(budget):
            done = [0]

            def tick(_t):
                done[0] += 1
                if done[0] > reported[0]:
                    reported[0] = done[0]
                    if on_step is not None:
                        on_step()
            return self._packed_sample(prompt_ids, labels, gradients, ig_steps, budget, tick)

        if not auto_budget:
            return attempt(budget)
        result, used = halve_on_oom(attempt, budget, "free GPU memory (another process may hold it) or score on "
                                                     "the CPU with --device cpu")
        if used < budget:
            self._budget_cap = used
        return result

    def position_budget(self, requested: int | None = None) -> int:
        """Token positions per IG pass: ``requested`` if given; on CUDA, what 60% of the free memory holds
        (the activations every layer saves per position, and a row's logits), at least
        :data:`DEFAULT_POSITION_BUDGET`; elsewhere :data:`DEFAULT_POSITION_BUDGET`."""
        if requested:
            return int(requested)
        if self._budget_cap is not None:          # an earlier pass ran out of memory at a larger one
            return self._budget_cap
        weights = next(self.model.parameters())
        vocab = self.model.get_output_embeddings().weight.shape[0]
        per_position = self.layout.num_layers * saved_per_position(self.layout) * weights.element_size() \
            + 4 * vocab * 4
        # an overestimate already (frozen weights save fewer activations); an out-of-memory pass halves it
        return free_memory_budget(weights.device, 0.6, per_item=per_position, lower=DEFAULT_POSITION_BUDGET,
                                  otherwise=DEFAULT_POSITION_BUDGET)

    def _batched_steps(self, prompt_ids, labels, with_grad: bool, batch_size: int):
        """x (and g) at every step's position, all steps teacher-forced as batch elements.

        Returns per step t: ``({comp: [x_l]}, {(comp, l): g} or None)`` like the cached dense pass."""
        P, T = prompt_ids.shape[1], labels.shape[0]
        seq = torch.cat([prompt_ids[0], labels[:-1]])[None]          # [1, P+T-1]
        if not with_grad:
            # No gradients, no per-step losses to keep apart: causal attention makes position P-1+t of the
            # one teacher-forced sequence exactly what step t computes, so one row records every step.
            # (A batch-1 pass reads the weights once per sample instead of once per token.)
            kwargs = self._pass_kwargs(seq, use_cache=False)             # no step needs the logits
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
        cached position held by an IG row counts as ``ig.cache_weight()`` of one, a prompt position an IG
        element of the prompt step runs without autograd as ``ig.prompt_row_cost`` says
        (:class:`utils.ig.IntegratedGradients`).  ``batch_size=None`` chooses it from free device memory
        (:meth:`position_budget`; after running out of memory, half of it).  ``ig_packed`` runs the IG
        elements of several steps per pass (``ig.packed_steps``; default, on every device: with the shared-cache
        attention it also beats one step per pass on a CPU, 2.2x with a 400-token prompt); False: one step
        per pass.
        """
        device = next(self.model.parameters()).device
        step_mode = resolve_step_mode(step_mode, device, ig=bool(ig_steps), gradients=gradients)
        prompt_ids = prompt_ids.to(device)
        labels = torch.tensor(label_ids, dtype=torch.long, device=device)
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
        precomputed = None                     # [(xs, grads, ig)] per step, with packed IG
        if ig_steps and ig_packed and T > 1 and self.can_pack_ig(P, T):
            precomputed = self._packed_sample_within_memory(prompt_ids, labels, gradients, ig_steps, batch_size,
                                                            auto_budget, on_step)
        for t in range(T):
            ig = None
            if precomputed is not None:
                xs, grads, ig = precomputed[t]
            elif batched is not None:
                xs, grads = batched[t]
            else:
                step_input = prompt_ids if t == 0 else labels[t - 1:t].view(1, 1)
                target = labels[t:t + 1]
                ig = self.ig.step(step_input, target, cache, ig_steps, batch_size) if ig_steps else None
                xs, grads, cache = self._dense_step(step_input, target, cache, with_grad=gradients)
            steps.append(self._step_scores(xs, grads, ig))
            if on_step is not None and precomputed is None:
                on_step()
        if not steps:  # an empty label (the model stopped at once): zero steps, same layout
            return self._empty(gradients, ig_steps)
        return {key: torch.stack([s[key] for s in steps]).float().cpu() for key in steps[0]}

    def _step_scores(self, xs, grads, ig) -> dict:
        """One step's scores, ``{score key: [L, units]}`` (``[L]`` for gradient norms), from its unit outputs
        ``xs``, their gradients ``grads`` (or None) and IG's mean gradients ``ig`` (or None)."""
        hd, L = self.layout.head_dim, self.layout.num_layers
        row = {}
        for c in COMPONENTS:
            per_layer = [unit_scores(c, xs[c][l][0], grads[(c, l)][0] if grads else None, hd) for l in range(L)]
            for key in per_layer[0]:
                row[score_key(key, c)] = torch.stack([p[key] for p in per_layer])
            if ig is not None:
                row[score_key("ig", c)] = torch.stack([ig_from_gradients(c, xs[c][l][0], ig[(c, l)], hd)
                                                       for l in range(L)])
        return row

    def _empty(self, gradients: bool, ig_steps: int) -> dict:
        L, out = self.layout.num_layers, {}
        for c in COMPONENTS:
            U = self.layout.units(c)
            names = ["magnitude"] + (["gradient", "gxo"] if gradients else []) + (["ig"] if ig_steps else [])
            out.update({score_key(n, c): torch.zeros(0, L, U) for n in names})
            if gradients:
                out[score_key("grad_norm", c)] = torch.zeros(0, L)
        return out
