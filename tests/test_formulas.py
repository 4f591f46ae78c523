"""Analytic checks of the score formulas (METHOD §3), independent of the reference loop and of the fast
path's internals: the loss is computed here with its own forward hook that scales one unit (or one whole
site) by a factor s at the position a generation step computes, on float64 copies of the tiny models,
with the whole sequence recomputed (no KV cache).

- GxO is a derivative: dL/ds at s = 1 for one head equals Σ_i g_i·x_i = d·gxo_h, for one neuron gxo_j.
  A central finite difference of L(s) must match it (the fast path runs against the KV cache).
- Integrated gradients are complete: summed over a site's units (heads weighted by d, since the stored
  head scores are per-dim means), IG with n steps approximates ∫₀¹ dL/dα dα = L(1) − L(0).  The fast path
  uses a right Riemann sum (α_k = k/n); by Euler–Maclaurin its error is
  (f(1) − f(0))/(2n) − (f'(1) − f'(0))/(12n²) + O(1/n⁴) with f = dL/dα.  We assert, for n = 16, 64, 256,
  error ≤ 2·(|f(1) − f(0)|/(2n) + |f'(1) − f'(0)|/(12n²)) + 1e-9 (twice the leading terms; f by autograd,
  f' by a central difference of f), and that the error at 256 steps is smaller than at 16.
  Checked at steps t ≥ 1, where the step computes one position: at step 0 IG scales the site at every
  prompt position but attributes only to the last one (METHOD §3), so completeness is not expected there.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import BUILDERS, VOCAB
from utils.attribution import Attributor
from utils.sites import ATTN, MLP, locate_units

FD_EPS = 1e-5
H = 1e-4              # step of the central difference of f = dL/dα (completeness bound)
FD_RTOL = 1e-5        # float64 central difference vs float32-stored scores: both errors far below this


def _gemma_rms_norm_in_input_dtype(self, x):
    """Gemma3RMSNorm.forward without its cast to float32 (same formula)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _llama_rms_norm_in_input_dtype(self, x):
    """LlamaRMSNorm.forward without its cast to float32 (same formula)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(autouse=True)
def rms_norms_in_float64(monkeypatch):
    """Llama's and Gemma's RMSNorms compute in float32 even in a float64 model: their rounding (~1e-7 of
    the loss) would swamp a central difference with a small step, so these checks run them in float64."""
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.llama import modeling_llama
    monkeypatch.setattr(modeling_gemma3.Gemma3RMSNorm, "forward", _gemma_rms_norm_in_input_dtype)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _llama_rms_norm_in_input_dtype)


def float64_model(arch):
    model = BUILDERS[arch](seed=3).double()
    # eager attention would take its softmax in float32: keep every op in float64
    model.config._attn_implementation = "sdpa"
    return model


def random_sample(seed, prompt_len=6, label_len=4):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=g)
    label = torch.randint(0, VOCAB, (label_len,), generator=g).tolist()
    return prompt, label


def step_loss(model, comp, layer, prompt, label, t, dims, s):
    """Loss of step t with the site's dims ``dims`` scaled by ``s`` at the position step t computes (the
    last one of prompt + label[:t]); ``s`` may be a tensor that requires grad."""
    layout = locate_units(model)
    module = (layout.attn_out if comp == ATTN else layout.mlp_down)[layer]
    seq = torch.cat([prompt, torch.tensor([label[:t]], dtype=torch.long)], dim=1)

    def hook(mod, args):
        x = args[0]
        chosen = torch.zeros(x.shape[-1], dtype=x.dtype)
        chosen[dims] = 1
        factor = 1 + chosen * (torch.as_tensor(s, dtype=x.dtype) - 1)   # s on the chosen dims, 1 elsewhere
        return (torch.cat([x[:, :-1], x[:, -1:] * factor], dim=1),) + tuple(args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        logits = model(input_ids=seq, use_cache=False).logits[0, -1]
    finally:
        handle.remove()
    return F.cross_entropy(logits[None], torch.tensor([label[t]]))


def site_path_derivative(model, comp, layer, prompt, label, t, alpha):
    """f(α) = dL/dα with the whole site scaled by α at step t's position."""
    s = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        loss = step_loss(model, comp, layer, prompt, label, t, slice(None), s)
        (grad,) = torch.autograd.grad(loss, s)
    return grad.item()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_gxo_is_the_derivative_of_the_loss_in_a_units_scale(arch):
    model = float64_model(arch)
    layout = locate_units(model)
    prompt, label = random_sample(7)
    scores = Attributor(model).score_sample(prompt, label)
    d = layout.head_dim
    gen = torch.Generator().manual_seed(0)
    for t in (0, len(label) - 1):
        for layer in range(layout.num_layers):
            units = {ATTN: list(range(layout.num_heads)),
                     MLP: torch.randperm(layout.intermediate, generator=gen)[:5].tolist()}
            for comp, chosen in units.items():
                gxo = scores[f"gxo_{comp}"][t, layer].double()
                scale = gxo.abs().max().item() * (d if comp == ATTN else 1)
                for u in chosen:
                    dims = slice(u * d, (u + 1) * d) if comp == ATTN else slice(u, u + 1)
                    with torch.no_grad():
                        up = step_loss(model, comp, layer, prompt, label, t, dims, 1 + FD_EPS).item()
                        down = step_loss(model, comp, layer, prompt, label, t, dims, 1 - FD_EPS).item()
                    fd = (up - down) / (2 * FD_EPS)
                    predicted = gxo[u].item() * (d if comp == ATTN else 1)
                    assert abs(fd - predicted) <= FD_RTOL * scale, (arch, t, comp, layer, u, fd, predicted)
                assert scale > 1e-6  # the check is not vacuous


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_integrated_gradients_are_complete(arch):
    model = float64_model(arch)
    layout = locate_units(model)
    prompt, label = random_sample(13, prompt_len=5, label_len=3)
    att = Attributor(model)
    ns = (16, 64, 256)
    igs = {n: att.score_sample(prompt, label, gradients=False, ig_steps=n, batch_size=4096) for n in ns}
    d = layout.head_dim
    checked = 0
    for t in (1, 2):
        for comp in (ATTN, MLP):
            for layer in range(layout.num_layers):
                with torch.no_grad():
                    full = step_loss(model, comp, layer, prompt, label, t, slice(None), 1.0).item()
                    removed = step_loss(model, comp, layer, prompt, label, t, slice(None), 0.0).item()
                delta = full - removed
                f = {a: site_path_derivative(model, comp, layer, prompt, label, t, a)
                     for a in (-H, 0.0, H, 1 - H, 1.0, 1 + H)}
                f0, f1 = f[0.0], f[1.0]
                df0, df1 = (f[H] - f[-H]) / (2 * H), (f[1 + H] - f[1 - H]) / (2 * H)
                errors = {}
                for n in ns:
                    total = igs[n][f"ig_{comp}"][t, layer].double().sum().item() * (d if comp == ATTN else 1)
                    errors[n] = abs(total - delta)
                    bound = 2 * (abs(f1 - f0) / (2 * n) + abs(df1 - df0) / (12 * n * n)) + 1e-9
                    assert errors[n] <= bound, (arch, t, comp, layer, n, errors[n], bound)
                if abs(f1 - f0) > 1e-4:  # the error is visible at all: it must fall with n
                    assert errors[256] < errors[16], (arch, t, comp, layer, errors)
                    checked += 1
                assert abs(delta) > 1e-6
    assert checked >= 3  # the shrinking check ran on real sites, not only on flat ones
