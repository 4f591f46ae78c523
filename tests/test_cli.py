"""Every script's --help, the constants run_pipeline.py follows, and the artefact registry.  Nothing here
loads a model: run_pipeline.plan parses every step's command line with the step's own parser."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from utils.errors import PipelineError

import attribution_attention
import label_generation
import Mag_attention
import Mag_mlp
import main as sweep_main
import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["folder_creation", "label_generation", "Mag_attention", "Mag_mlp", "attribution_attention", "main",
           "attribution_error", "run_pipeline"]


def flag_blocks(text: str) -> dict:
    """``{--flag: its help entry with whitespace collapsed}`` from an argparse help text."""
    blocks, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-\w|--\w+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current is not None:
            blocks[current] += " " + line
    return {flag: " ".join(body.split()) for flag, body in blocks.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = module.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    blocks = flag_blocks(text)
    assert set(blocks) == {"-h"} | {a.option_strings[0] for a in flags}
    for action in flags:
        assert action.help and action.help.strip(), f"{script} {action.option_strings[0]} has no help text"
        entry = blocks[action.option_strings[0]]
        assert entry.count("(default") <= 1, f"{script}: {entry}"
    assert "(default: None)" not in " ".join(text.split())
    assert "default: [" not in text       # lists are shown as their values, not as Python lists


def test_help_defaults_of_later_steps_and_folder_creation(capsys):
    import folder_creation

    assert {a.dest for a in folder_creation.build_parser()._actions} == {"help", "dataset", "result_dir"}
    blocks = flag_blocks(Mag_mlp.build_parser().format_help())
    for flag in ("--model_name", "--dtype", "--seed", "--prompt_format"):
        assert blocks[flag].endswith("(default: from labels.json)"), blocks[flag]
    label_blocks = flag_blocks(label_generation.build_parser().format_help())
    assert label_blocks["--model_name"].endswith(f"(default: {label_generation.MODEL_NAME})")
    assert "offline default" not in label_blocks["--model_name"]


@pytest.fixture
def edited_constants(monkeypatch, tmp_path):
    """Every step constant set to a non-default value, as a user editing the scripts would."""
    edits = {
        label_generation: {"MODEL_NAME": "org/edited-model", "DATASET": "truthfulqa-offline", "NUM_DATA": 7,
                           "DTYPE": "bfloat16", "SEED": 5, "PROMPT_FORMAT": "base", "DEVICE": "cpu",
                           "RESULT_DIR": str(tmp_path / "edited")},
        Mag_attention: {"NUM_DATA": 2},
        Mag_mlp: {"NUM_DATA": 3},
        attribution_attention: {"N_STEPS": 3, "BATCH_SIZE": 64, "STEP_MODE": "cached", "NUM_DATA": 4},
        sweep_main: {"METRIC_NAME": ["gxo", "cor_gxo"], "SOURCE": ["oracle", "static"], "CALIB_NUM_DATA": 2,
                     "PLOT_METRIC": ["kl"], "RATIOS": [0.0, 0.5], "MASK_LAYERS": "0-1",
                     "COR_GXO_VARIANT": "released", "BATCH_SIZE": 5},
        run_pipeline: {"IG_NUM_DATA": 6},
    }
    for module, values in edits.items():
        for name, value in values.items():
            assert hasattr(module, name), f"{module.__name__}.{name}"
            monkeypatch.setattr(module, name, value)
    return tmp_path / "edited"


def test_run_pipeline_follows_every_step_constant(edited_constants):
    steps, request = run_pipeline.plan(run_pipeline.parse([]))
    args = {s.name: s.args for s in steps}
    assert [s.name for s in steps] == ["folders", "labels", "head magnitudes", "neuron magnitudes", "gradient + gxo",
                                       "integrated gradients", "sweep + figure"]
    for s in steps:                               # one run folder for every step
        assert (s.args.dataset, s.args.result_dir) == ("truthfulqa-offline", str(edited_constants))
    lab = args["labels"]
    assert (lab.model_name, lab.dtype, lab.seed, lab.prompt_format, lab.device) == \
        ("org/edited-model", "bfloat16", 5, "base", "cpu")
    assert lab.num_data == 7 + 2                  # the evaluated samples, then static's calibration samples
    assert args["head magnitudes"].num_data == 2 and args["neuron magnitudes"].num_data == 3
    grad, ig = args["gradient + gxo"], args["integrated gradients"]
    assert (grad.metric, grad.batch_size, grad.step_mode, grad.num_data) == (["gradient", "gxo"], 64, "cached", 4)
    assert (ig.metric, ig.n_steps, ig.batch_size, ig.num_data) == (["ig"], 3, 64, 6)
    sweep = args["sweep + figure"]
    assert sweep.batch_size == 5 and sweep.num_data == 7
    assert request.recorded() == {"metric_name": ["gxo", "cor_gxo"], "sources": ["oracle", "static"],
                                  "ratios": [0.0, 0.5], "mask_layers": [0, 1], "cor_gxo_variant": "released",
                                  "num_data": 7, "calib_num_data": 2, "plot_metrics": ["kl"]}
    # the help shows the edited values, and flags given still override them
    text = " ".join(run_pipeline.build_parser().format_help().split())
    assert "N_STEPS: 3" in text and "MODEL_NAME: org/edited-model" in text
    steps, _ = run_pipeline.plan(run_pipeline.parse(["--n_steps", "9", "--num_data", "8", "--skip_ig"]))
    assert [s.name for s in steps][-2:] == ["gradient + gxo", "sweep + figure"]
    assert steps[1].args.num_data == 8 + 2 and steps[-1].args.num_data == 8


def test_run_pipeline_done_check_uses_the_step_constants(edited_constants, monkeypatch):
    """Each step carries its own done check.  The labels' compares with label_generation.py's settings
    (SEED included), and a score step's with that step's NUM_DATA."""
    from utils.data import Sample
    from utils.fingerprint import hash_file
    from utils.io import write_json
    from utils.labelset import new_labels, write_labels
    from utils.paths import ResultPaths
    from utils.provenance import meta_path

    paths = ResultPaths(edited_constants)
    steps, request = run_pipeline.plan(run_pipeline.parse(["--skip_ig"]))
    on_disk = run_pipeline.OnDisk(paths, "fp", request)

    def done(name, steps=steps):
        return next(s for s in steps if s.name == name).is_done(on_disk)

    assert not any(s.is_done(on_disk) for s in steps)       # an empty folder: every step runs
    settings = {"model": "org/edited-model", "dataset": "truthfulqa-offline", "num_data": 9, "prompt_format": "base",
                "dtype": "bfloat16", "seed": 5, "samples_sha256": "fp"}
    samples = [Sample(str(i), f"q{i}", f"r{i}") for i in range(9)]
    labels = new_labels(paths.labels, settings, texts=["a"] * 9, label_ids=[[1, 2]] * 9, prompt_ids=[[3]] * 9,
                        samples=samples)
    paths.labels.parent.mkdir(parents=True)
    write_labels(labels)
    assert done("labels")
    assert not done("folders")                                # always runs (instant; it takes the lock)
    assert not done("head magnitudes")
    path = paths.score("magnitude", "attention")          # 2 samples: Mag_attention.NUM_DATA
    path.parent.mkdir(parents=True)
    torch.save([torch.ones(2, 3, 4)] * 2, path)
    write_json(meta_path(path), {"run_id": labels.run_id, "num_samples": 2, "n_steps": None,
                                 "sha256": hash_file(path)})
    assert done("head magnitudes")
    monkeypatch.setattr(Mag_attention, "NUM_DATA", None)   # now every labelled sample (9) is needed
    monkeypatch.setattr(label_generation, "SEED", 6)
    replanned, _ = run_pipeline.plan(run_pipeline.parse(["--skip_ig"]))
    assert not done("labels", replanned) and not done("head magnitudes", replanned)


def test_run_pipeline_runs_the_steps_not_done_and_every_step_with_redo(tmp_path, qa_file, monkeypatch, capsys):
    ran = []
    for module in {s.script for s in run_pipeline.plan(run_pipeline.parse(["--num_data", "2"]))[0]}:
        monkeypatch.setattr(module, "main", lambda argv, m=module: ran.append(m.__name__))
    done = {"labels", "gradient + gxo", "sweep + figure"}
    monkeypatch.setattr(run_pipeline.Step, "is_done", lambda step, on_disk: step.name in done)
    args = ["--dataset", qa_file, "--num_data", "2", "--device", "cpu", "--result_dir", tmp_path / "r"]
    run_pipeline.main(list(map(str, args)))
    assert ran == ["folder_creation", "Mag_attention", "Mag_mlp", "attribution_attention"]   # IG not done
    assert capsys.readouterr().out.count("its files are complete for this run; skipped") == 3
    ran.clear()
    run_pipeline.main(list(map(str, args + ["--redo"])))
    assert ran == ["folder_creation", "label_generation", "Mag_attention", "Mag_mlp", "attribution_attention",
                   "attribution_attention", "main"]
    assert "skipped" not in capsys.readouterr().out


def test_every_pipeline_step_says_when_it_is_done():
    """A step without a done check cannot be made (it is not silently 'never done')."""
    steps, _ = run_pipeline.plan(run_pipeline.parse(["--num_data", "2"]))
    assert all(callable(s.done) for s in steps)
    with pytest.raises(TypeError):
        run_pipeline.Step("new step", Mag_mlp, [], None)


def test_registry_names_real_scripts_and_paths():
    from utils import artifacts
    from utils.paths import ResultPaths
    from utils.sites import ATTN, MLP

    for art in artifacts.REGISTRY.values():
        assert (ROOT / art.producer.split()[0]).is_file(), art
    for name in (artifacts.FOLDERS_SCRIPT, artifacts.PIPELINE_SCRIPT, *artifacts.MAGNITUDE_SCRIPTS.values()):
        assert (ROOT / name).is_file()
    paths = ResultPaths(Path("r"))
    assert paths.labels == Path("r/labels.json") and paths.results == Path("r/res/both/results.json")
    assert paths.score("magnitude", MLP) == Path("r/magnitude/magnitude_mlp_list.pt")
    assert paths.score("grad_norm", ATTN) == Path("r/ig/grad_norm_attention_list.pt")
    assert paths.folders() == [Path("r/ig"), Path("r/magnitude"), Path("r/res/both")]
    assert artifacts.score("gxo", ATTN).producer == "attribution_attention.py --metric gxo"
    assert artifacts.scores_command(["gradient", "gxo"], MLP) == "attribution_attention.py --metric gradient gxo"
    assert artifacts.scores_command(["magnitude"], ATTN) == "Mag_attention.py"


@pytest.mark.parametrize("module, constant, value, message", [
    ("label_generation", "NUM_DATA", 0, "--num_data must be at least 1 (got 0)"),
    ("label_generation", "SEED", -1, "--seed must be between 0 and 4294967295 (got -1)"),
    ("label_generation", "PROMPT_FORMAT", "xx", "--prompt_format 'xx'"),
    ("main", "NUM_DATA", 0, "--num_data must be at least 1 (got 0)"),
    ("attribution_attention", "N_STEPS", 0, "--n_steps must be at least 1 (got 0)"),
])
def test_an_edited_constant_gets_its_flags_check(monkeypatch, module, constant, value, message):
    """A constant at the top of a step script is the default of its flag, and is checked like a value
    given on the command line (argparse checks neither non-string defaults nor any default's choices)."""
    script = importlib.import_module(module)
    monkeypatch.setattr(script, constant, value)
    with pytest.raises(PipelineError) as err:
        script.build_parser().parse_args([])
    assert message in str(err.value) and f"a constant at the top of {module}.py" in str(err.value)


@pytest.mark.parametrize("seed", ["-1", str(10 ** 20)])
def test_seed_out_of_range_is_one_line(seed):
    with pytest.raises(PipelineError, match="--seed must be between 0 and 4294967295"):
        label_generation.build_parser().parse_args(["--seed", seed])


@pytest.mark.parametrize("script, argv, message", [
    ("attribution_attention", ["--n_steps", str(10 ** 20)], "--n_steps must be at most 100000"),
    ("attribution_error", ["--unit_seed", str(10 ** 20)], "--unit_seed must be between 0 and 4294967295"),
    ("attribution_error", ["--unit_seed", "-1"], "--unit_seed must be between 0 and 4294967295"),
])
def test_counts_and_seeds_that_cannot_work_are_refused_up_front(script, argv, message):
    """A count too large to fit in memory, or a seed numpy refuses: one line before any work."""
    with pytest.raises(PipelineError, match=message):
        importlib.import_module(script).build_parser().parse_args(argv)
