"""Save a randomly initialised Phi-2-shaped model (seed 0) with a given tokenizer as a local model folder,
so the whole pipeline can be timed at Phi-2's size without Phi-2's weights.

    python benchmarks/make_random_phi2.py --tokenizer TOKENIZER_FOLDER --out /tmp/phi2-random
"""
import argparse

import torch
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a folder with a tokenizer whose ids fit in 51200")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                    num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = PhiForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {args.out}")


if __name__ == "__main__":
    main()
