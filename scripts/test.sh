#!/usr/bin/env bash
# Set up, then run the test suite (CPU, tiny random models; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TOKENIZERS_PARALLELISM=false
python3 -m pytest -q tests "$@"
