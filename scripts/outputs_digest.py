"""Run the whole pipeline on tiny random Phi-, Llama- and Gemma-style models (and, with --quickstart, on the
offline default) and print the sha256 of every file the run wrote, so that a refactoring can show its
outputs are bit-identical: run it before and after, then compare.

    python scripts/outputs_digest.py --out before.json            # on the old tree
    python scripts/outputs_digest.py --compare before.json        # on the new one: exit 1 on any difference

Every source (oracle, prompt, static), every metric (IG with 2 steps) and every quality measure is swept,
and the attribution-error step runs too.  Files that name a process or a time (the lock, checkpoints' hosts)
are left out (`.lock` names its holder's process); the PDF figures carry a creation date and are compared by
their size only, and the sweep's JSON files without the score files' modification times they record.  The runs work in a temporary folder with relative paths (`models/phi`, `run_phi`), so the
settings that labels.json records are the same wherever the script runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_DATA, CALIB = 3, 2


def build_models(root: Path) -> dict:
    """Tiny random models with the offline tokenizer, saved as local folders (as the tests build them)."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from conftest import BUILDERS  # noqa: E402  (the tests' own builders: the same tiny models)
    from transformers import AutoTokenizer  # noqa: E402

    from utils.models import offline_gguf_path  # noqa: E402

    gguf = offline_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = {}
    for arch, build in BUILDERS.items():
        model = build(vocab=len(tok), layers=2, seed=1)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def run(argv: list[str], cwd: Path) -> None:
    """One step script of this tree, run in ``cwd`` (where the relative model and result paths live)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def pipeline(model: str, result: str, cwd: Path, extra=()) -> None:
    run(["run_pipeline.py", "--model_name", model, "--dataset", "truthfulqa-offline", "--result_dir", result,
         "--device", "cpu", "--source", "all", "--calib_num_data", str(CALIB), *extra], cwd)
    run(["main.py", "--result_dir", result, "--num_data", str(NUM_DATA), "--metric_name", "all",
         "--source", "all", "--calib_num_data", str(CALIB), "--plot_metric", "bleu", "token_agreement", "kl", "ppl"],
        cwd)
    run(["attribution_error.py", "--result_dir", result, "--steps", "2", "--num_units", "8"], cwd)


def _without_mtimes(value):
    """A JSON value without its ``mtime_ns`` fields: the sweep records when each score file it read was
    written, which differs on every run."""
    if isinstance(value, dict):
        return {k: _without_mtimes(v) for k, v in value.items() if k != "mtime_ns"}
    if isinstance(value, list):
        return [_without_mtimes(v) for v in value]
    return value


def digest(folder: Path) -> dict:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"):
        rel = str(path.relative_to(folder))
        data = path.read_bytes()
        if path.suffix == ".json" and b"mtime_ns" in data:
            data = json.dumps(_without_mtimes(json.loads(data)), sort_keys=True).encode()
        out[rel] = f"size {len(data)}" if path.suffix == ".pdf" else hashlib.sha256(data).hexdigest()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the digests to this JSON file")
    p.add_argument("--compare", help="compare with digests written by an earlier --out; exit 1 if any differ")
    p.add_argument("--quickstart", action="store_true", help="also run the offline quick start (~2 min)")
    args = p.parse_args()
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in build_models(tmp / "models"):
            pipeline(f"models/{arch}", f"run_{arch}", tmp, ["--num_data", str(NUM_DATA), "--n_steps", "2"])
            digests[arch] = digest(tmp / f"run_{arch}")
            print(f"{arch}: {len(digests[arch])} files", file=sys.stderr)
        if args.quickstart:
            run(["run_pipeline.py", "--offline", "--device", "cpu", "--result_dir", "quickstart"], tmp)
            digests["quickstart"] = digest(tmp / "quickstart")
            print(f"quickstart: {len(digests['quickstart'])} files", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(digests, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = 0
        for run_name in sorted(set(before) | set(digests)):
            old, new = before.get(run_name, {}), digests.get(run_name, {})
            for rel in sorted(set(old) | set(new)):
                if old.get(rel) != new.get(rel):
                    differ += 1
                    print(f"differs: {run_name}/{rel}: {old.get(rel, 'absent')} -> {new.get(rel, 'absent')}")
        total = sum(len(d) for d in digests.values())
        print(f"{total - differ if differ <= total else 0} of {total} files identical; {differ} differ")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
