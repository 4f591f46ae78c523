"""Decode speed of the dense model against sparse models (masked heads and neurons physically removed)
at several kept shares, side by side in one run, through one decode loop (utils/decode.py).

    python benchmarks/bench_decode.py --model smollm2 --batch 1 --new_tokens 64          # 2-core CPU, eager
    python benchmarks/bench_decode.py --model phi2-shaped --device cuda --dtype bfloat16 \\
        --batch 1 16 --fused both --json bench_decode_phi2.json                          # H200, CUDA graphs

Each row: milliseconds per new token (median over --repeats after --warmup runs; the prompt's dense
prefill is timed apart), the speed-up over the dense model on the SAME path (batch, fused, compile),
the weight bytes, the ideal speed-up if time were proportional to the weight bytes read per token, and
the peak memory.  Sparse rows run the way the sweep's prompt/static sources do: the prompt dense, its
cache handed over, every later token sparse.  The kept share applies to heads and neurons alike; which
units are kept is random (fixed seed): the speed does not depend on which ones, only on how many.
Heads are chosen as whole KV groups and an equal count within each kept group, so no padding is needed.

The memory floor, in the same run: the device's read bandwidth is measured first (one large reduction,
utils/roofline.py), and every row gets the bytes one decode step must read (the weights it uses, the
looked-up embedding rows, and the KV cache at its mean length), ``floor_ms`` (those bytes at that
bandwidth) and ``share_of_floor`` (floor over measured time; 1.0 = at the memory limit).  A row faster
than its floor or than its bytes allow is flagged, not trusted.  ``--anchors`` adds two reference rows
per batch: transformers' own ``generate()`` with a static cache, and a chain of plain GEMVs over the
dense model's linear weights (CUDA-graphed on a GPU): what the library gives, and what reading the
weights with stock kernels costs.  On a GPU, ``--profile`` (default there) counts the kernels of a
decode step and breaks their time down by kind (GEMV, attention, norm, copies, other).

Per-token rows (``--per_token predictor teal``; by default on a CPU, at batch 1, eager): the gathered decode
of utils/gathered.py at each kept share below 1, in the same run: ``predictor`` with random rank-64
predictors (exactly the kept share of heads and neurons per layer and token; the predictor's bytes are counted),
``teal`` with magnitude thresholds calibrated on the dense model's own continuations (the share of columns it
really read is measured and reported).  Their "weights MB" and bytes-ideal are the weights a step reads.
``--kernels stock triton`` gives each source a row per kind of gather: stock PyTorch (index lists, eager for
teal) or the masked Triton kernels of utils/triton_gemv.py (GPU only; shape-static, so teal compiles too; its
kept share is then counted in one extra eager decode before the timed ones).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.decode import COMPILE_MODES, GreedyDecoder, fuse_projections  # noqa: E402
from utils.gathered import KERNELS, ROW_MODES, cpp_rows  # noqa: E402
from utils.cli import cli_entry  # noqa: E402
from utils.errors import PipelineError  # noqa: E402
from utils.io import write_json  # noqa: E402
from utils.roofline import bytes_per_token, floor_fields, kernel_breakdown, read_bandwidth  # noqa: E402
from utils.models import GEMMA_MODEL, OFFLINE_MODEL, load_model_and_tokenizer, resolve_device, resolve_dtype  # noqa: E402
from utils.sites import ATTN, MLP, locate_units  # noqa: E402
from utils.sparse_model import kept_share, sparse_model, weight_bytes  # noqa: E402

MODELS = ("smollm2", "gemma3-270m", "phi2-shaped", "llama-3.6b", "tiny")
MODEL = "tiny"
DEVICE = "auto"
DTYPE = "float32"
BATCH = [1, 16]
PROMPT_LEN = 32
NEW_TOKENS = 128
KEPT = [1.0, 0.7, 0.5, 0.3]
COMPILE = "auto"          # CUDA: reduce-overhead (CUDA graphs); CPU: eager
FUSED = "off"
WARMUP = 1
REPEATS = 3
SEED = 0
ANCHORS = False            # also time transformers' generate() and a plain GEMV chain over the weights
PROFILE = "auto"           # kernels per decode step and their time by kind (auto: on CUDA)
PROFILE_STEPS = 16         # decode steps the profiler records per row
PER_TOKEN = ("predictor", "teal")
PER_TOKEN_DEFAULT = "auto"  # per-token gathered rows (utils/gathered.py): auto = both on a CPU at batch 1, none on CUDA
ROWS = "auto"              # how the predictor path gathers output rows (utils.gathered.ROW_MODES; auto: cpp if it builds)
PER_TOKEN_KERNELS = ["auto"]  # the per-token rows' gathers (utils.gathered.KERNELS): auto = triton on CUDA, stock on a CPU
PREDICTOR_RANK = 64        # the random predictors' rank (the predictor step's default)
TEAL_CALIB = 3             # prompts (the benchmark's and random others) whose greedy continuations calibrate teal
THREADS = 0                # CPU threads (0: torch's default)
SUSPECT = 1.10             # a speed-up above its bytes-ideal, or a share of the floor above 1, by this factor


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """The real SmolLM2 or Gemma-3-270M (offline GGUFs) or a random model of a named shape, built on the device."""
    if name == "smollm2":
        return load_model_and_tokenizer(OFFLINE_MODEL, device, dtype)[0]
    if name == "gemma3-270m":
        return load_model_and_tokenizer(GEMMA_MODEL, device, dtype)[0]
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    if name == "phi2-shaped":
        cfg, cls = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                             num_attention_heads=32, partial_rotary_factor=0.4,
                             max_position_embeddings=2048), PhiForCausalLM
    elif name == "llama-3.6b":
        # Llama-3.2-3B's shape with an untied lm_head: 3.6B parameters
        cfg, cls = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                               num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                               tie_word_embeddings=False, max_position_embeddings=4096), LlamaForCausalLM
    elif name == "tiny":
        cfg, cls = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512), LlamaForCausalLM
    else:
        raise PipelineError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)     # initialise in the target dtype: no float32 copy of a 3.6B model
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def balanced_keep(layout, share: float, seed: int) -> dict:
    """``share`` of every layer's heads and neurons, chosen at random.  Heads are kept as ``k`` heads in
    each of ``g`` KV groups (the same count in every kept group, so no padding is needed), with ``g * k``
    as close to ``share * H`` as the group sizes allow: without grouped KV (Phi-2: one head per group) that
    removes whole groups; with it (SmolLM2: 3 heads per KV head) groups and heads within them."""
    g = torch.Generator().manual_seed(seed)
    L, H, I, KV = layout.num_layers, layout.num_heads, layout.intermediate, layout.num_kv_heads
    per = H // KV
    n_groups, n_heads = min(((gk, kp) for gk in range(1, KV + 1) for kp in range(1, per + 1)),
                            key=lambda gk_kp: (abs(gk_kp[0] * gk_kp[1] - share * H), -gk_kp[0]))
    n_neurons = max(1, round(share * I))
    heads = torch.zeros(L, H, dtype=torch.bool)
    neurons = torch.zeros(L, I, dtype=torch.bool)
    for l in range(L):
        for grp in torch.randperm(KV, generator=g)[:n_groups].tolist():
            heads[l, grp * per + torch.randperm(per, generator=g)[:n_heads]] = True
        neurons[l, torch.randperm(I, generator=g)[:n_neurons]] = True
    return {ATTN: heads, MLP: neurons}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _new_decoder(model, prompt, args, compile_mode):
    return GreedyDecoder(model, prompt.shape[0], prompt.shape[1] + args.new_tokens, compile=compile_mode)


def _one_run(entry, prompt, args) -> tuple:
    t = {}
    counter = getattr(entry["model"], "gathered", {}).get("counter")
    if counter is not None and not counter["on"]:
        counter = None
    if counter is not None:
        counter["kept"] = 0
    tokens = entry["decoder"].generate(prompt, args.new_tokens, prefill_model=entry["prefill_model"],
                                       plan=entry["plan"], timings=t)
    entry["first_tokens"] = tokens[0, :8].tolist()
    if counter is not None:
        entry["kept_runs"].append(counter["kept"] / (args.new_tokens - 1))
    return t["decode_s"], t["prefill_s"]


def _summary(entry, runs, args, peak: int, peak_kind: str) -> dict:
    steps = max(args.new_tokens - 1, 1)
    decode = [d for d, _ in runs]
    return {"ms_per_token": 1e3 * statistics.median(decode) / steps,
            "ms_per_token_runs": [1e3 * d / steps for d in decode],
            "prefill_ms": 1e3 * statistics.median([p for _, p in runs]),
            "peak_mem_bytes": peak, "peak_mem_kind": peak_kind, "first_tokens": entry["first_tokens"]}


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device, note: str = "") -> tuple:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated" + note
    return rss_bytes(), "process RSS" + note


def make_entry(dense, layout, share, fused, dense_bytes, device, read) -> dict:
    """The model of one row: the dense model (share 1.0) or a sparse one built from it, maybe fused.
    ``read(model)``: the bytes one decode step of that (unfused) model must read."""
    entry = {"kept": share, "fused": fused, "prefill_model": None, "plan": None, "build_ms": 0.0,
             "weight_bytes": dense_bytes["total"], "kept_heads": 1.0, "kept_neurons": 1.0, "path": "dense"}
    if share == 1.0:
        entry["read"] = read(dense)
        entry["model"] = fuse_projections(dense) if fused else dense
        return entry
    keep = balanced_keep(layout, share, SEED)
    _reset_peak(device)
    start = time.perf_counter()
    sparse, plan = sparse_model(dense, keep)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    shares = kept_share(plan)
    entry["read"] = read(sparse)
    entry.update(path="sparse", prefill_model=dense, plan=plan, build_ms=1e3 * (time.perf_counter() - start),
                 weight_bytes=weight_bytes(sparse)["total"], kept_heads=shares["heads"],
                 kept_neurons=shares["neurons"], model=fuse_projections(sparse) if fused else sparse)
    return entry


def make_token_entry(dense, layout, share, label, dense_bytes, read, args) -> dict:
    """The model of a per-token row (utils/gathered.py): ``source`` "predictor" (random low-rank predictors
    of rank ``PREDICTOR_RANK``: which units they keep does not change the speed, how many does) or "teal"
    (magnitude thresholds calibrated to the deactivation ratio 1 - share on the dense model's own greedy
    continuations of random prompts: :func:`teal_samples`; the share of columns it really reads is measured
    while it decodes).  ``label`` is "source:kernels".  The prompt runs dense."""
    from utils.gathered import predictor_bytes, predictor_model, projection_bytes, skipped_bytes, teal_model
    from utils.predictor import Predictor, PredictorSettings
    from utils.teal import calibrate_thresholds

    source, kernels = label.split(":")
    ratio = round(1.0 - share, 6)
    start = time.perf_counter()
    base = read(dense)
    entry = {"kept": share, "fused": False, "prefill_model": None, "plan": None, "source": source,
             "kernels": kernels, "path": f"per-token {source} (gathered, {kernels})"}
    if source == "predictor":
        settings = PredictorSettings(rank=PREDICTOR_RANK, seed=SEED)
        preds = {comp: Predictor(layout.num_layers, layout.hidden, layout.units(comp), settings).eval()
                 .requires_grad_(False) for comp in (ATTN, MLP)}
        # compiled (a GPU's CUDA graphs): shape-static selection, exactly k units, no host synchronisation
        model = predictor_model(dense, preds, ratio, rows=args.rows, static=entry_compiled(args), kernels=kernels)
        delta = predictor_bytes(model) - skipped_bytes(model)
        entry.update(kept_heads=model.gathered["kept_heads"] / layout.num_heads,
                     kept_neurons=model.gathered["kept_neurons"] / layout.intermediate,
                     predictor_bytes=predictor_bytes(model),
                     weight_bytes=dense_bytes["total"] + delta,
                     read={**base, "weights": base["weights"] + delta, "total": base["total"] + delta})
    elif source == "teal":
        samples = teal_samples(dense, args)
        thresholds = calibrate_thresholds(dense, samples, ["magnitude"], [ratio])
        model = teal_model(dense, thresholds[0, 0], kernels=kernels)
        entry.update(projection_bytes=projection_bytes(model), kept_runs=[], base_read=base,
                     elem=next(dense.parameters()).element_size())
        if kernels == "triton":
            # count the columns read in one eager decode, then time without counting (no host synchronisation)
            prompt = torch.randint(0, dense.get_input_embeddings().weight.shape[0], (1, args.prompt_len),
                                   generator=torch.Generator().manual_seed(SEED)).to(next(dense.parameters()).device)
            _one_run({"model": model, "decoder": _new_decoder(model, prompt, args, None), "prefill_model": None,
                      "plan": None, "kept_runs": entry["kept_runs"]}, prompt, args)
            model.gathered["counter"]["on"] = False
    else:
        raise PipelineError(f"unknown per-token source {source!r}; choose from {', '.join(PER_TOKEN)}")
    entry.update(model=model, build_ms=1e3 * (time.perf_counter() - start))
    return entry


_TEAL_SAMPLES = {}


def teal_samples(dense, args) -> list:
    """``TEAL_CALIB`` (prompt, dense greedy continuation) pairs: the benchmark's own prompt and random ones of
    its length, each continued for ``--new_tokens`` (made once per run)."""
    if "samples" not in _TEAL_SAMPLES:
        device = next(dense.parameters()).device
        vocab = dense.get_input_embeddings().weight.shape[0]
        prompts = [torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(SEED + i))
                   for i in range(TEAL_CALIB)]        # seed SEED: the benchmark's own prompt
        decoder = GreedyDecoder(dense, 1, args.prompt_len + args.new_tokens)
        _TEAL_SAMPLES["samples"] = [(p[0].tolist(), decoder.generate(p.to(device), args.new_tokens)[0].tolist())
                                    for p in prompts]
    return _TEAL_SAMPLES["samples"]


def _finish_teal(entry, dense_bytes) -> None:
    """A teal row's kept share and bytes, from the columns its decode steps really read."""
    elem = entry["elem"]
    kept = statistics.mean(entry["kept_runs"])                      # weights read per step (elements)
    delta = kept * elem - entry["projection_bytes"]
    share = kept * elem / entry["projection_bytes"]
    base = entry["base_read"]
    entry.update(kept_heads=share, kept_neurons=share, weight_bytes=dense_bytes["total"] + delta,
                 read={**base, "weights": base["weights"] + delta, "total": int(base["total"] + delta)})


def entry_compiled(args) -> bool:
    return args.compile_mode is not None


def _row_compile(key, compile_mode):
    """A row's compile mode: every row's but stock teal's (its kept channels change in number every token: eager)."""
    return None if key[1] == "teal:stock" else compile_mode


def measure_group(dense, layout, prompt, args, compile_mode, fused, dense_bytes, bandwidth: float,
                  per_token: tuple = ()) -> list:
    """Rows of one batch size and path: every kept share (1.0 = the dense model), and for each source in
    ``per_token`` its gathered per-token path at every kept share below 1.  Sequential: one model at a
    time, all its runs (per-row peak memory).  Interleaved: every round runs each model once, so drifting
    load on a shared machine hits all rows alike (peak memory: all models at once)."""
    device = prompt.device
    shares = sorted(set(args.kept) | {1.0}, reverse=True)
    keys = [(share, None) for share in shares] + [(share, f"{src}:{kern}") for src in per_token
                                                  for kern in args.kernels for share in shares if share < 1.0]
    results = {}

    def read(model):
        return bytes_per_token(model, prompt.shape[0], args.prompt_len, args.new_tokens)

    def build(key):
        share, source = key
        if source is None:
            return make_entry(dense, layout, share, fused, dense_bytes, device, read)
        return make_token_entry(dense, layout, share, source, dense_bytes, read, args)
    if not args.interleave:
        for key in keys:
            entry = build(key)
            _reset_peak(device)
            entry["decoder"] = _new_decoder(entry["model"], prompt, args,
                                            _row_compile(key, compile_mode))
            runs = [_one_run(entry, prompt, args) for _ in range(args.warmup + args.repeats)][args.warmup:]
            results[key] = (entry, _summary(entry, runs, args, *_peak(device)))
            if args.profile:
                entry["profile"] = profile_steps(entry, prompt, args)
            entry["decoder"] = entry["model"] = None
            if compile_mode is not None:
                torch._dynamo.reset()      # drop this model's compiled graphs (and their CUDA graph pools)
    else:
        entries = {key: build(key) for key in keys}
        _reset_peak(device)
        for key, entry in entries.items():
            entry["decoder"] = _new_decoder(entry["model"], prompt, args, _row_compile(key, compile_mode))
            for _ in range(args.warmup):
                _one_run(entry, prompt, args)
        runs = {key: [] for key in entries}
        for _ in range(args.repeats):
            for key, entry in entries.items():
                runs[key].append(_one_run(entry, prompt, args))
        peak = _peak(device, " (all rows' models resident)")
        for key, entry in entries.items():
            results[key] = (entry, _summary(entry, runs[key], args, *peak))
            if args.profile:
                entry["profile"] = profile_steps(entry, prompt, args)
        del entries
        if compile_mode is not None:
            torch._dynamo.reset()
    base = results[(1.0, None)][1]["ms_per_token"]
    rows = []
    for key in keys:
        share, source = key
        if share not in args.kept:
            continue
        entry, summary = results[key]
        if "kept_runs" in entry:
            _finish_teal(entry, dense_bytes)
        row = {"batch": prompt.shape[0], "fused": entry["fused"],
               "compile": _row_compile(key, compile_mode) or "eager", "kept": share,
               "path": entry["path"], **summary, "build_ms": entry["build_ms"],
               "weight_bytes": entry["weight_bytes"], "kept_heads": entry["kept_heads"],
               "kept_neurons": entry["kept_neurons"]}
        if source is not None:
            row["per_token"], row["kernels"] = entry["source"], entry["kernels"]
            if "predictor_bytes" in entry:
                row["predictor_bytes"] = entry["predictor_bytes"]
                row["rows"] = args.rows
        row["speedup"] = base / row["ms_per_token"]
        row["ideal_speedup"] = dense_bytes["total"] / row["weight_bytes"]
        row.update(floor_fields(entry["read"]["total"], bandwidth, row["ms_per_token"]),
                   kv_cache_bytes=entry["read"]["kv_cache"])
        if "profile" in entry:
            row["profile"] = entry["profile"]
        flag(row)
        rows.append(row)
        print(f"  batch {row['batch']} fused={row['fused']} kept {share} {row['path']}: {row['ms_per_token']:.2f} "
              f"ms/token ({row['speedup']:.2f}x, ideal {row['ideal_speedup']:.2f}x; "
              f"{100 * row['share_of_floor']:.0f}% of the floor {row['floor_ms']:.2f} ms)", flush=True)
    return rows


def flag(row: dict) -> None:
    """Mark a row whose time cannot be true: faster than reading its bytes allows, or a speed-up beyond
    its bytes-ideal (e.g. a compiled graph that skipped the work, or a timing swamped by noise)."""
    reasons = []
    if row["share_of_floor"] > SUSPECT:
        reasons.append(f"{row['share_of_floor']:.2f}x faster than the memory floor")
    if row.get("ideal_speedup") and row["speedup"] > SUSPECT * row["ideal_speedup"]:
        reasons.append(f"speed-up {row['speedup']:.2f}x above its bytes-ideal {row['ideal_speedup']:.2f}x")
    if reasons:
        row["suspect"] = "; ".join(reasons)
        print(f"  warning: batch {row['batch']} kept {row.get('kept')}: {row['suspect']}: do not trust this row "
              "(rerun with more --new_tokens/--repeats, or check the path)", file=sys.stderr, flush=True)


def profile_steps(entry, prompt, args) -> dict:
    """Kernels of ``PROFILE_STEPS`` decode steps of a row's decoder (after a prefill), by kind."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    decoder = entry["decoder"]
    steps = min(PROFILE_STEPS, args.new_tokens - 1)
    decoder.prefill(prompt, entry["prefill_model"], entry["plan"])
    decoder.decode_steps(1)                 # the first replay after a prefill may still set things up
    decoder._sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.decode_steps(steps)
        decoder._sync()
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return kernel_breakdown(kernels, steps)


def run(args) -> dict:
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    compile_mode = args.compile
    if compile_mode == "auto":
        compile_mode = "reduce-overhead" if device.type == "cuda" else "none"
    compile_mode = None if compile_mode == "none" else compile_mode
    if compile_mode in ("reduce-overhead", "max-autotune") and device.type != "cuda":
        raise PipelineError(f"--compile {compile_mode} uses CUDA graphs; on {device.type} use --compile "
                            "default or none")
    fused_opts = {"off": [False], "on": [True], "both": [False, True]}[args.fused]
    if any(not 0 < k <= 1 for k in args.kept):
        raise PipelineError(f"--kept shares must be in (0, 1]; got {args.kept}")
    if any(b < 1 for b in args.batch):
        raise PipelineError(f"--batch sizes must be at least 1 (got {args.batch})")
    for name in ("batch", "kept"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            raise PipelineError(f"--{name} repeats a value ({' '.join(map(str, values))}); give each once")
    if args.profile == "auto":
        args.profile = device.type == "cuda"
    elif args.profile and device.type != "cuda":
        raise PipelineError("--profile counts GPU kernels; on a CPU leave it out")
    per_token = args.per_token
    if per_token == ["auto"]:
        per_token = list(PER_TOKEN) if device.type == "cpu" else []
    per_token = [p for p in per_token if p != "none"]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.compile_mode = compile_mode
    if args.kernels == ["auto"]:
        args.kernels = ["triton" if device.type == "cuda" else "stock"]
    if any(k not in KERNELS for k in args.kernels) or len(set(args.kernels)) != len(args.kernels):
        raise PipelineError(f"--kernels: auto, or each of {', '.join(KERNELS)} at most once (got {args.kernels})")
    if "triton" in args.kernels and per_token and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise PipelineError("--kernels triton times the Triton kernels on a GPU (on a CPU they only run in "
                            "Triton's interpreter: set TRITON_INTERPRET=1 to check them, not to time them); "
                            "use --kernels stock here")
    if compile_mode is not None and "teal" in per_token and "stock" in args.kernels:
        print("note: the stock teal rows run eager (their gathers change shape every token)", file=sys.stderr)
    if args.rows == "auto":
        args.rows = "index_select" if compile_mode is None else "compiled"
        if "predictor" in per_token and device.type == "cpu" and compile_mode is None:
            try:
                cpp_rows()
                args.rows = "cpp"
            except PipelineError as err:
                print(f"note: {err}; the predictor rows use index_select", file=sys.stderr)
    t0 = time.perf_counter()
    dense = build_model(args.model, device, dtype)
    print(f"model {args.model}: built in {time.perf_counter() - t0:.1f} s on {device} ({dtype})", flush=True)
    layout = locate_units(dense)
    vocab = dense.get_input_embeddings().weight.shape[0]
    dense_bytes = weight_bytes(dense)
    bw = read_bandwidth(device, dtype)
    print(f"read bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['nbytes'] / 2**20:.0f} MiB {bw['dtype']} "
          f"read in {1e3 * bw['seconds']:.2f} ms by {bw['kernel']}, best of 5)", flush=True)
    rows, anchors = [], []
    for batch in args.batch:
        prompt = torch.randint(0, vocab, (batch, args.prompt_len),
                               generator=torch.Generator().manual_seed(SEED)).to(device)
        for i, fused in enumerate(fused_opts):
            # per-token rows: batch 1, eager, once per batch (beside the first fused setting's rows)
            rows += measure_group(dense, layout, prompt, args, compile_mode, fused, dense_bytes, bw["bytes_per_s"],
                                  per_token=tuple(per_token) if batch == 1 and i == 0 else ())
        if args.anchors:
            anchors += measure_anchors(dense, prompt, args, bw["bytes_per_s"])
    return {"settings": {"model": args.model, "device": str(device),
                         "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                         else platform.processor() or platform.machine()),
                         "dtype": str(dtype).replace("torch.", ""), "prompt_len": args.prompt_len,
                         "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
                         "interleave": args.interleave, "per_token": per_token, "rows": args.rows,
                         "kernels": args.kernels,
                         "predictor_rank": PREDICTOR_RANK,
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            "read_bandwidth": bw, "dense_weight_bytes": dense_bytes, "rows": rows, "anchors": anchors}


def _median_ms(fn, warmup: int, repeats: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _reset_peak(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def gemv_chain(model, batch: int):
    """A callable that multiplies a fixed input by every linear weight of ``model`` in turn (one GEMV
    each, biases left out), and the bytes of those weights.  On CUDA the chain is one CUDA graph."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    device, dtype = linears[0].weight.device, linears[0].weight.dtype
    inputs = {n: torch.randn(batch, n, device=device, dtype=dtype)
              for n in sorted({lin.in_features for lin in linears})}

    def chain():
        return [torch.nn.functional.linear(inputs[lin.in_features], lin.weight) for lin in linears]

    nbytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
    if device.type != "cuda":
        return chain, nbytes
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        chain()                                   # warm cuBLAS up outside the capture
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    return graph.replay, nbytes


def measure_anchors(dense, prompt, args, bandwidth: float) -> list:
    """The two reference rows of one batch: transformers' ``generate()`` with a static cache (ms per
    token from the difference of a long and a one-token run, so the prefill cancels) and the GEMV chain."""
    device, batch = prompt.device, prompt.shape[0]
    read = bytes_per_token(dense, batch, args.prompt_len, args.new_tokens)
    n = args.new_tokens

    def gen(tokens):
        return lambda: dense.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                      cache_implementation="static", pad_token_id=0)

    long_ms = _median_ms(gen(n), args.warmup + 1, args.repeats, device)
    short_ms = _median_ms(gen(1), args.warmup + 1, args.repeats, device)
    out = [{"batch": batch, "path": "transformers generate(), static cache",
            "ms_per_token": (long_ms - short_ms) / (n - 1), **floor_fields(read["total"], bandwidth, 1.0)}]
    chain, nbytes = gemv_chain(dense, batch)
    steps = 20
    ms = _median_ms(lambda: [chain() for _ in range(steps)], args.warmup + 1, args.repeats, device) / steps
    out.append({"batch": batch, "path": "GEMV chain over the linear weights" + (" (CUDA graph)" if device.type ==
                                                                                  "cuda" else ""),
                "ms_per_token": ms, **floor_fields(nbytes, bandwidth, 1.0)})
    for row in out:
        row["share_of_floor"] = row["floor_ms"] / row["ms_per_token"]
        print(f"  anchor batch {batch}: {row['path']}: {row['ms_per_token']:.2f} ms/token "
              f"({100 * row['share_of_floor']:.0f}% of the floor {row['floor_ms']:.2f} ms)", flush=True)
    if device.type == "cuda":
        torch._dynamo.reset()                    # generate() may have compiled the model's forward
    return out


def markdown(result: dict) -> str:
    s, bw = result["settings"], result["read_bandwidth"]
    lines = [f"{s['model']} on {s['device']} ({s['device_name']}), {s['dtype']}, prompt {s['prompt_len']}, "
             f"{s['new_tokens']} new tokens, median of {s['repeats']}; read bandwidth "
             f"{bw['bytes_per_s'] / 1e9:.1f} GB/s",
             "",
             "| batch | fused | compile | kept | heads / neurons kept | path | ms/token | speed-up | ideal (bytes) | "
             "floor ms | share of floor | weights MB | peak MB | build ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        mark = " (suspect)" if r.get("suspect") else ""
        lines.append(f"| {r['batch']} | {'yes' if r['fused'] else 'no'} | {r['compile']} | {r['kept']:.1f} | "
                     f"{r['kept_heads']:.2f} / {r['kept_neurons']:.2f} | {r['path']} | {r['ms_per_token']:.2f}{mark} | "
                     f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {r['floor_ms']:.2f} | "
                     f"{100 * r['share_of_floor']:.0f}% | "
                     f"{r['weight_bytes'] / 2**20:.0f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['build_ms']:.0f} |")
    lines.append("")
    lines.append(f"peak MB: {result['rows'][0]['peak_mem_kind']}; build ms: the sparse model's gather "
                 "(index_select of the kept slices), paid once per request for a per-prompt mask; per-token rows: "
                 "weights MB and ideal are the weights a step reads (predictor included); floor: the "
                 "bytes a step must read (weights, embedding rows, KV cache at its mean length) at the "
                 "measured read bandwidth")
    if result.get("anchors"):
        lines += ["", "| batch | anchor | ms/token | floor ms | share of floor |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {a['batch']} | {a['path']} | {a['ms_per_token']:.2f} | {a['floor_ms']:.2f} | "
                  f"{100 * a['share_of_floor']:.0f}% |" for a in result["anchors"]]
    profiled = [r for r in result["rows"] if "profile" in r]
    if profiled:
        kinds = sorted({k for r in profiled for k in r["profile"]["by_kind"]})
        lines += ["", "kernels per decode step, and µs per step by kind (profiler, device time):", "",
                  "| batch | fused | kept | kernels | µs | " + " | ".join(kinds) + " |",
                  "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
        for r in profiled:
            by = r["profile"]["by_kind"]
            cells = [f"{by[k]['kernels_per_step']:.0f} / {by[k]['us_per_step']:.0f}" if k in by else "-"
                     for k in kinds]
            lines.append(f"| {r['batch']} | {'yes' if r['fused'] else 'no'} | {r['kept']:.1f} | "
                         f"{r['profile']['kernels_per_step']:.0f} | {r['profile']['us_per_step']:.0f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, choices=MODELS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--dtype", default=DTYPE)
    p.add_argument("--batch", type=int, nargs="+", default=BATCH)
    p.add_argument("--prompt_len", type=int, default=PROMPT_LEN)
    p.add_argument("--new_tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--kept", type=float, nargs="+", default=KEPT)
    p.add_argument("--compile", default=COMPILE, choices=("auto",) + COMPILE_MODES,
                   help="auto: reduce-overhead (CUDA graphs) on CUDA, eager on CPU")
    p.add_argument("--fused", nargs="?", const="on", default=FUSED, choices=("off", "on", "both"),
                   help="one matrix for q/k/v and one for gate/up (--fused alone: on; both: rows for each)")
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--interleave", action="store_true",
                   help="run the rows round-robin (one run of each per round): fairer on a shared, noisy machine")
    p.add_argument("--anchors", action="store_true", default=ANCHORS,
                   help="also time transformers' generate() (static cache) and a GEMV chain over the weights")
    p.add_argument("--profile", nargs="?", const="on", default=PROFILE, choices=("auto", "on", "off"),
                   help="kernels per decode step by kind, from the profiler (auto: on CUDA only)")
    p.add_argument("--per_token", nargs="+", default=[PER_TOKEN_DEFAULT], choices=PER_TOKEN + ("auto", "none"),
                   help="per-token gathered rows at batch 1 (utils/gathered.py): auto = predictor and teal on a CPU, "
                        "none on CUDA")
    p.add_argument("--rows", default=ROWS, choices=("auto",) + ROW_MODES,
                   help="how the predictor path gathers output rows: cpp (a C++ gather-GEMV built on first use), "
                        "index_select + matmul, or compiled (inductor); auto: cpp where it builds, else index_select")
    p.add_argument("--kernels", nargs="+", default=PER_TOKEN_KERNELS, choices=("auto",) + KERNELS,
                   help="the per-token rows' gathers: stock (index lists, embedding_bag; the CPU's) or triton "
                        "(masked kernels, GPU only; both: a row each); auto: triton on CUDA, stock on a CPU")
    p.add_argument("--threads", type=int, default=THREADS, help="CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the rows and settings here")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1 or args.warmup < 0:
        raise PipelineError("need --new_tokens >= 2, --prompt_len >= 1, --repeats >= 1, --warmup >= 0")
    args.profile = {"on": True, "off": False}.get(args.profile, args.profile)
    return args


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
