"""utils/architecture.py is the one home of module names: what it reports for each layer of the tiny
Phi, Llama, Gemma and GPT-2 models is what the test reads off the modules and configs directly, an
unknown layout gives the same one-line errors as always, and no other library module spells a name."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_gemma, tiny_gpt2, tiny_llama, tiny_phi
from utils.architecture import (decoder_layers, gate_up_names, input_width, layer_modules, mlp_input_names,
                                model_shape, qkv_names, sliding_window, weight_out_in)
from utils.errors import PipelineError
from utils.sites import locate_units

# per family, as transformers spells them: (blocks, attention output, MLP down, q/k/v, MLP inputs, gated)
EXPECTED = {
    "phi": (lambda m: m.model.layers, "self_attn", "dense", "mlp", "fc2", ("q_proj", "k_proj", "v_proj"),
            ("fc1",), False),
    "llama": (lambda m: m.model.layers, "self_attn", "o_proj", "mlp", "down_proj", ("q_proj", "k_proj", "v_proj"),
              ("gate_proj", "up_proj"), True),
    "gemma": (lambda m: m.model.layers, "self_attn", "o_proj", "mlp", "down_proj", ("q_proj", "k_proj", "v_proj"),
              ("gate_proj", "up_proj"), True),
    "gpt2": (lambda m: m.transformer.h, "attn", "c_proj", "mlp", "c_proj", None, None, False),
}
BUILD = {"phi": tiny_phi, "llama": tiny_llama, "gemma": tiny_gemma, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_layer_modules_are_the_ones_transformers_names(family):
    model = BUILD[family]()
    blocks, attn, out, mlp, down, qkv, mlp_in, gated = EXPECTED[family]
    assert decoder_layers(model) is blocks(model)
    for index, layer in enumerate(blocks(model)):
        found = layer_modules(layer, index)
        assert found.attention is getattr(layer, attn) and found.attention_name == attn
        assert found.attn_out is getattr(getattr(layer, attn), out) and found.attn_out_name == out
        assert found.mlp is getattr(layer, mlp) and found.mlp_name == mlp
        assert found.mlp_down is getattr(getattr(layer, mlp), down) and found.mlp_down_name == down
        assert found.gated == gated
        assert qkv_names(found.attention) == qkv
        assert mlp_input_names(found.mlp, found.mlp_down_name) == mlp_in
        assert gate_up_names(found.mlp) == (mlp_in if gated else None)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_shape_and_kv_heads_are_the_configs(family):
    model = BUILD[family]()
    config, shape = model.config, model_shape(model)
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    assert (shape.layers, shape.heads, shape.hidden) == {"gpt2": (2, 4, 32)}.get(family, (3, 4, 32))
    assert shape.heads == heads
    # GPT-2's config has no KV-head count: every head has its own keys and values
    assert shape.kv_heads == {"phi": 4, "llama": 2, "gemma": 1, "gpt2": 4}[family]
    assert shape.kv_heads == (getattr(config, "num_key_value_heads", None) or heads)
    assert shape.head_dim == 8


def test_sliding_window_is_read_only_where_layers_slide():
    assert sliding_window(tiny_gemma(sliding_window=4)) == 4
    assert sliding_window(tiny_gemma()) == 512
    full = tiny_gemma(sliding_window=4)
    full.config.layer_types = ["full_attention"] * 3
    assert sliding_window(full) is None
    for build in (tiny_phi, tiny_llama, tiny_gpt2):
        assert sliding_window(build()) is None


def test_conv1d_weights_are_read_as_out_by_in():
    """GPT-2's Conv1D stores [in, out]; the MLP's down projection takes the 4 x 32 neurons."""
    model = tiny_gpt2()
    down = model.transformer.h[0].mlp.c_proj
    assert tuple(down.weight.shape) == (128, 32)
    assert input_width(down) == 128
    assert torch.equal(weight_out_in(down), down.weight.t())
    linear = tiny_llama().model.layers[0].mlp.down_proj
    assert input_width(linear) == 40 and weight_out_in(linear) is linear.weight
    with pytest.raises(PipelineError, match="^unsupported architecture: cannot read the input width of Identity$"):
        input_width(nn.Identity())


def test_missing_down_projection_is_the_same_one_line_error():
    model = tiny_llama()
    del model.model.layers[0].mlp.down_proj
    with pytest.raises(PipelineError) as err:
        locate_units(model)
    message = str(err.value)
    # a new family may add its own name to the list, after the ones searched today
    assert re.fullmatch(r"unsupported architecture: no MLP down projection in decoder layer 0 \(LlamaDecoderLayer\)"
                        r"\.mlp \(looked for down_proj, fc2, c_proj, (.*, )?w2, fc_out; it has gate_proj, up_proj, "
                        r"act_fn\)", message), message


def test_missing_attention_block_is_the_same_one_line_error():
    model = tiny_phi()
    model.model.layers[1].attention_block = model.model.layers[1].self_attn
    del model.model.layers[1].self_attn
    with pytest.raises(PipelineError) as err:
        locate_units(model)
    message = str(err.value)
    assert re.fullmatch(r"unsupported architecture: no attention module in decoder layer 1 \(PhiDecoderLayer\) "
                        r"\(looked for self_attn, attn, (.*, )?attention, self_attention; it has mlp, "
                        r"input_layernorm, resid_dropout, attention_block\)", message), message


def test_config_without_sizes_is_a_one_line_error():
    model = tiny_gpt2()
    model.config.n_head = 0
    with pytest.raises(PipelineError, match="^unsupported architecture GPT2LMHeadModel: its config lacks the "
                                            "number of layers, heads or the hidden size$"):
        locate_units(model)


# module names and config fields that only utils/architecture.py may spell
MODULE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj", "fc1", "fc2", "fc_in", "fc_out", "c_fc", "c_attn", "c_proj", "out_proj", "w1", "w2",
                "self_attn", "self_attention", "feed_forward", "Conv1D")
CONFIG_FIELDS = ("num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads",
                 "text_config", "sliding_window", "layer_types")


def test_no_other_library_module_spells_a_module_name():
    pattern = re.compile(r"""(["'.])(%s)\b|(["']|config\.)(%s)\b"""
                         % ("|".join(MODULE_NAMES), "|".join(CONFIG_FIELDS)))
    sources = sorted((ROOT / "utils").glob("*.py")) + sorted(ROOT.glob("*.py"))
    assert len(sources) > 20
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in sources if path.name != "architecture.py"
            for n, line in enumerate(Path(path).read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
