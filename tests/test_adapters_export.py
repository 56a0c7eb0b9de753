"""Save/load round trips, merge equals unmerged, and PEFT export gives the same logits under PEFT."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from peft import PeftModel

import metalora as ml
from metalora.adapters import AdapterLoadError, NotMergeableError, is_task_routed
from metalora.testing import VOCAB, randomize_adapter, tiny_model

NAMES = ["boolq", "piqa", "arc_easy"]
CONFIGS = {
    "lora": lambda: ml.LoRAConfig(r=4),
    "dora": lambda: ml.LoRAConfig(r=4, use_dora=True),
    "mtl_lora": lambda: ml.MTLLoRAConfig(r=4, task_names=NAMES),
    "mtl_lora_diag": lambda: ml.MTLLoRAConfig(r=4, task_names=NAMES, lambda_form="diagonal"),
    "mtl_lora_none": lambda: ml.MTLLoRAConfig(r=4, task_names=NAMES, lambda_form="none"),
    "hydra_lora": lambda: ml.HydraLoRAConfig(r=4),
    "multilora": lambda: ml.MultiLoRAConfig(r=2, num_parallel=3),
    "moelora": lambda: ml.MoELoRAConfig(r=4, task_names=NAMES, num_experts=2),
}
MERGEABLE = [n for n in CONFIGS if n != "hydra_lora"]
X = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))


def adapted(name, family="llama"):
    model = ml.add_adapter(tiny_model(family), CONFIGS[name]())
    randomize_adapter(model)
    return model


def logits(model, task=None):
    ctx = ml.task_ids(model, [task] * X.shape[0]) if is_task_routed(model) else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return model(X).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_reproduces_logits_exactly(name, tmp_path):
    model = adapted(name)
    ml.save_adapter(model, tmp_path)
    record = json.loads((tmp_path / "metalora_adapter.json").read_text())
    assert record["adapter_type"] == CONFIGS[name]().adapter_type
    assert record["base_model"] == "tiny-llama"
    assert "model.layers.0.self_attn.q_proj" in record["targets"]
    loaded = ml.load_adapter(tiny_model("llama"), tmp_path)
    task = "piqa" if is_task_routed(model) else None
    assert torch.equal(logits(loaded, task), logits(model, task))


def test_load_onto_an_incompatible_base_says_what_does_not_match(tmp_path):
    ml.save_adapter(adapted("mtl_lora"), tmp_path)
    with pytest.raises(
        AdapterLoadError, match=r"model_type: adapter was made for 'llama', this base has 'qwen2'"
    ):
        ml.load_adapter(tiny_model("qwen2"), tmp_path)
    bigger = tiny_model("llama")
    bigger.config.vocab_size = 99  # a different base of the same family
    with pytest.raises(AdapterLoadError, match=r"vocab_size: adapter was made for 64, this base has 99"):
        ml.load_adapter(bigger, tmp_path)
    with pytest.raises(AdapterLoadError, match=r"metalora_adapter.json not found"):
        ml.load_adapter(tiny_model("llama"), tmp_path / "nowhere")


def _craft(tensors: dict[str, torch.Tensor], case: str) -> tuple[dict[str, torch.Tensor], str]:
    """``tensors`` damaged as ``case`` says, and the tensor name the error must give."""
    name = sorted(tensors)[0]
    tensors = dict(tensors)
    if case == "shape":
        tensors[name] = torch.zeros(*tensors[name].shape, 2)
    elif case == "dtype":
        tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.int32)
    elif case == "missing":
        del tensors[name]
    elif case == "extra":
        name = "model.layers.0.mlp.lora_evil"
        tensors[name] = torch.zeros(2)
    return tensors, name


@pytest.mark.parametrize("case", ["shape", "dtype", "missing", "extra"])
@pytest.mark.parametrize("name", ["lora", "mtl_lora"])
def test_crafted_safetensors_are_refused_in_one_line_naming_file_and_tensor(name, case, tmp_path):
    """Oracle: an adapter file whose tensor has the wrong shape or dtype, or that lacks a tensor or holds an
    extra one, raises AdapterLoadError whose one-line message names the file and the tensor; a float64
    copy of the same file (a float dtype) still loads."""
    from safetensors.torch import load_file, save_file

    ml.save_adapter(adapted(name), tmp_path)
    weights = tmp_path / "adapter.safetensors"
    tensors, bad = _craft(load_file(str(weights)), case)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterLoadError) as info:
        ml.load_adapter(tiny_model("llama"), tmp_path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(weights) in message and repr(bad) in message, message


def test_damaged_safetensors_and_float64_tensors(tmp_path):
    """Oracle: a truncated or non-safetensors file is a one-line AdapterLoadError naming the file (not the
    library's own exception); float64 tensors (an adapter trained in float64) load cast to float32."""
    from safetensors.torch import load_file, save_file

    model = adapted("lora")
    ml.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter.safetensors"
    good = weights.read_bytes()
    for damaged in (good[:40], b"\x00" * 64, b"not a safetensors file"):
        weights.write_bytes(damaged)
        with pytest.raises(AdapterLoadError, match="not a readable safetensors file") as info:
            ml.load_adapter(tiny_model("llama"), tmp_path)
        assert len(str(info.value).splitlines()) == 1 and str(weights) in str(info.value)
    weights.write_bytes(good)
    save_file({k: v.double() for k, v in load_file(str(weights)).items()}, str(weights))
    loaded = ml.load_adapter(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_equals_unmerged(name, family):
    model = adapted(name, family)
    tasks = NAMES if is_task_routed(model) else [None]
    for task in tasks:
        merged = ml.merge(model, task=task)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert type(merged) is type(model)
        torch.testing.assert_close(logits(merged), logits(model, task), rtol=1e-5, atol=1e-5)
    # the adapted model is untouched by a non-inplace merge, and an inplace merge gives the same result
    expected = logits(model, tasks[0])
    inplace = ml.merge(model, task=tasks[0], inplace=True)
    assert inplace is model
    torch.testing.assert_close(logits(inplace), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", MERGEABLE)
def test_peft_export_gives_equal_logits_under_peft(name, family, tmp_path):
    model = adapted(name, family)
    tasks = ["arc_easy", "boolq"] if is_task_routed(model) else [None]
    for task in tasks:
        out = tmp_path / f"peft_{task}"
        ml.export_peft(model, out, task=task)
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
        reloaded = PeftModel.from_pretrained(tiny_model(family), str(out)).eval()
        with torch.no_grad():
            got = reloaded(X).logits
        torch.testing.assert_close(got, logits(model, task), rtol=0, atol=1e-5)


def test_token_routed_adapter_cannot_be_merged_or_exported(tmp_path):
    model = adapted("hydra_lora")
    with pytest.raises(NotMergeableError, match="routes every token"):
        ml.merge(model)
    with pytest.raises(NotMergeableError, match="routes every token"):
        ml.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["mtl_lora", "moelora"])
def test_task_specific_adapter_needs_a_task_to_merge(name):
    with pytest.raises(NotMergeableError, match="pass task="):
        ml.merge(adapted(name))


def test_no_pickle_in_saved_files(tmp_path):
    model = adapted("mtl_lora")
    ml.save_adapter(model, tmp_path / "a")
    ml.export_peft(model, tmp_path / "b", task="boolq")
    files = sorted(p.name for p in (tmp_path / "a").iterdir()) + sorted(
        p.name for p in (tmp_path / "b").iterdir()
    )
    assert all(f.endswith((".json", ".safetensors", ".md")) for f in files), files
