#!/usr/bin/env bash
# Set up, then run the whole pipeline on the offline default (SmolLM2-135M-Instruct, 8 TruthfulQA
# questions; IG on the first with 4 steps) on the CPU, ending with result/truthfulqa/res/both/tradeoff.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
python3 run_pipeline.py --offline --device cpu "$@"
