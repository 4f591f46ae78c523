"""The dense passes of one sample's generation steps (METHOD §3), three ways, and the one-pass primitives
the integrated gradients of :mod:`utils.ig` run on.

For one sample, generation step t runs the prompt (t = 0) or label token t-1 (t > 0) against the KV cache
of earlier steps, teacher-forced on the dense label, and the loss is CE(logits at the last position,
label[t]).  One forward and one backward per step give the unit outputs x and their gradients g for
*all* layers and both components: zero probes at every site's last position collect dLoss/d(unit output)
in a single ``torch.autograd.grad`` call (:meth:`DensePasses._dense_step`, step mode ``cached``).

``prefix`` (:meth:`DensePasses._prefix_steps`) runs every step's new token as one row of one pass that
reads a shared dense cache, the same arithmetic in two passes instead of T.

``batched`` (:meth:`DensePasses._batched_steps`) computes all steps of a sample as one batch instead:
element t is the whole teacher-forced sequence prompt + label[:T-1] with its probe and loss at position
P-1+t (``batch_size // (P+T-1)`` elements per pass).  Causal attention makes the positions after P-1+t
irrelevant to that loss, so this equals the per-step computation; it does T times the arithmetic in a few
large passes, which a GPU runs far faster than T small ones (a CPU does not).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .errors import PipelineError
from .kv_cache import (SharedPrefix, cache_argument_name, detach_cache_, forward_kwargs, output_cache,
                       shared_prefix_pass, sliding_window)
from .sites import COMPONENTS, SiteHooks


def last_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` float logits of the last position.  With one position (``logits_to_keep=1``) a squeeze: its
    backward is a view, where indexing's backward writes a zero tensor the size of all rows' logits and
    copies into it (two passes over rows x vocabulary in every IG backward)."""
    last = logits.squeeze(1) if logits.shape[1] == 1 else logits[:, -1]
    return last.float()


class DensePasses:
    """Passes of ``model`` over a sample's steps, recording unit outputs (and gradients) through its site
    hooks.  A step's result is ``({comp: [x_l]}, {(comp, l): g} or None)``, each ``[1, width]``."""

    def __init__(self, model, hooks: SiteHooks | None = None):
        self.model = model
        self.hooks = hooks or SiteHooks(model)
        self.layout = self.hooks.layout
        self._cache_name = cache_argument_name(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def close(self) -> None:
        """Remove the hooks these passes put on the model."""
        self.hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one forward pass (also what IG's passes run on: utils.ig) --------------------------------
    def _pass_kwargs(self, input_ids: torch.Tensor, cache=None, use_cache: bool = True, position_ids=None) -> dict:
        """Keyword arguments of a pass whose logits are read at the last position only."""
        kwargs = forward_kwargs(self._cache_name, input_ids, cache, use_cache=use_cache)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        return kwargs

    def forward(self, input_ids: torch.Tensor, cache, use_cache: bool = True):
        """One pass of ``input_ids`` against ``cache``: ``(float logits of the last position, the new cache or
        None without use_cache)``."""
        out = self.model(**self._pass_kwargs(input_ids, cache, use_cache=use_cache))
        return last_logits(out.logits), (output_cache(out) if use_cache else None)

    def decoder_cache(self, input_ids):
        """The KV cache of a pass over ``input_ids`` that needs no logits: the decoder alone
        (``base_model``), so not even the last position pays for the vocabulary projection (which, on a
        sliced, staggered batch, ran as a slow batched matmul)."""
        return output_cache(self.model.base_model(input_ids=input_ids, use_cache=True))

    def shared_prefix_logits(self, input_ids, position_ids, prefix: SharedPrefix, fix: str) -> torch.Tensor:
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

    # -- the dense passes of a sample's steps ------------------------------------------------------
    def _dense_step(self, input_ids, target, cache, with_grad: bool):
        """The dense pass of one step: records x (and g when ``with_grad``); returns the new cache."""
        with torch.set_grad_enabled(with_grad), self.hooks.settings(record=True, probe=with_grad):
            logits, cache = self.forward(input_ids, cache)
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
            cache = self.decoder_cache(seq[None, :width])
        positions = P - 1 + torch.arange(T, device=device)
        prefix = SharedPrefix(cache, positions, width)
        with torch.set_grad_enabled(with_grad), self.hooks.settings(record=True, probe=with_grad):
            logits = self.shared_prefix_logits(seq[P - 1:, None], positions[:, None], prefix,
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
