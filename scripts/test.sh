#!/usr/bin/env bash
# Set up, lint, then run the test suite (CPU, tiny random models; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# pyflakes-class checks (ruff.toml): undefined names, unused imports; no reformatting
python3 -m ruff check .
export TOKENIZERS_PARALLELISM=false
python3 -m pytest -q tests "$@"
