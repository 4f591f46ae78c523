"""The memory floor of a decode step (utils/roofline.py) and the decode benchmark's floor columns, checked
against byte counts written out from each tiny model's config."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_gemma, tiny_llama, tiny_phi
from utils.decode import GreedyDecoder
from utils.errors import PipelineError
from utils.roofline import (bytes_per_token, floor_fields, kernel_breakdown, kernel_kind, kv_bytes_per_position,
                            read_bandwidth, weight_read_bytes)
from utils.sparse_model import sparse_model


def _config_bytes(cfg, elem=4):
    """Parameters of a tiny model from its config, and the KV bytes per position (float32)."""
    heads, hidden, layers = cfg.num_attention_heads, cfg.hidden_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return layers * 2 * kv * head_dim * elem


@pytest.mark.parametrize("build", [tiny_phi, tiny_llama, tiny_gemma], ids=["phi", "llama", "gemma"])
def test_weight_bytes_read_per_token(build):
    model = build()
    cfg = model.config
    every = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values()) * 4
    emb = cfg.vocab_size * cfg.hidden_size * 4
    tied = bool(cfg.tie_word_embeddings)
    for batch in (1, 3):
        # an untied embedding table is read only at the batch's looked-up rows; a tied one is the LM head
        expected = every if tied else every - emb + batch * cfg.hidden_size * 4
        assert weight_read_bytes(model, batch) == expected
    assert kv_bytes_per_position(model) == _config_bytes(cfg)


def test_kv_cache_at_its_mean_length_and_sparse_models_read_less():
    model = tiny_llama()
    P, N, B = 7, 10, 2
    per_pos = kv_bytes_per_position(model)
    got = bytes_per_token(model, B, P, N)
    # step s = 1 .. N-1 attends to P + s positions
    attended = sum(P + s for s in range(1, N)) / (N - 1)
    assert got["mean_cache_len"] == pytest.approx(attended)
    assert got["kv_cache"] == int(B * attended * per_pos)
    assert got["total"] == got["weights"] + got["kv_cache"]
    keep = {"attention": torch.tensor([[True, True, False, False]] * 3),     # KV group 0 only
            "mlp": torch.arange(40).repeat(3, 1) < 20}
    sparse, _ = sparse_model(model, keep)
    assert kv_bytes_per_position(sparse) == per_pos // 2
    assert weight_read_bytes(sparse) < weight_read_bytes(model)


def test_floor_fields_and_bandwidth():
    assert floor_fields(3_000_000, 1e9, 6.0) == {"read_bytes": 3_000_000, "floor_ms": 3.0, "share_of_floor": 0.5}
    bw = read_bandwidth("cpu", torch.float32, nbytes=2 ** 22, repeats=2)
    assert bw["nbytes"] == 2 ** 22 and bw["bytes_per_s"] == pytest.approx(bw["nbytes"] / bw["seconds"])
    assert bw["kernel"] in ("sum", "amax")
    half = read_bandwidth("cpu", torch.bfloat16, nbytes=2 ** 22, repeats=1)
    assert half["nbytes"] == 2 ** 22 and half["kernel"] in ("sum", "amax", "sum_as_float32")
    assert bw["bytes_per_s"] > 1e8          # any machine reads 4 MiB faster than 100 MB/s
    with pytest.raises(PipelineError, match="repeats >= 1"):
        read_bandwidth("cpu", repeats=0)


def test_kernel_kinds_and_breakdown():
    names = {"ampere_bf16_s16816gemm_bf16_128x64": "gemv", "gemv2T_kernel_val": "gemv",
             "nvjet_tst_64x8_64x16_4x1_v_bz_TNT": "gemv", "flash_fwd_splitkv_kernel": "attention",
             "triton_red_fused__softmax_0": "attention", "triton_per_fused_rms_norm_1": "norm",
             "Memcpy DtoD (Device -> Device)": "copies", "triton_poi_fused_index_copy_2": "copies",
             "triton_poi_fused_mul_silu_3": "other", "rows_kernel": "masked gemv",
             "threshold_columns_kernel": "masked gemv", "void at::native::sbtopk::gatherTopK<float>": "selection"}
    for name, kind in names.items():
        assert kernel_kind(name) == kind, name
    out = kernel_breakdown([("gemv2T_kernel", 10.0), ("gemv2T_kernel", 6.0), ("rms_norm", 2.0),
                            ("add_kernel", 1.0)], steps=2)
    assert out["kernels_per_step"] == 2.0 and out["us_per_step"] == 9.5
    assert out["by_kind"] == {"gemv": {"kernels_per_step": 1.0, "us_per_step": 8.0},
                              "norm": {"kernels_per_step": 0.5, "us_per_step": 1.0},
                              "other": {"kernels_per_step": 0.5, "us_per_step": 0.5}}
    with pytest.raises(PipelineError, match="steps >= 1"):
        kernel_breakdown([], 0)


def test_decode_steps_continue_generate():
    model = tiny_llama()
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    decoder = GreedyDecoder(model, 2, 5 + 9)
    whole = decoder.generate(prompt, 9)
    first = decoder.prefill(prompt)
    parts = torch.cat([first, decoder.decode_steps(3), decoder.decode_steps(5)], dim=1)
    assert torch.equal(whole, parts)
    decoder.decode_steps(1)                  # position 13, the cache's last
    with pytest.raises(PipelineError, match="exceed the cache length"):
        decoder.decode_steps(1)


def test_bench_decode_rows_carry_the_floor(tmp_path, capsys):
    import benchmarks.bench_decode as bench

    out = tmp_path / "bench.json"
    bench.main(["--model", "tiny", "--batch", "1", "--new_tokens", "4", "--prompt_len", "4", "--kept", "1.0", "0.5",
                "--repeats", "1", "--warmup", "0", "--anchors", "--rows", "index_select", "--json", str(out)])
    result = json.loads(out.read_text())
    bw = result["read_bandwidth"]["bytes_per_s"]
    # on a CPU the per-token gathered rows (predictor, teal) come by default, after the dense and sparse ones
    assert [r.get("per_token") for r in result["rows"]] == [None, None, "predictor", "teal"]
    assert len(result["anchors"]) == 2
    dense_read, predictor, teal = result["rows"][0]["read_bytes"], result["rows"][2], result["rows"][3]
    assert teal["read_bytes"] < dense_read and predictor["kept"] == teal["kept"] == 0.5
    # the predictor's bytes are counted (on this tiny model they outweigh the half of its units not read)
    assert 0 < predictor["predictor_bytes"] and predictor["read_bytes"] - predictor["predictor_bytes"] < dense_read
    result["rows"] = result["rows"][:2]
    for row in result["rows"] + result["anchors"]:
        assert row["floor_ms"] == pytest.approx(1e3 * row["read_bytes"] / bw)
        assert row["share_of_floor"] == pytest.approx(row["floor_ms"] / row["ms_per_token"])
    dense, half = result["rows"]
    assert half["read_bytes"] < dense["read_bytes"]
    assert "share of floor" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", "tiny", "--batch", "1", "1"])
    assert exc.value.code == 2 and "repeats a value" in capsys.readouterr().err


def test_bench_decode_rows_for_both_kinds_of_gather(tmp_path):
    """--kernels stock triton: a row per source and kind of gather (the triton ones interpreted here); the same
    thresholds on the same prompt read the same columns, counted in the triton teal row's eager decode."""
    pytest.importorskip("triton")
    import benchmarks.bench_decode as bench

    out = tmp_path / "bench.json"
    bench.main(["--model", "tiny", "--batch", "1", "--new_tokens", "4", "--prompt_len", "4", "--kept", "1.0", "0.5",
                "--repeats", "1", "--warmup", "0", "--rows", "index_select", "--kernels", "stock", "triton",
                "--profile", "off", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    got = [(r.get("per_token"), r.get("kernels")) for r in rows]
    assert got == [(None, None), (None, None), ("predictor", "stock"), ("predictor", "triton"), ("teal", "stock"),
                   ("teal", "triton")]
    by = {(r.get("per_token"), r.get("kernels")): r for r in rows}
    assert by["teal", "triton"]["kept_heads"] == pytest.approx(by["teal", "stock"]["kept_heads"])
    assert 0 < by["teal", "triton"]["kept_heads"] < 1
    assert by["predictor", "triton"]["read_bytes"] == by["predictor", "stock"]["read_bytes"]


def test_bench_decode_flags_a_row_faster_than_its_bytes(capsys):
    import benchmarks.bench_decode as bench

    row = {"batch": 1, "kept": 0.3, "speedup": 51.0, "ideal_speedup": 1.57, "share_of_floor": 0.4}
    bench.flag(row)
    assert "above its bytes-ideal" in row["suspect"] and "do not trust" in capsys.readouterr().err
    fine = {"batch": 1, "kept": 0.5, "speedup": 1.4, "ideal_speedup": 1.8, "share_of_floor": 0.6}
    bench.flag(fine)
    assert "suspect" not in fine
    beyond = {"batch": 1, "kept": 1.0, "speedup": 1.0, "ideal_speedup": 1.0, "share_of_floor": 1.5}
    bench.flag(beyond)
    assert "faster than the memory floor" in beyond["suspect"]
