"""Per-token gathered decoding (METHOD §8): at every decode step a per-token mask source picks the units
(``predictor``) or input channels (``teal``) to keep, and the step reads only their weights, on the stock
transformers model (its modules replaced, no modeling code copied; the model's forward is unchanged).

- :func:`predictor_model` (the ``predictor`` source, utils/predictor.py): at each layer the component's
  :class:`~utils.predictor.Predictor` scores the heads (neurons) from the block input, which every supported
  family feeds unchanged to the block's first projection (q_proj; gate_proj or fc1), so the predictor runs
  there.  The top ``k`` per layer are kept (``k`` from the deactivation ratio, as ``utils.token_masks.top_share``
  keeps; a tie at the threshold keeps every tied unit, as the masker does).  Then only the kept heads' rows of
  the query projection are multiplied, the kept heads' columns of the output projection, the kept neurons'
  rows of gate/up (fc1) and columns of down (fc2).  Keys and values of every KV head are computed and cached
  as in the dense model: later tokens may keep heads this token pruned, and the zero-masked model caches them
  too.  A pruned head's query is zero, its attention runs (the stock attention, unchanged: a few hundred
  multiply-adds over its KV group's cache) and its output is never read, so the step equals zero-masking the
  pruned heads' outputs (``PredictorMasker``).
- :func:`teal_model` (the ``teal`` source, utils/teal.py): every block projection multiplies only the weight
  rows of its transposed ``[in, out]`` copy whose input channel is kept (``|x|`` or ``|x|·‖column‖`` at or
  above the calibrated threshold): ``F.embedding_bag(mode="sum")`` weighted by the kept inputs, equal to
  zero-masking the channels (``TealMasker``).

A gather of input channels (a column of ``W``, a row of ``Wᵀ``) is ``F.embedding_bag`` over the transposed
weight: it reads the kept rows in place and sums them, with no copy (on the 2-core CPU at 50 % kept it takes
0.66 of the dense GEMV's time, against 6.5x for ``index_select`` + matmul, which allocates and page-faults a
new matrix each token).  A gather of output rows (the query, gate/up rows) has no such stock kernel:
``rows="cpp"`` is a small C++ gather-GEMV built on first use (each kept row's dot product read in place: on
that CPU 50 % of gate+up in about a third of the dense GEMV's time), ``rows="index_select"`` copies the kept
rows into a buffer and multiplies (slower than the dense GEMV there), ``rows="compiled"`` lets
``torch.compile`` (inductor) fuse the gather into the dot products (``(W[idx] * x).sum(-1)``; about 0.8 of
the dense time at 50 %).

Positions other than a single decode token (the prompt) run dense, as every per-token source runs its
prompt.  ``static=True`` makes the selection shape-static (exactly ``k`` units by ``topk``, no host
synchronisation), so a step can be compiled whole with CUDA graphs (utils/decode.py); the tie rule then differs
from the masker's only when scores tie exactly at the threshold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import block_projections, decoder_layers, layer_modules, mlp_input_names, qkv_names, weight_out_in
from .errors import PipelineError
from .sites import ATTN, MLP
from .sparse_model import shallow_clone
from .token_masks import kept_units

ROW_MODES = ("cpp", "index_select", "compiled")
KERNELS = ("stock", "triton")
_compiled_rows = {}


class _RowsCopy:
    """``(w [N, m, in], idx [k], x [in]) -> [k, m]``: the kept rows copied into a buffer kept between calls (a
    new matrix each token would page-fault its pages in), then one matrix-vector product."""

    def __init__(self):
        self.buf = None

    def __call__(self, w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k, m = idx.shape[0], w.shape[1]
        shape = (k, m, w.shape[2])
        if self.buf is None or self.buf.shape != shape or self.buf.dtype != w.dtype:
            self.buf = w.new_empty(shape)
        return torch.mv(torch.index_select(w, 0, idx, out=self.buf).view(k * m, -1), x).view(k, m)


def _rows_fused(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w[idx] * x).sum(-1)


# A gather-GEMV for the CPU: each kept row's dot product with x, read in place (float accumulation), the rows
# split over torch's threads.  Built once per machine by torch.utils.cpp_extension (needs a C++ compiler and
# ninja; about 20 s) into torch's extension cache.
_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
template <typename T>
static void rows_kernel(const T* W, const int64_t* I, const T* X, T* O, int64_t k, int64_t m, int64_t in) {
  #pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t j = 0; j < k * m; ++j) {
    const T* row = W + (I[j / m] * m + j % m) * in;
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t i = 0; i < in; ++i) acc += static_cast<float>(row[i]) * static_cast<float>(X[i]);
    O[j] = static_cast<T>(acc);
  }
}
torch::Tensor gather_rows(torch::Tensor w, torch::Tensor idx, torch::Tensor x) {
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && x.is_contiguous() && idx.scalar_type() == torch::kLong &&
              w.scalar_type() == x.scalar_type(), "gather_rows: w [N, m, in] contiguous, idx long, x [in]");
  auto ix = idx.contiguous();
  const int64_t k = ix.size(0), m = w.size(1), in = w.size(2);
  auto out = torch::empty({k, m}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "gather_rows", [&] {
    rows_kernel<scalar_t>(w.data_ptr<scalar_t>(), ix.data_ptr<int64_t>(), x.data_ptr<scalar_t>(),
                          out.data_ptr<scalar_t>(), k, m, in);
  });
  return out;
}
"""
_cpp = {}


def cpp_rows():
    """The compiled CPU gather-GEMV ``(w [N, m, in], idx [k], x [in]) -> [k, m]``, built on first use."""
    if "fn" not in _cpp:
        from torch.utils.cpp_extension import load_inline

        try:
            ext = load_inline("sparse_activation_gather_rows", cpp_sources=_CPP_SOURCE, functions=["gather_rows"],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except (RuntimeError, OSError, ImportError) as err:
            raise PipelineError(f"cannot build the CPU gather kernel of --rows cpp ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); use --rows index_select") from None
        _cpp["fn"] = ext.gather_rows
    return _cpp["fn"]


def row_gather(mode: str, backend: str = "inductor"):
    """A function ``(w [N, m, in], idx [k], x [in]) -> [k, m]`` (the dot products of ``x`` with the rows
    ``w[idx]``) of a rows mode; "index_select" gives each caller its own buffer."""
    if mode == "index_select":
        return _RowsCopy()
    if mode == "cpp":
        return cpp_rows()
    if mode != "compiled":
        raise PipelineError(f"unknown rows mode {mode!r}; choose one of {', '.join(ROW_MODES)}")
    if backend not in _compiled_rows:
        _compiled_rows[backend] = torch.compile(_rows_fused, dynamic=True, backend=backend)
    return _compiled_rows[backend]


def column_gather(wt: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[1, out]``: ``Σ_j values[j] · wt[idx[j]]`` (``wt`` ``[in, out]``: the input channels ``idx`` of a
    projection, weighted by their inputs), reading only those rows."""
    # made per call: a tensor cached across calls, first made inside a CUDA-graphed step, is overwritten by
    # the graph's next replay (seen on an H100 with --compile reduce-overhead)
    offsets = idx.new_zeros(1)
    return F.embedding_bag(idx.view(-1), wt, offsets, per_sample_weights=values.reshape(-1).to(wt.dtype), mode="sum")


def _triton():
    """utils/triton_gemv (imported on first use: triton is optional)."""
    from . import triton_gemv

    triton_gemv.require()
    return triton_gemv


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise PipelineError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNELS)}")


def _one_token(x: torch.Tensor) -> bool:
    """Whether ``x`` ``[B, S, d]`` is one decode token (batch 1); a batch of single tokens is refused."""
    if x.dim() >= 3 and x.shape[-2] == 1 and x.shape[0] > 1:
        raise PipelineError(f"the gathered decode path runs batch 1, not {x.shape[0]}")
    return x.shape[:-1].numel() == 1


def select_units(scores: torch.Tensor, k: int, static: bool = False) -> torch.Tensor:
    """The units ``top_share`` keeps from ``scores`` ``[units]`` when it keeps ``k`` (every unit scoring at
    least the k-th largest score: ties at the threshold all kept); ``static``: exactly the top ``k``."""
    units = scores.shape[-1]
    if k >= units:
        return torch.arange(units, device=scores.device)
    if static:
        return scores.topk(k, sorted=False).indices
    threshold = scores.kthvalue(units - k + 1).values        # top_share's threshold: O(units), no sort
    return (scores >= threshold).nonzero().view(-1)


def keep_mask(scores: torch.Tensor, k: int, static: bool = False) -> torch.Tensor:
    """``[units]`` bool: the units :func:`select_units` keeps, as a mask of fixed shape (no ``nonzero``: no host
    synchronisation): every unit at or above the k-th largest score (ties all kept); ``static``: exactly the top
    ``k`` by ``topk`` (a GPU's ``topk`` is faster than its single-slice ``kthvalue``)."""
    units = scores.shape[-1]
    if k >= units:
        return torch.ones(units, dtype=torch.bool, device=scores.device)
    if static:
        return torch.zeros(units, dtype=torch.bool, device=scores.device).index_fill_(
            0, scores.topk(k, sorted=False).indices, True)
    return scores >= scores.kthvalue(units - k + 1).values


class _Gather(nn.Module):
    """What the parts of one block share: the predictor of the block's component and layer, the weights in
    their gather layouts, and the units the current token keeps (set by the first part, read by the rest)."""

    def __init__(self, predictor, layer: int, keep: int, static: bool, rows, kernels: str = "stock"):
        super().__init__()
        self.predictor, self.layer, self.keep, self.static = predictor, layer, keep, static
        self.rows = row_gather(rows, "inductor") if isinstance(rows, str) else rows
        self.triton = _triton() if kernels == "triton" else None
        self.idx = self.mask = None
        # the predictor's layer with its standardisation folded in: (h - mean) / scale @ down
        # = h @ (down / scale[:, None]) - (mean / scale) @ down (the same map; rounding may differ in the last bits)
        mean, scale, down = predictor.mean[layer], predictor.scale[layer], predictor.down[layer]
        self.p_down = (down / scale[:, None]).contiguous()
        self.p_shift = -((mean / scale) @ down)
        self.p_mid = None if predictor.mid is None else predictor.mid[layer]
        self.p_up, self.p_bias = predictor.up[layer], predictor.bias[layer]

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        z = torch.addmv(self.p_shift, self.p_down.t(), h.float())
        if self.p_mid is not None:
            z = torch.relu(z @ self.p_mid)
        return torch.addmv(self.p_bias, self.p_up.t(), z)

    def choose(self, h: torch.Tensor) -> torch.Tensor:
        """The kept units' indices (stock kernels; also held as ``self.idx``)."""
        self.idx = select_units(self.scores(h), self.keep, self.static)
        return self.idx

    def choose_mask(self, h: torch.Tensor) -> torch.Tensor:
        """The kept units as a bool mask (triton kernels; also held as ``self.mask``)."""
        self.mask = keep_mask(self.scores(h), self.keep, self.static)
        return self.mask


class _Part(nn.Module):
    def __init__(self, owner: nn.Module, index: int = 0):
        super().__init__()
        self.__dict__["owner"] = owner     # not a child: the owner is registered once, on the block
        self.index = index

    def forward(self, x):
        return self.owner.part(self.index, x)


class _HeadGather(_Gather):
    """The attention block: part 0 stands for the query projection, part 1 for the output projection."""

    def __init__(self, q: nn.Linear, out: nn.Linear, heads: int, head_dim: int, **kw):
        super().__init__(**kw)
        self.heads, self.head_dim = heads, head_dim
        self.q_weight = q.weight.view(heads, head_dim, -1)                          # a view: no copy
        self.q_bias = None if q.bias is None else q.bias.view(heads, head_dim)
        self.out_t = out.weight.t().contiguous()                                     # [heads * hd, out]
        self.out_bias = out.bias
        self.channels = torch.arange(heads * head_dim, device=out.weight.device).view(heads, head_dim)

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        H, hd = self.heads, self.head_dim
        if not _one_token(x):                                                       # the prompt: dense
            if index == 0:
                return F.linear(x, self.q_weight.view(H * hd, -1),
                                None if self.q_bias is None else self.q_bias.view(-1))
            y = x @ self.out_t
            return y if self.out_bias is None else y + self.out_bias
        if self.triton is not None:
            return self._part_triton(index, x)
        if index == 0:
            h = x.reshape(-1)
            idx = self.choose(h)
            q = self.rows(self.q_weight, idx, h)                                     # [k, hd]
            if self.q_bias is not None:
                q = q + self.q_bias.index_select(0, idx)
            full = q.new_zeros(H, hd).index_copy_(0, idx, q)     # pruned heads: a zero query, output unread
            return full.view(*x.shape[:-1], H * hd)
        idx = self.idx
        channels = self.channels.index_select(0, idx)
        kept = x.reshape(H, hd).index_select(0, idx)
        y = column_gather(self.out_t, channels, kept)
        if self.out_bias is not None:
            y = y + self.out_bias
        return y.view(*x.shape[:-1], -1)

    def _part_triton(self, index: int, x: torch.Tensor) -> torch.Tensor:
        # a pruned head's query is 0 (or its bias): its attention runs, its output channels are never read
        H, hd = self.heads, self.head_dim
        if index == 0:
            h = x.reshape(-1)
            q = self.triton.masked_rows(self.q_weight.view(H * hd, -1), h, self.choose_mask(h), hd).to(x.dtype)
            if self.q_bias is not None:
                q = q + self.q_bias.view(-1)
            return q.view(*x.shape[:-1], H * hd)
        y = self.triton.masked_columns(self.out_t, x.reshape(-1), self.mask, hd).to(x.dtype)
        if self.out_bias is not None:
            y = y + self.out_bias
        return y.view(*x.shape[:-1], -1)


class _NeuronGather(_Gather):
    """The MLP block: parts 0 .. n-1 stand for its input projections (gate, up; or fc1), part n for down."""

    def __init__(self, inputs: list, down: nn.Linear, **kw):
        super().__init__(**kw)
        self.n = len(inputs)
        self.in_weight = torch.stack([lin.weight for lin in inputs], dim=1)           # [I, n, in]
        biases = [lin.bias for lin in inputs]
        self.in_bias = None if all(b is None for b in biases) else torch.stack(
            [b if b is not None else torch.zeros_like(inputs[0].weight[:, 0]) for b in biases], dim=1)
        self.down_t = down.weight.t().contiguous()                                   # [I, out]
        self.down_bias = down.bias
        self._pending = None

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == self.n:
            if not _one_token(x):
                y = x @ self.down_t
            elif self.triton is not None:       # a pruned neuron's activation is never read
                y = self.triton.masked_columns(self.down_t, x.reshape(-1), self.mask, 1).to(x.dtype)
                y = y.view(*x.shape[:-1], -1)
            else:
                y = column_gather(self.down_t, self.idx, x).view(*x.shape[:-1], -1)
            return y if self.down_bias is None else y + self.down_bias
        if index == 0:
            if not _one_token(x):
                I = self.in_weight.shape[0]
                y = F.linear(x, self.in_weight.view(I * self.n, -1))
                y = y.view(*x.shape[:-1], I, self.n)
                if self.in_bias is not None:
                    y = y + self.in_bias
            elif self.triton is not None:
                h = x.reshape(-1)
                I = self.in_weight.shape[0]
                y = self.triton.masked_rows(self.in_weight.view(I * self.n, -1), h, self.choose_mask(h), self.n)
                y = y.to(x.dtype).view(I, self.n)
                if self.in_bias is not None:
                    y = y + self.in_bias
                y = y.view(*x.shape[:-1], I, self.n)
            else:
                h = x.reshape(-1)
                idx = self.choose(h)
                y = self.rows(self.in_weight, idx, h)                                  # [k, n]
                if self.in_bias is not None:
                    y = y + self.in_bias.index_select(0, idx)
                y = y.view(*x.shape[:-1], -1, self.n)
            self._pending = [y[..., i] for i in range(1, self.n)]
            return y[..., 0]
        out = self._pending[index - 1]
        if index == self.n - 1:
            self._pending = None            # hold nothing between forward passes
        return out


def predictor_model(model: nn.Module, predictors: dict, ratio: float, rows: str = "index_select",
                    static: bool = False, backend: str = "inductor", kernels: str = "stock") -> nn.Module:
    """A new model (sharing the unchanged modules) whose decode steps keep, per layer and token, the heads and
    neurons ``predictors`` (``{ATTN: Predictor, MLP: Predictor}``) score highest, at deactivation ratio
    ``ratio`` (every layer masked), reading only their weights; batch 1.  The query and gate/up weights are
    read in place; the output and down projections are held transposed, and a gated MLP's gate and up rows
    interleaved (new tensors).  ``kernels="triton"``: the masked Triton kernels (utils/triton_gemv.py) instead
    of ``rows`` and ``F.embedding_bag``; the selection is then a mask (no host synchronisation either way; ties as
    the masker keeps them, or exactly ``k`` by ``topk`` with ``static``)."""
    from .sites import locate_units

    _check_kernels(kernels)
    layout = locate_units(model)
    device = next(model.parameters()).device
    if rows == "cpp" and device.type != "cpu":
        raise PipelineError(f"the cpp row gather runs on a CPU, not {device.type}; use rows='compiled'")
    row_gather(rows, backend)                        # an unknown mode fails here, before anything is built
    gather = (lambda: row_gather(rows, backend))
    preds = {c: predictors[c].to(device) for c in (ATTN, MLP)}
    new = shallow_clone(model)
    keep = {c: kept_units(ratio, layout.units(c)) for c in (ATTN, MLP)}
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(new)):
            found = layer_modules(layer, index)
            qkv = qkv_names(found.attention)
            mlp_in = mlp_input_names(found.mlp, found.mlp_down_name)
            if qkv is None or mlp_in is None:
                raise PipelineError(f"the gathered decode path needs separate q/k/v and MLP input Linear modules; "
                                    f"decoder layer {index} ({type(layer).__name__}) has none")
            heads = _HeadGather(getattr(found.attention, qkv[0]), found.attn_out, layout.num_heads, layout.head_dim,
                                predictor=preds[ATTN], layer=index, keep=keep[ATTN], static=static, rows=gather(),
                                kernels=kernels)
            found.attention.gathered_heads = heads
            setattr(found.attention, qkv[0], _Part(heads, 0))
            setattr(found.attention, found.attn_out_name, _Part(heads, 1))
            neurons = _NeuronGather([getattr(found.mlp, n) for n in mlp_in], found.mlp_down, predictor=preds[MLP],
                                    layer=index, keep=keep[MLP], static=static, rows=gather(), kernels=kernels)
            found.mlp.gathered_neurons = neurons
            for i, name in enumerate(mlp_in):
                setattr(found.mlp, name, _Part(neurons, i))
            setattr(found.mlp, found.mlp_down_name, _Part(neurons, len(mlp_in)))
    new.gathered = {"source": "predictor", "ratio": ratio, "kept_heads": keep[ATTN], "kept_neurons": keep[MLP],
                    "rows": rows, "static": static, "kernels": kernels}
    return new


class _TealColumns(nn.Module):
    """One projection of the ``teal`` source: reads only the weight columns (rows of its transposed copy) of
    the input channels scoring at least the threshold."""

    def __init__(self, module: nn.Module, threshold: float, wina: bool, counter: dict, kernels: str = "stock"):
        super().__init__()
        self.triton = _triton() if kernels == "triton" else None
        weight = weight_out_in(module)
        self.weight_t = weight.t().contiguous()                                  # [in, out]
        self.bias = getattr(module, "bias", None)
        self.threshold = float(threshold)
        self.norms = weight.detach().float().norm(dim=0) if wina else None
        self.counter = counter
        self.out = weight.shape[0]

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        scores = flat.float().abs()
        return scores if self.norms is None else scores * self.norms

    def forward(self, x):
        if not _one_token(x):
            y = x @ self.weight_t
        else:
            flat = x.reshape(-1)
            if self.triton is not None:         # the threshold applied inside the kernel
                y = self.triton.threshold_columns(self.weight_t, flat, self.threshold, self.norms).to(x.dtype)
                y = y.view(*x.shape[:-1], -1)
                if self.counter["on"]:          # a host synchronisation: off while a compiled decode is timed
                    self.counter["kept"] += int((self.scores(flat) >= self.threshold).sum()) * self.out
            else:
                idx = (self.scores(flat) >= self.threshold).nonzero().view(-1)
                y = column_gather(self.weight_t, idx, flat.index_select(0, idx)).view(*x.shape[:-1], -1)
                self.counter["kept"] += idx.shape[0] * self.out
        return y if self.bias is None else y + self.bias


def teal_model(model: nn.Module, thresholds: torch.Tensor, wina: bool = False, kernels: str = "stock") -> nn.Module:
    """A new model whose decode steps read, in every block projection j of layer l, only the weight columns of
    the input channels scoring at least ``thresholds[l, j]`` (one variant's and ratio's slice of
    ``utils.teal.calibrate_thresholds``; channel score ``|x|``, times the column norm with ``wina``); batch 1.
    Each projection is held transposed (a new tensor).  ``model.gathered["counter"]["kept"]`` adds up the
    weights read (kept channels x output width) over the decode steps (with ``kernels="triton"``, the masked
    kernel of utils/triton_gemv.py: shape-static, compilable; it counts only while ``counter["on"]``)."""
    _check_kernels(kernels)
    new = shallow_clone(model)
    counter = {"kept": 0, "on": True}
    total = 0
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(new)):
            for j, (name, module) in enumerate(block_projections(layer, index).items()):
                parent_name, child = name.split(".")
                parent = getattr(layer, parent_name)
                setattr(parent, child, _TealColumns(module, thresholds[index, j], wina, counter, kernels))
                total += weight_out_in(module).numel()
    new.gathered = {"source": "teal", "counter": counter, "layer_weights": total, "wina": wina, "kernels": kernels}
    return new


def _bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def skipped_bytes(model: nn.Module) -> int:
    """Weight bytes a decode step of a :func:`predictor_model` does not read: the pruned heads' query rows
    (and bias) and output columns, the pruned neurons' input rows (and biases) and down columns."""
    out = 0
    for m in model.modules():
        if isinstance(m, _HeadGather):
            pruned = m.heads - m.keep
            out += pruned * (_bytes(m.q_weight[0]) + _bytes(None if m.q_bias is None else m.q_bias[0])
                             + _bytes(m.out_t[:m.head_dim]))
        elif isinstance(m, _NeuronGather):
            pruned = m.in_weight.shape[0] - m.keep
            out += pruned * (_bytes(m.in_weight[0]) + _bytes(None if m.in_bias is None else m.in_bias[0])
                             + _bytes(m.down_t[0]))
    return out


def predictor_bytes(model: nn.Module) -> int:
    """Bytes of the predictors a decode step of a :func:`predictor_model` reads (every layer's slice)."""
    seen, out = set(), 0
    for m in model.modules():
        if isinstance(m, _Gather) and id(m.predictor) not in seen:
            seen.add(id(m.predictor))
            out += sum(_bytes(t) for t in list(m.predictor.parameters()) + list(m.predictor.buffers()))
    return out


def projection_bytes(model: nn.Module) -> int:
    """Bytes of every block projection's weight of a :func:`teal_model` (what a dense step reads of them)."""
    return sum(_bytes(m.weight_t) for m in model.modules() if isinstance(m, _TealColumns))
