"""One greedy decode loop for dense and sparse models alike, built for speed measurements.

A ``StaticCache`` (each layer sizes itself from its first keys, so sparse layers with fewer KV heads
are fine), an eager prefill, then one step function
``model(input_ids=tok, position_ids=pos, cache=...).logits[:, -1:].argmax(-1)`` called once per token.
On CUDA the step is compiled with ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA
graphs): ``torch.compiler.cudagraph_mark_step_begin()`` before each call, the inputs updated in place,
the output cloned before the next replay overwrites it.  (Compiling the model's forward and calling
``generate(cache_implementation="static")`` fails on CUDA graphs with "accessing tensor output of
CUDAGraphs that has been overwritten"; this loop owns every buffer instead.)  On a CPU it runs eager
unless ``compile`` is given.

:func:`fuse_projections` cuts the fixed per-token cost (kernel launches): one matrix for q/k/v and one
for gate/up, keeping the stock HF forward.
"""
from __future__ import annotations

import inspect
import time

import torch
from torch import nn

from .architecture import (FUSED_GATE_UP, FUSED_QKV, decoder_layers, gate_up_names, layer_modules, qkv_names,
                           spell_qkv)
from .errors import PipelineError
from .kv_cache import cache_argument_name
from .sparse_model import SparsePlan, make_linear, shallow_clone, sparse_cache

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _FusedLinear(nn.Module):
    """One Linear computing the outputs of several projections of the same input at once.  The
    :class:`_FusedPart` modules standing where the separate projections were hand out the pieces: the
    first part computes all of them and keeps the others until their parts are called.  Exact for
    forwards that call the parts in order on the same input, as the stock q/k/v projections of Phi,
    Llama, Gemma-3, Mistral and Qwen2 and the gate/up projections of their gated MLPs do."""

    def __init__(self, linears):
        super().__init__()
        weight = torch.cat([lin.weight for lin in linears])
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([lin.bias if lin.bias is not None else
                              torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                              for lin in linears])
        self.proj = make_linear(weight, bias)
        self.sizes = [lin.out_features for lin in linears]
        self._pending = None

    def piece(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            pieces = self.proj(x).split(self.sizes, dim=-1)
            self._pending = pieces[1:]
            return pieces[0]
        pieces = self._pending
        if index == len(self.sizes) - 1:
            self._pending = None          # hold nothing between forward passes
        return pieces[index - 1]


class _FusedPart(nn.Module):
    def __init__(self, owner: _FusedLinear, index: int, out_features: int):
        super().__init__()
        self.__dict__["owner"] = owner   # not a child: the owner is registered once, on the parent
        self.index = index
        self.out_features = out_features

    def forward(self, x):
        return self.owner.piece(self.index, x)


def _fuse(parent: nn.Module, names, fused_name: str) -> None:
    linears = [getattr(parent, n) for n in names]
    owner = _FusedLinear(linears)
    setattr(parent, fused_name, owner)
    for i, (name, lin) in enumerate(zip(names, linears)):
        setattr(parent, name, _FusedPart(owner, i, lin.out_features))


def fuse_projections(model: nn.Module) -> nn.Module:
    """A new model (sharing every unchanged module) with q/k/v as one matrix per layer and, for gated
    MLPs, gate/up as one.  A plain MLP (Phi's fc1 -> act -> fc2) has nothing to fuse.  The concatenated
    weights are new tensors: drop the unfused model to keep one copy."""
    fused = shallow_clone(model)
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(fused)):
            found = layer_modules(layer, index)
            qkv = qkv_names(found.attention)
            if qkv is None:
                raise PipelineError(f"fuse_projections needs {spell_qkv()} Linear modules in "
                                    f"{type(layer).__name__}.{found.attention_name}; run without --fused")
            _fuse(found.attention, qkv, FUSED_QKV)
            gate_up = gate_up_names(found.mlp)
            if gate_up is not None:
                _fuse(found.mlp, gate_up, FUSED_GATE_UP)
    return fused


def _static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


class GreedyDecoder:
    """Greedy decoding of ``batch`` sequences of at most ``max_len`` tokens (prompt + new) with one
    static cache and one (optionally compiled) step function, both reused across :meth:`generate`
    calls so a compiled step and its CUDA graph are built once.

    ``compile``: None/"none" (eager) or a ``torch.compile`` mode; "reduce-overhead" uses CUDA graphs
    and needs a CUDA model.  ``backend``: torch.compile's backend ("eager" checks that the step traces
    as one graph without generating code)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, compile: str | None = None,
                 backend: str = "inductor"):
        self.model = model
        self.device = next(model.parameters()).device
        self.batch, self.max_len = batch, max_len
        mode = None if compile in (None, "none") else compile
        if mode is not None and mode not in COMPILE_MODES:
            raise PipelineError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune")
        if self.cudagraphs and self.device.type != "cuda":
            raise PipelineError(f"compile mode {mode!r} uses CUDA graphs; on {self.device.type} use 'default' or none")
        self.cache_name = cache_argument_name(model)
        self.takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        self.cache = _static_cache(model, max_len)
        # the step's inputs live in fixed buffers updated in place (CUDA graphs replay fixed addresses)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.next_pos = 0
        if mode is not None:
            # dynamo keeps compiled versions per code object, and every decoder (dense, each sparse
            # model, each batch) shares _step's: allow enough before it silently falls back to eager
            for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit"):
                if isinstance(getattr(torch._dynamo.config, name, None), int):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            if self.device.type == "cuda":
                for buf in (self.tok, self.pos, self.cache_pos):
                    torch._dynamo.mark_static_address(buf)   # fixed inputs: no copy into the graph
        self.step = self._step if mode is None else torch.compile(
            self._step, fullgraph=True, backend=backend, **({"mode": mode} if backend == "inductor" else {}))

    def _kwargs(self, model, input_ids, position_ids, cache, cache_position) -> dict:
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": True,
                  self.cache_name: cache}
        if self.takes_cache_position:     # transformers < 5.2x reads positions from cache_position
            kwargs["cache_position"] = cache_position
        return kwargs

    def _step(self):
        out = self.model(**self._kwargs(self.model, self.tok, self.pos, self.cache, self.cache_pos))
        return out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor, prefill_model: nn.Module | None = None,
                plan: SparsePlan | None = None) -> torch.Tensor:
        """Reset the cache and run the prompt; returns the first new token ``[B, 1]``.  With
        ``prefill_model`` (the dense model) and ``plan``, the prompt runs dense and its cache is handed
        over to this decoder's (sparse) model: only the plan's KV heads are kept."""
        prompt_ids = prompt_ids.to(self.device)
        B, P = prompt_ids.shape
        if B != self.batch:
            raise PipelineError(f"this decoder was built for batch {self.batch}, not {B}")
        if P + 1 > self.max_len:
            raise PipelineError(f"prompt of {P} tokens does not fit a cache of {self.max_len}")
        self.cache.reset()
        positions = torch.arange(P, device=self.device)
        pos_ids = positions[None].expand(B, -1)
        if prefill_model is None:
            out = self.model(**self._kwargs(self.model, prompt_ids, pos_ids, self.cache, positions))
        else:
            if plan is None:
                raise PipelineError("a dense prefill handed over to a sparse model needs its plan")
            from transformers import DynamicCache

            dense_cache = DynamicCache()
            name = cache_argument_name(prefill_model)
            kwargs = {"input_ids": prompt_ids, "position_ids": pos_ids, "use_cache": True, name: dense_cache}
            if "cache_position" in inspect.signature(prefill_model.forward).parameters:
                kwargs["cache_position"] = positions
            out = prefill_model(**kwargs)
            handed = sparse_cache(dense_cache, plan)
            for target, layer in zip(self.cache.layers, handed.layers):
                # a layer's own update: sizes a static layer from these keys and writes positions 0..P-1
                target.update(layer.keys, layer.values, {"cache_position": positions})
        self.pos.fill_(P)
        self.cache_pos.fill_(P)
        self.next_pos = P         # on the host too: checking a bound must not wait for the device
        first = out.logits[:, -1:].argmax(-1)
        self.tok.copy_(first)
        return first

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, new_tokens: int, prefill_model: nn.Module | None = None,
                 plan: SparsePlan | None = None, timings: dict | None = None) -> torch.Tensor:
        """Greedy ``new_tokens`` tokens (no EOS stop: a fixed length, as speed measurements need)
        after ``prompt_ids [B, P]``; returns ``[B, new_tokens]``.  ``timings``: a dict that receives
        ``prefill_s`` and ``decode_s`` (the new_tokens - 1 steps), the device synchronised at each."""
        if prompt_ids.shape[1] + new_tokens > self.max_len:
            raise PipelineError(f"{prompt_ids.shape[1]} prompt + {new_tokens} new tokens exceed the cache "
                                f"length {self.max_len}")
        self._sync()
        start = time.perf_counter()
        first = self.prefill(prompt_ids, prefill_model, plan)
        self._sync()
        mid = time.perf_counter()
        rest = self.decode_steps(new_tokens - 1)
        self._sync()
        if timings is not None:
            timings["prefill_s"] = mid - start
            timings["decode_s"] = time.perf_counter() - mid
        return torch.cat([first, rest], dim=1)

    @torch.no_grad()
    def decode_steps(self, steps: int) -> torch.Tensor:
        """``steps`` greedy tokens ``[B, steps]`` after the last :meth:`prefill` or decode step (the
        token, position and cache carry on from there)."""
        if self.next_pos + steps > self.max_len:
            raise PipelineError(f"{steps} more tokens after position {self.next_pos} exceed the cache length "
                                f"{self.max_len}")
        tokens = []
        for _ in range(steps):
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            nxt = self.step().clone()       # the graph's output buffer is overwritten by the next replay
            tokens.append(nxt)
            self.tok.copy_(nxt)
            self.pos.add_(1)
            self.cache_pos.add_(1)
            self.next_pos += 1
        return torch.cat(tokens, dim=1) if tokens else self.tok.new_zeros(self.batch, 0)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
