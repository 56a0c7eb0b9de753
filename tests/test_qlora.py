"""QLoRA: a bitsandbytes NF4 / int8 base under every adapter, checked on CPU against oracles.

Oracles:
1. every metalora adapter over a quantized base gives the outputs and adapter gradients of the same
   adapter over a plain model whose linear weights are bitsandbytes' own dequantization of the quantized
   ones (``dequantize_4bit``; int8: W_int8 · SCB / 127), also after an evaluation forward;
2. LoRA/DoRA through metalora equal PEFT's own QLoRA path (``get_peft_model`` on the same quantized model);
3. a QLoRA run (``metalora.train.run``) lowers the loss, and its adapter, exported as PEFT, loads with
   ``PeftModel.from_pretrained`` over a quantized base and gives the adapted model's logits;
4. merging into a quantized base is refused; merging into the dequantized copy is W_deq + ΔW by hand;
5. a bad ``quantization`` value names the key; int8 trains on CPU (the oracles above and a run); the one
   GPU-only path, DoRA over int8 (peft's CPU branch drops the int8 scales), is a clear error on CPU.

Tolerances: the quantized and the oracle forward both multiply fp32 activations by the same fp32 weight
matrix (bitsandbytes' CPU 4-bit matmul dequantizes and calls ``F.linear``; its int8 training matmul
multiplies by SCB · (1/127) as the oracle does), so they agree to fp32 rounding: 1e-5 on O(1) logits.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
import yaml
from test_train_run import _recipe, _tiny_base
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import metalora as ml
from metalora.adapters import AdapterConfigError, adapter_layers
from metalora.adapters.merge import QuantizedBaseError
from metalora.adapters.quantized import base_quantization
from metalora.data import collate, load_tasks, task_id_map, tokenize_examples
from metalora.models import ModelNotAvailableError
from metalora.testing import randomize_adapter
from metalora.train import run
from metalora.train.config import RunConfigError
from metalora.train.runner import resolve_config

TOL = 1e-5
INT8_EVAL_TOL = 0.05
"""int8 inference (LLM.int8()) also rounds each activation row to int8: a relative error of at most
1/254 of the row's absmax per matmul, 14 matmuls deep here, so ≤ 14/254 ≈ 5.5% of the logits' scale in
the worst case (measured: ≤ 1.1%). Training forwards dequantize the weight and keep activations exact."""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora": ml.LoRAConfig(r=4, target_modules=TARGETS),
    "dora": ml.LoRAConfig(r=4, use_dora=True, target_modules=TARGETS),
    "mtl_lora": ml.MTLLoRAConfig(r=4, num_tasks=2, target_modules=TARGETS),
    "hydra_lora": ml.HydraLoRAConfig(r=4, target_modules=TARGETS),
    "r_lora": ml.RLoRAConfig(r=4, head_dropout=0.0, target_modules=TARGETS),
    "multilora": ml.MultiLoRAConfig(r=4, target_modules=TARGETS),
    "moelora": ml.MoELoRAConfig(r=4, num_tasks=2, num_experts=2, target_modules=TARGETS),
}
TOKENS = torch.tensor([[1, 5, 9, 13, 17, 21, 2], [1, 30, 7, 40, 11, 3, 2]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qlora") / "base"
    _tiny_base(path)
    return path


def _bnb_weight(module: torch.nn.Module) -> torch.Tensor:
    """The oracle's dense weight: bitsandbytes' dequantization of a Linear4bit / Linear8bitLt, by hand."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return module.weight.data.float() * (scales.unsqueeze(1) * (1.0 / 127.0))


def _wrapped(layer: torch.nn.Module) -> torch.nn.Module:
    """The base layer an adapter layer wraps (PEFT's or ours)."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer


def _dequantized_twin(quantized: torch.nn.Module, base: Path | str) -> torch.nn.Module:
    """The plain fp32 base with every quantized layer's weight replaced by its dequantization."""
    plain = ml.load_base(base)[0]
    swapped = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                plain.get_submodule(name).weight.copy_(_bnb_weight(module))
                swapped += 1
    assert (
        swapped == len(TARGETS) * plain.config.num_hidden_layers
    )  # every linear of every layer, not the head
    return plain


def _forward_backward(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of an eval forward (no grad: bitsandbytes' CPU repacking would trigger here), then of a
    training forward, and the adapter gradients of the training loss."""
    ids = ml.task_ids(model, [0, 1]) if ml.is_task_routed(model) else contextlib.nullcontext()
    with ids:
        model.eval()
        with torch.no_grad():
            evaluated = model(TOKENS).logits
        model.train()
        out = model(TOKENS, labels=TOKENS)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in ml.adapter_parameters(model).items()}
    return evaluated, out.logits.detach(), grads


def _assert_matches_twin(quantized: torch.nn.Module, twin: torch.nn.Module, eval_tol: float) -> None:
    """Training logits and adapter gradients within TOL, eval logits within ``eval_tol`` (relative to
    max(1, the largest logit or gradient)), and no gradient cut by the evaluation before."""
    evaluated, logits, grads = _forward_backward(quantized)
    want_eval, want_logits, want_grads = _forward_backward(twin)
    scale = max(1.0, float(want_logits.abs().max()))
    assert (logits - want_logits).abs().max() < TOL * scale
    assert (evaluated - want_eval).abs().max() < eval_tol * scale
    assert grads.keys() == want_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        want = want_grads[name]
        assert grad.abs().max() > 0, name
        assert (grad - want).abs().max() < TOL * max(1.0, float(want.abs().max())), name


CASES = [(k, q) for q in ("nf4", "int8") for k in ADAPTERS if (k, q) != ("dora", "int8")]


@pytest.mark.parametrize("kind, quantization", CASES)
def test_adapter_over_quantized_base_equals_dequantized_base(base_dir, kind, quantization):
    quantized = ml.load_base(base_dir, quantization=quantization)[0]
    assert base_quantization(quantized) == quantization
    twin = _dequantized_twin(quantized, base_dir)
    for model in (quantized, twin):
        ml.add_adapter(model, copy.deepcopy(ADAPTERS[kind]), seed=0)
        randomize_adapter(model, scale=0.3, seed=1)  # B ≠ 0, so every adapter term counts
    inner = _wrapped(quantized.model.layers[0].self_attn.q_proj)
    assert isinstance(inner, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    _assert_matches_twin(quantized, twin, TOL if quantization == "nf4" else INT8_EVAL_TOL)


def _nf4() -> BitsAndBytesConfig:
    """NF4 with double quantization, computing in fp32: what ``load_base(quantization="nf4")`` asks for."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )


@pytest.mark.slow
def test_mtl_lora_on_nf4_smollm2_equals_its_dequantized_base():
    """The real shapes (SmolLM2-135M, width 576, 30 layers): an eval forward would repack every layer on an
    AVX512-BF16 CPU without ``keep_trainable_layout``, and the training gradients would stop at the top."""
    quantized = ml.load_base("smollm2-135m", quantization="nf4")[0]
    twin = _dequantized_twin(quantized, "smollm2-135m")
    for model in (quantized, twin):
        ml.add_adapter(model, ml.MTLLoRAConfig(r=4, num_tasks=2), seed=0)
        randomize_adapter(model, scale=0.05, seed=1)
    _assert_matches_twin(quantized, twin, TOL)


def _peft_qlora(base_dir: Path, use_dora: bool) -> peft.PeftModel:
    """PEFT's own QLoRA path: transformers' NF4 load, ``prepare_model_for_kbit_training``, ``get_peft_model``."""
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=_nf4(), dtype=torch.float32, device_map={"": "cpu"}
    )
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, use_dora=use_dora, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_nf4_equals_peft_qlora(base_dir, use_dora):
    ours = ml.load_base(base_dir, quantization="nf4")[0]
    ml.add_adapter(ours, ml.LoRAConfig(r=4, alpha=16, use_dora=use_dora, target_modules=TARGETS), seed=0)
    randomize_adapter(ours, scale=0.3, seed=1)
    theirs = _peft_qlora(base_dir, use_dora)
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(ours.model.layers[0].self_attn.q_proj) is type(layer) is peft.tuners.lora.bnb.Linear4bit
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ml.adapter_parameters(ours).items():
            params["base_model.model." + name].copy_(p)
    for model in (ours, theirs):
        model.train()
        model(TOKENS, labels=TOKENS).loss.backward()
    ours_logits, theirs_logits = ours(TOKENS).logits, theirs(TOKENS).logits
    assert (ours_logits - theirs_logits).abs().max() < TOL
    for name, p in ml.adapter_parameters(ours).items():
        assert (p.grad - params["base_model.model." + name].grad).abs().max() < TOL, name


def _pool_batch(recipe: dict, tokenizer) -> dict:
    """Every training-pool sample of the recipe's tasks, tokenized and collated as the run does."""
    tasks = load_tasks(recipe["data"]["tasks"], seed=0)
    examples = [e for t in tasks for e in t.train]
    features, _ = tokenize_examples(examples, tokenizer, task_id_map(tasks), max_length=16)
    batch = collate(features, tokenizer.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_run_trains_and_exports_a_peft_adapter(tmp_path, quantization):
    from metalora.cli import main

    recipe = _recipe(tmp_path, "lora_mt")  # LoRA r=4 on q,k,v,o of a tiny Llama, three toy tasks
    run_dir = run(recipe, overrides=[f"quantization={quantization}", "train.max_steps=8"])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["quantization"] == quantization
    record = json.loads((run_dir / "adapter" / "metalora_adapter.json").read_text())
    assert record["base_quantization"] == quantization
    base, tok = ml.load_base(tmp_path / "base", quantization=quantization)
    batch = _pool_batch(recipe, tok)
    fresh = ml.add_adapter(ml.load_base(tmp_path / "base", quantization=quantization)[0], ml.LoRAConfig(r=4))
    trained = ml.load_adapter(base, run_dir / "adapter")  # the run's model: same quantized base, its adapter
    with torch.no_grad():
        before, after = fresh(**batch).loss, trained(**batch).loss
    assert after < before - 0.1, (before, after)  # measured: 3.80 -> 3.47 (nf4 and int8)

    # evaluation scores the adapter over the quantized base it was trained on
    from metalora.eval.targets import load_eval_target

    scored, _, kind = load_eval_target(run_dir)
    assert kind == "metalora" and base_quantization(scored) == quantization
    with torch.no_grad():
        assert (scored(TOKENS).logits - trained(TOKENS).logits).abs().max() < TOL

    assert main(["export", str(run_dir), "--peft", str(tmp_path / "peft")]) == 0
    quantized = ml.load_base(tmp_path / "base", quantization=quantization)[0]
    loaded = peft.PeftModel.from_pretrained(quantized, tmp_path / "peft")
    with torch.no_grad():
        assert (loaded(TOKENS).logits - trained(TOKENS).logits).abs().max() < TOL

    # the command's --merge loads the recorded base un-quantized and merges there: W + s·B·A
    assert main(["export", str(run_dir), "--merge", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    plain = ml.load_base(tmp_path / "base")[0]
    scaling = record["config"]["alpha"] / record["config"]["r"]
    for name in record["targets"]:
        a, b = (trained.get_submodule(f"{name}.lora_{x}.default").weight for x in "AB")
        want = plain.get_submodule(name).weight + scaling * b @ a
        assert (merged.get_submodule(name).weight - want).abs().max() < TOL, name


@pytest.mark.parametrize("algorithm", ["meta", "lora_st", "reweight"])
def test_every_algorithm_trains_over_nf4(tmp_path, algorithm):
    recipe = _recipe(tmp_path, "lora_mt" if algorithm == "reweight" else algorithm)
    if algorithm == "reweight":
        recipe.pop("multitask")
        recipe.update(algorithm="reweight", reweight={"batch_size": 10, "val_ratio": 10})
        recipe["data"]["val_task"] = recipe["data"]["tasks"][1]
    run_dir = run(recipe, overrides=["quantization=nf4"])
    out = run_dir / "tasks" / "task1" if algorithm == "lora_st" else run_dir
    assert json.loads((out / "counters.json").read_text())["optimizer_steps"] == 3
    record = json.loads((out / "adapter" / "metalora_adapter.json").read_text())
    assert record["base_quantization"] == "nf4"


def _hand_delta(model: torch.nn.Module, name: str, kind: str, scaling: float) -> torch.Tensor:
    """ΔW of one layer from its adapter tensors, by hand: LoRA s·B·A; MTL-LoRA (task 1) s·(Σ_i w_i B^i)Λ_1·A."""
    layer = model.get_submodule(name)
    if kind == "lora":
        return scaling * layer.lora_B.default.weight @ layer.lora_A.default.weight
    mix = torch.softmax(layer.lora_mix_logits[1] / layer.temperature, dim=0)
    up = sum(w * b for w, b in zip(mix, layer.lora_B, strict=True))
    return scaling * up @ layer.lora_lambda[1] @ layer.lora_A


@pytest.mark.parametrize("kind", ["lora", "mtl_lora"])
def test_merge_refuses_a_quantized_base_and_merges_into_the_dequantized_copy(base_dir, tmp_path, kind):
    model = ml.load_base(base_dir, quantization="nf4")[0]
    config = ADAPTERS[kind]
    ml.add_adapter(model, copy.deepcopy(config), seed=0)
    randomize_adapter(model, scale=0.3, seed=1)
    task = 1 if kind == "mtl_lora" else None
    with pytest.raises(QuantizedBaseError, match=r"quantized \(nf4.*Export the adapter.*dequantize=True"):
        ml.merge(model, task=task)
    merged = ml.merge(model, task=task, dequantize=True)
    assert (
        base_quantization(merged) is None and base_quantization(model) == "nf4"
    )  # the original is untouched
    for name in adapter_layers(model):
        want = _bnb_weight(_wrapped(model.get_submodule(name))) + _hand_delta(
            model, name, kind, config.alpha / config.r
        )
        got = merged.get_submodule(name)
        assert type(got) is torch.nn.Linear and (got.weight - want).abs().max() < TOL, name
    merged.save_pretrained(tmp_path / "merged")  # a plain model: no quantization record left
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = ml.task_ids(model, [1, 1]) if task is not None else contextlib.nullcontext()
    with torch.no_grad(), ids:
        unmerged = model(TOKENS).logits
    assert (reloaded(TOKENS).logits - unmerged).abs().max() < TOL  # merged == the adapter over W_deq


def test_dora_merge_into_the_dequantized_copy_keeps_the_outputs(base_dir):
    model = ml.load_base(base_dir, quantization="nf4")[0]
    ml.add_adapter(model, copy.deepcopy(ADAPTERS["dora"]), seed=0)
    randomize_adapter(model, scale=0.3, seed=1)
    merged = ml.merge(model, dequantize=True)
    with torch.no_grad():
        assert (merged(TOKENS).logits - model(TOKENS).logits).abs().max() < TOL


@pytest.mark.parametrize(
    "change, message",
    [
        (["quantization=fp4"], r"quantization='fp4': expected one of \['nf4', 'int8'\]"),
        (["quantization=4"], r"quantization=4: expected one of"),
        (["model.quantization=nf4"], "'model' is not a config section.*top-level key quantization"),
        (["quantization=nf4", "adapter={type: none}"], "quantization='nf4' with adapter.type=none"),
    ],
)
def test_bad_quantization_in_the_recipe_names_the_key(change, message):
    recipe = {"data": {"tasks": ["arc_easy"]}}
    with pytest.raises(RunConfigError, match=message):
        resolve_config(recipe, change)
    with pytest.raises(RunConfigError, match="got a mapping.*top-level key quantization"):
        resolve_config({**recipe, "model": {"name": "smollm2-135m", "quantization": "nf4"}})
    assert resolve_config(recipe, ["quantization=int8"])["quantization"] == "int8"
    assert resolve_config(recipe)["quantization"] is None


def test_load_base_and_add_adapter_refuse_what_cannot_work(base_dir, monkeypatch):
    with pytest.raises(ValueError, match=r"quantization='fp4': expected one of \['nf4', 'int8'\] or None"):
        ml.load_base(base_dir, quantization="fp4")
    with pytest.raises(ValueError, match="computes in float32, bfloat16 or float16"):
        ml.load_base(base_dir, dtype=torch.float64, quantization="nf4")
    int8 = ml.load_base(base_dir, quantization="int8")[0]
    with pytest.raises(AdapterConfigError, match="full fine-tuning .* int8-quantized"):
        ml.add_adapter(int8, ml.FullFinetuneConfig())
    # PEFT's DoRA loses the int8 scales on CPU after one forward: a GPU-only path, refused here
    with pytest.raises(AdapterConfigError, match="DoRA over an int8 base needs a GPU"):
        ml.add_adapter(int8, ml.LoRAConfig(r=4, use_dora=True))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotAvailableError, match=r"pip install 'metalora\[qlora\]'"):
        ml.load_base(base_dir, quantization="nf4")


def test_add_adapter_keeps_the_4bit_layout_trainable(base_dir):
    """A model quantized by transformers directly (not ``load_base``): ``add_adapter`` switches bitsandbytes'
    CPU repacking off, so an evaluation forward cannot cut the gradient (``adapters/quantized.py``)."""
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=_nf4(), dtype=torch.float32, device_map={"": "cpu"}
    )
    ml.add_adapter(model, ml.MultiLoRAConfig(r=4, target_modules=TARGETS), seed=0)
    randomize_adapter(model, scale=0.3, seed=1)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(TARGETS) and not any(m.support_avx512bf16_for_cpu for m in layers)
    _, _, grads = _forward_backward(model)
    assert grads and all(g.abs().max() > 0 for g in grads.values())


def test_bf16_nf4_base_is_prepared_for_kbit_training(base_dir):
    """The GPU setting (dtype bf16) on CPU: 4-bit layers compute in bf16, every other base parameter is fp32
    (PEFT's prepare_model_for_kbit_training), the adapter is fp32, and the loss is the fp32 one to bf16
    precision (bf16 keeps 8 bits of mantissa: ~0.4% per op, loosely 3% on the loss here)."""
    model = ml.load_base(base_dir, dtype="bfloat16", quantization="nf4")[0]
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)
    others = [p for n, p in model.named_parameters() if p.dtype != torch.uint8]
    assert others and all(p.dtype == torch.float32 and not p.requires_grad for p in others)
    ml.add_adapter(model, ml.MTLLoRAConfig(r=4, num_tasks=2), seed=0)
    assert all(p.dtype == torch.float32 for p in ml.adapter_parameters(model).values())
    reference = ml.add_adapter(
        ml.load_base(base_dir, quantization="nf4")[0], ml.MTLLoRAConfig(r=4, num_tasks=2), seed=0
    )
    for m in (model, reference):
        randomize_adapter(m, scale=0.3, seed=1)
        m.train()
    with ml.task_ids(model, [0, 1]), ml.task_ids(reference, [0, 1]):
        loss, want = model(TOKENS, labels=TOKENS).loss, reference(TOKENS, labels=TOKENS).loss.detach()
        loss.backward()
    assert abs(loss.detach() - want) < 0.03 * want
    assert all(
        torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in ml.adapter_parameters(model).values()
    )
