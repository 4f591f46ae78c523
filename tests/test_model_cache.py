"""The converted copy of a GGUF model (utils.models: one slow GGUF parse, then plain safetensors) must be
the very model stock transformers loads from the GGUF file: same weights bit for bit (float32 and a cast
dtype), same tokenizer, same stop tokens; a damaged copy is rebuilt, an unwritable cache only costs speed."""
import os
import time

import pytest
import torch

from utils import models


@pytest.fixture(scope="module")
def reference():
    """SmolLM2-135M-Instruct loaded straight from its GGUF file by transformers (the slow path)."""
    path = models.offline_gguf_path()
    tok, model = models._from_pretrained(str(path.parent), {"gguf_file": path.name}, "smollm2", torch.float32)
    return path, tok, model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    return tmp_path


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    assert type(a) is type(b)
    assert a.config.tie_word_embeddings == b.config.tie_word_embeddings
    assert a.generation_config.eos_token_id == b.generation_config.eos_token_id


def assert_same_tokenizer(a, b):
    texts = ["What happens if you eat watermelon seeds?", "Ünïcode ☃ and  double  spaces\n\nnew line",
             "print('x')\t# code"]
    for text in texts:
        assert a(text)["input_ids"] == b(text)["input_ids"]
    turn = [{"role": "user", "content": texts[0]}]
    assert (a.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            == b.apply_chat_template(turn, add_generation_prompt=True, tokenize=False))
    assert (a.eos_token_id, a.bos_token_id) == (b.eos_token_id, b.bos_token_id)


def test_converted_copy_is_the_gguf_model(reference, cache, capsys):
    path, ref_tok, ref_model = reference
    target = models.converted_dir(path)
    assert target.parent.parent == cache
    models._save_converted(ref_tok, ref_model, target)
    tok, model = models._load_gguf(path, "smollm2", torch.float32)
    assert "converting" not in capsys.readouterr().out          # read from the copy, not converted again
    assert getattr(model, "hf_quantizer", None) is None
    assert_same_model(ref_model, model)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert_same_tokenizer(ref_tok, tok)
    # a lower dtype is the float32 weights cast, as the GGUF loader casts them
    _, half = models._load_gguf(path, "smollm2", torch.bfloat16)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(half.state_dict()[key], value.to(torch.bfloat16)), key
    # the model converted in memory keeps its GGUF quantizer (saving must not have changed it)
    assert getattr(ref_model, "hf_quantizer", None) is not None


def test_damaged_copy_is_rebuilt(reference, cache, capsys, monkeypatch):
    path, ref_tok, ref_model = reference
    target = models.converted_dir(path)
    models._save_converted(ref_tok, ref_model, target)
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    real = models._from_pretrained
    conversions = []

    def from_pretrained(source, extra, name, dtype):   # the GGUF parse is the slow part: hand back the reference
        if "gguf_file" in extra:
            conversions.append(source)
            return ref_tok, ref_model
        return real(source, extra, name, dtype)

    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    tok, model = models._load_gguf(path, "smollm2", torch.float32)
    out = capsys.readouterr().out
    assert "cannot be read" in out and "converting" in out and len(conversions) == 1
    tok, model = models._load_gguf(path, "smollm2", torch.float32)   # the rebuilt copy now loads
    assert len(conversions) == 1
    assert_same_model(ref_model, model)
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]   # no half-written folder


def test_unwritable_cache_only_costs_speed(reference, cache, capsys, monkeypatch):
    path, ref_tok, ref_model = reference
    monkeypatch.setattr(models, "_from_pretrained",
                        lambda source, extra, name, dtype: (ref_tok, ref_model))

    def refuse(*args, **kwargs):     # a read-only cache folder (chmod does not stop root, who runs CI)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(models.tempfile, "mkdtemp", refuse)
    tok, model = models._load_gguf(path, "smollm2", torch.float32)
    assert model is ref_model
    assert not models.converted_dir(path).exists()
    assert "could not keep a converted copy" in capsys.readouterr().out


def test_a_killed_conversion_leaves_no_lasting_folder(reference, cache, monkeypatch):
    """A conversion killed midway leaves a temporary folder (never read); the next conversion removes it once
    it is clearly abandoned, and leaves a recent one alone (another process may be writing it)."""
    path, ref_tok, ref_model = reference
    target = models.converted_dir(path)
    target.parent.mkdir(parents=True)
    old = target.parent / f".{target.name}.dead.tmp"
    young = target.parent / f".{target.name}.live.tmp"
    for folder in (old, young):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - models.STALE_TEMPORARY_S - 60
    os.utime(old, (hour_ago, hour_ago))
    monkeypatch.setattr(models, "_from_pretrained", lambda source, extra, name, dtype: (ref_tok, ref_model))
    models._load_gguf(path, "smollm2", torch.float32)
    assert not old.exists() and young.exists() and target.is_dir()


def test_a_killed_gemma_join_leaves_no_lasting_file(cache):
    """The same clean-up for the joined Gemma file's temporary (a killed join leaves a partial file)."""
    target = cache / "gemma-3-270m-q4_k_m.gguf"
    cache.mkdir(exist_ok=True)
    old, young = cache / f".{target.name}.dead.tmp", cache / f".{target.name}.live.tmp"
    for f in (old, young):
        f.write_bytes(b"partial")
    hour_ago = time.time() - models.STALE_TEMPORARY_S - 60
    os.utime(old, (hour_ago, hour_ago))
    models._remove_stale_temporaries(target)
    assert not old.exists() and young.exists()


class PerCharacter:
    """A tokenizer that splits text into characters, as a wrong GGUF conversion splits words too finely."""
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_tokenizer_probe(reference):
    """The named models' tokenizers must split the probe as their own tokenizer does (transformers 5.17 splits
    Gemma-3's "Nothing happens" into 6 pieces); other models are not probed."""
    _, ref_tok, _ = reference
    for alias in ("smollm2", "SmolLM2-135M-Instruct"):
        models.check_tokenizer(alias, ref_tok)
    with pytest.raises(models.TokenizerMismatch, match=r"^transformers \S+ reads the gemma3-270m tokenizer wrongly .*"
                       r"-> 15 pieces 'N' 'o' .*expected 2\); install a newer one: pip install -U 'transformers>=5.18'$"):
        models.check_tokenizer("gemma3-270m", PerCharacter())
    with pytest.raises(models.TokenizerMismatch, match="expected 2"):
        models.check_tokenizer("smollm2", PerCharacter())
    models.check_tokenizer("someone/else", PerCharacter())
    models.check_tokenizer("/models/x.gguf", PerCharacter())


def test_a_copy_failing_the_probe_is_removed_not_reconverted(reference, cache, monkeypatch):
    path, ref_tok, ref_model = reference
    target = models.converted_dir(path)
    models._save_converted(ref_tok, ref_model, target)
    monkeypatch.setitem(models._TOKENIZER_PROBE_IDS, models.OFFLINE_MODEL, [1, 2])
    with pytest.raises(models.TokenizerMismatch, match="expected 2"):
        models._load_gguf(path, "smollm2", torch.float32)
    assert not target.exists()


def _gemma_installed():
    try:
        import importlib.metadata as md
        md.version(models._GEMMA_WHEEL)
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _gemma_installed(), reason="Gemma-3-270M wheels not installed (scripts/setup.sh --gemma)")
def test_gemma_tokenizer_from_its_gguf_passes_the_probe():
    """The probe's expected ids are what Gemma-3's own tokenizer gives (read here from the GGUF file)."""
    from transformers import AutoTokenizer

    path = models.gemma_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    models.check_tokenizer("gemma3-270m", tok)
    assert [tok.decode([i]) for i in tok(models.TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]] == \
        ["Nothing", " happens"]
