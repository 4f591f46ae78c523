"""Per-token scores of every head and MLP neuron (METHOD §3), the fast way: the runner of one sample's
passes.  :class:`Attributor` picks how the steps run (``step_mode``, :func:`resolve_step_mode`), runs their
dense passes (:mod:`utils.passes`: magnitude, gradient, GxO and the per-layer gradient norms of *all*
layers and both components) and integrated gradients (:mod:`utils.ig`), and turns unit outputs and
gradients into scores (:func:`unit_scores`).

``batch_size`` bounds the token positions a pass computes (memory); ``batch_size=None`` picks it from
free CUDA memory (:meth:`Attributor.position_budget`, :mod:`utils.memory`), halved after a pass runs out
of memory.  With ``ig_packed`` the dense steps run first, as the rows of one pass against a shared cache
(``prefix``), and the IG elements of all later steps are then packed into as few passes as the budget
allows, every row reading that one cache (:meth:`utils.ig.IntegratedGradients.packed_steps`).
Sliding-window layers keep only their last window - 1 positions, so a sequence longer than the window
keeps the one-step-per-pass path, as does a model whose attention does not dispatch through the
AttentionInterface (:meth:`~utils.passes.DensePasses.can_pack_ig`).
"""
from __future__ import annotations

import torch

from .artifacts import KINDS, score_key
from .ig import IntegratedGradients, ig_from_gradients, saved_per_position
from .memory import free_memory_budget, halve_on_oom
from .passes import DensePasses
from .sites import ATTN, COMPONENTS, SiteHooks
from .units import head_mean

# the kinds attribution_attention.py --metric computes: every per-unit kind of a backward or IG pass
SCORE_METRICS = tuple(k.name for k in KINDS.values() if k.computed_by in ("backward", "ig") and not k.per_layer)
DEFAULT_POSITION_BUDGET = 2048   # token positions per pass where free memory cannot be asked (CPU)
STEP_MODES = ("auto", "cached", "batched", "prefix")


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


class Attributor(DensePasses):
    """Scores the units of ``model`` along teacher-forced label sequences (its dense passes:
    :class:`~utils.passes.DensePasses`; its integrated gradients: ``ig``)."""

    def __init__(self, model, hooks: SiteHooks | None = None):
        super().__init__(model, hooks)
        self.ig = IntegratedGradients(self)
        self._budget_cap = None      # automatic IG budget after an out-of-memory retry

    # -- integrated gradients, within memory ------------------------------------------------------
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

        def attempt(positions):
            done = [0]

            def tick(_t):
                done[0] += 1
                if done[0] > reported[0]:
                    reported[0] = done[0]
                    if on_step is not None:
                        on_step()
            return self._packed_sample(prompt_ids, labels, gradients, ig_steps, positions, tick)

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
        :data:`DEFAULT_POSITION_BUDGET`; elsewhere :data:`DEFAULT_POSITION_BUDGET`.  After a packed IG pass ran
        out of memory, the smaller budget that fitted (:meth:`_packed_sample_within_memory`)."""
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
        its cache) or ``auto`` (:func:`resolve_step_mode`).  ``batch_size`` bounds the token positions one
        forward/backward pass computes (memory), for IG and for batched steps; a cached position held by an
        IG row counts as ``ig.cache_weight()`` of one, a prompt position an IG element of the prompt step
        runs without autograd as ``ig.prompt_row_cost`` says (:class:`utils.ig.IntegratedGradients`).
        ``batch_size=None`` chooses it from free device memory (:meth:`position_budget`; halved, down to 1,
        while a pass runs out of memory).  ``ig_packed`` runs the IG elements of several steps per pass
        (``ig.packed_steps``; default, on every device: with the shared-cache attention it also beats one
        step per pass on a CPU, 2.2x with a 400-token prompt); False: one step per pass.
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
