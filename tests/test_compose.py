"""``metalora compose`` (LoRAHub) against hand computations: the composed adapter's logits equal the weighted
sums applied by hand in float64, the objective equals a hand loss plus the L1 term, the search returns the
best candidate it saw (never worse than w = 0), the export loads in PEFT with the same logits, bad libraries
are clear errors, and the command runs end to end on the embedded SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import metalora as ml
from metalora.cli import main
from metalora.compose import (
    ComposedLoRA,
    LibraryError,
    LoRAHubConfig,
    compose,
    few_shot_batches,
    load_library,
    objective_value,
    response_loss,
    write_composition,
)
from metalora.data import Example, few_shot_pool, load_task
from metalora.rundir import RunDir
from metalora.testing import randomize_adapter, tiny_llama, word_tokenizer
from metalora.train import run

WORDS = [f"w{i}" for i in range(40)]
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TARGETS = ["q_proj", "v_proj"]
WEIGHTS = [0.7, -1.2, 0.4]


def tokenizer():
    return word_tokenizer(VOCAB, split="whitespace", **SPECIAL)


def base(dtype: torch.dtype = torch.float64):
    return tiny_llama(
        vocab_size=len(VOCAB),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype=dtype,
        initializer_range=0.2,
    )


def adapter_model(seed: int, r: int = 4, alpha: float = 8.0, targets=TARGETS, **lora):
    model = ml.add_adapter(base(), ml.LoRAConfig(r=r, alpha=alpha, target_modules=list(targets), **lora))
    randomize_adapter(model, scale=0.5, seed=seed)
    return model


def peft_library(tmp_path: Path, n: int = 3, **kwargs) -> list[Path]:
    paths = [tmp_path / f"lib{j}" for j in range(n)]
    for j, path in enumerate(paths):
        ml.export_peft(adapter_model(10 + j, **kwargs), path)
    return paths


def examples(n: int = 4) -> list[Example]:
    return [
        Example(
            prompt=f"w{i} w{i + 1} w{i + 3}", response=f" w{i + 7} w{(3 * i) % 40}", task="new", id=str(i)
        )
        for i in range(n)
    ]


def hand_composed(library, weights, dtype=torch.float64):
    """The base with W += (alpha / r) (Σ w_j B_j)(Σ w_j A_j) on every module, in float64 by hand."""
    model, ref = base(dtype), library[0]
    with torch.no_grad():
        for module in ref.factors:
            a = sum(w * lib.factors[module][0].double() for w, lib in zip(weights, library, strict=True))
            b = sum(w * lib.factors[module][1].double() for w, lib in zip(weights, library, strict=True))
            model.get_submodule(module).weight += (ref.lora_alpha / ref.r) * (b @ a)
    return model


def hand_loss(model, items) -> float:
    """Mean -log p(response token) over every response token (and EOS), one example at a time."""
    tok, total, count = tokenizer(), 0.0, 0
    for ex in items:
        prompt = tok(ex.prompt)["input_ids"]
        response = tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for i, token in enumerate(response):
            total -= float(logp[len(prompt) + i - 1, token])
            count += 1
    return total / count


IDS = torch.tensor([[1, 5, 9, 12, 30, 7, 22], [1, 14, 6, 8, 40, 41, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# (1) the composition: A = Σ w_j A_j and B = Σ w_j B_j, applied by hand --------------------------------


def test_composed_logits_equal_the_weighted_sums_applied_by_hand(tmp_path):
    library = load_library(peft_library(tmp_path))
    composed = ComposedLoRA(base(), library)
    composed.set_weights(WEIGHTS)
    expected = logits(hand_composed(library, WEIGHTS))
    assert torch.allclose(logits(composed.model), expected, atol=1e-10, rtol=0)
    # the product of sums, not the sum of products Σ w_j B_j A_j (which the oracle would not match)
    model, ref = base(), library[0]
    with torch.no_grad():
        for module in ref.factors:
            for w, lib in zip(WEIGHTS, library, strict=True):
                model.get_submodule(module).weight += (
                    2.0 * w * lib.factors[module][1] @ lib.factors[module][0]
                )
    assert (logits(model) - expected).abs().max() > 1e-3


def test_one_hot_weights_reproduce_each_metalora_source(tmp_path):
    """LoRA-ST task adapters and an MTL-LoRA adapter's tasks: w = e_j gives adapter j's own logits."""
    run = RunDir(tmp_path / "st")
    singles = [adapter_model(20 + j) for j in range(2)]
    for j, model in enumerate(singles):
        ml.save_adapter(model, run.task(f"t{j}").adapter)
    names = ["x", "y"]
    mtl = ml.add_adapter(base(), ml.MTLLoRAConfig(r=4, alpha=8, task_names=names, target_modules=TARGETS))
    randomize_adapter(mtl, scale=0.5, seed=3)
    mtl_dir = tmp_path / "mtl" / "adapter"
    ml.save_adapter(mtl, mtl_dir)
    base_dir = tmp_path / "base"
    base().save_pretrained(base_dir)  # the MTL-LoRA adapter is loaded onto it to export each task
    tokenizer().save_pretrained(base_dir)
    library = load_library([run.root, mtl_dir], base=str(base_dir))
    assert [a.name for a in library] == ["t0", "t1", "x", "y"]
    composed = ComposedLoRA(base(), library)
    for j, model in enumerate(singles):
        composed.set_weights(np.eye(4)[j])
        assert torch.allclose(logits(composed.model), logits(model), atol=1e-10, rtol=0)
    for j, task in enumerate(names):
        composed.set_weights(np.eye(4)[2 + j])
        with torch.no_grad(), ml.task_ids(mtl, [task] * IDS.shape[0]):
            expected = mtl(input_ids=IDS).logits
        # each task's LoRA is formed on a base loaded in float32 (load_base's default): float32 factors
        assert torch.allclose(logits(composed.model), expected, atol=1e-5, rtol=0)


# (2) the objective and (3) the search -----------------------------------------------------------------


@pytest.mark.parametrize("objective", ["paper", "lorahub_code"])
def test_objective_is_the_hand_loss_plus_the_l1_term(tmp_path, objective):
    library = load_library(peft_library(tmp_path))
    items = examples()
    config = LoRAHubConfig(budget=4, objective=objective, batch_size=3)  # two batches: the loss is pooled
    _, result = compose(base(), library, few_shot_batches(items, tokenizer(), 3), config)
    for step in result.history:
        loss = hand_loss(hand_composed(library, step.weights), items)
        assert step.loss == pytest.approx(loss, abs=1e-10)
        absolute = np.abs(step.weights)
        expected = loss + 0.05 * absolute.sum() if objective == "paper" else loss / 4 + 0.05 * absolute.mean()
        assert step.objective == pytest.approx(expected, abs=1e-10)
        assert objective_value(step.loss, step.weights, 4, config) == step.objective


def test_search_returns_the_best_candidate_it_saw_from_w0(tmp_path):
    library = load_library(peft_library(tmp_path))
    batches = few_shot_batches(examples(), tokenizer())
    composed, result = compose(base(), library, batches, LoRAHubConfig(budget=12, seed=3))
    objectives = [s.objective for s in result.history]
    assert len(result.history) == 12 and result.history[0].weights == [0.0, 0.0, 0.0]
    assert result.history[0].loss == pytest.approx(hand_loss(base(), examples()), abs=1e-10)
    assert result.best_step == int(np.argmin(objectives)) and result.best.objective == min(objectives)
    assert result.best.objective <= result.history[0].objective
    assert all(abs(w) <= 1.5 for s in result.history for w in s.weights)
    assert response_loss(composed.model, batches) == pytest.approx(
        result.best.loss, abs=1e-12
    )  # left in place
    _, again = compose(base(), library, batches, LoRAHubConfig(budget=12, seed=3))
    assert [s.weights for s in again.history] == [s.weights for s in result.history]  # seeded


# (4) the export ---------------------------------------------------------------------------------------


def test_export_loads_in_peft_with_the_composed_logits(tmp_path):
    library = load_library(peft_library(tmp_path))
    composed, result = compose(
        base(), library, few_shot_batches(examples(), tokenizer()), LoRAHubConfig(budget=6)
    )
    out = write_composition(composed, result, library, tmp_path / "out", {"task": "new"})
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "compose.json",
        "compose.md",
    ]
    loaded = PeftModel.from_pretrained(base(), str(out)).eval()
    assert torch.allclose(logits(loaded), logits(composed.model), atol=1e-12, rtol=0)
    assert torch.allclose(
        logits(loaded), logits(hand_composed(library, result.best.weights)), atol=1e-10, rtol=0
    )
    record = json.loads((out / "compose.json").read_text())
    assert record["weights"] == dict(zip(["lib0", "lib1", "lib2"], result.best.weights, strict=True))
    assert len(record["history"]) == 6 and record["best"]["step"] == result.best_step
    assert record["base_loss"] == result.history[0].loss
    assert "| lib1 |" in (out / "compose.md").read_text()


# (5) bad libraries ------------------------------------------------------------------------------------


def _peft(tmp_path: Path, name: str, seed: int = 30, **kwargs) -> Path:
    ml.export_peft(adapter_model(seed, **kwargs), tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 2}, r"library adapter 'bad' .* rank r=2, adapter 'good' r=4.*same rank"),
        ({"targets": ["q_proj", "k_proj"]}, r"'bad' .* targets \['model.layers.0.self_attn.k_proj'.*lacks"),
        ({"alpha": 4.0}, r"'bad' .* lora_alpha=4, adapter 'good' 8"),
        ({"use_dora": True}, r"bad: uses DoRA"),
    ],
)
def test_mismatched_adapters_are_named(tmp_path, kwargs, message):
    good, bad = _peft(tmp_path, "good"), _peft(tmp_path, "bad", **kwargs)
    with pytest.raises(LibraryError, match=message):
        load_library([good, bad])


def test_missing_or_damaged_files_are_clear(tmp_path):
    good = _peft(tmp_path, "good")
    with pytest.raises(LibraryError, match=r"library adapter .*nowhere not found"):
        load_library([good, tmp_path / "nowhere"])
    broken = _peft(tmp_path, "broken")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(LibraryError, match=r"broken: adapter_model.safetensors not found"):
        load_library([good, broken])
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LibraryError, match=r"not a readable safetensors file"):
        load_library([broken])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LibraryError, match=r"neither a PEFT LoRA directory"):
        load_library([tmp_path / "empty"])
    with pytest.raises(LibraryError, match=r"lists the same adapter more than once"):
        load_library([good, good])
    ml.save_adapter(ml.add_adapter(base(), ml.MultiLoRAConfig(r=2, num_parallel=3)), tmp_path / "multi")
    with pytest.raises(LibraryError, match=r"multi: a multilora adapter holds no LoRA to compose"):
        load_library([tmp_path / "multi"])
    wide = tiny_llama(vocab_size=len(VOCAB), hidden_size=48)
    with pytest.raises(
        LibraryError, match=r"'good': module 'model.layers.0.self_attn.q_proj' is \(in, out\)"
    ):
        ComposedLoRA(wide, load_library([good]))


# (6) the command --------------------------------------------------------------------------------------


def _task_file(tmp_path: Path) -> Path:
    rows = [{"id": str(i), "q": f"w{i % 9} w{i % 5} w3", "a": f"w{20 + i % 4}"} for i in range(30)]
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "new", "path": str(data), "prompt_field": "q", "response_field": "a", "id_field": "id"}
    (tmp_path / "new.json").write_text(json.dumps(spec))
    return tmp_path / "new.json"


def test_cli_composes_on_a_tiny_base_and_errors_are_one_line(tmp_path, capsys):
    base_dir = tmp_path / "base"
    base(torch.float32).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    library = []
    for j in range(2):
        model, _ = ml.load_base(base_dir)
        ml.add_adapter(model, ml.LoRAConfig(r=2, alpha=4, target_modules=TARGETS))
        randomize_adapter(model, scale=0.5, seed=j)
        library.append(str(ml.export_peft(model, tmp_path / f"peft{j}")))
    spec, out = _task_file(tmp_path), tmp_path / "out"
    args = ["compose", *library, "--task", str(spec), "--k", "3", "--budget", "5", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "compose.json").read_text())
    assert record["task"] == "new" and record["model"] == str(base_dir) and len(record["example_ids"]) == 3
    assert len(record["history"]) == 5 and set(record["weights"]) == {"peft0", "peft1"}
    assert "PEFT LoRA adapter written to" in capsys.readouterr().out
    ml.export_peft(
        ml.add_adapter(ml.load_base(base_dir)[0], ml.LoRAConfig(r=4, target_modules=TARGETS)), tmp_path / "r4"
    )
    capsys.readouterr()
    bad = [
        ([*args, "--k", "99"], "its train split has 24 examples, fewer than --k 99"),
        ([*args, "--budget", "0"], "budget=0"),
        (
            ["compose", str(tmp_path / "r4"), *args[1:]],
            "'peft0' (" + library[0] + ") has rank r=2, adapter 'r4' r=4",
        ),
        ([*args[:3], str(tmp_path / "nowhere"), *args[3:]], "nowhere not found"),
    ]
    for argv, message in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_compose_runs_end_to_end_on_smollm2(tmp_path):
    """Two LoRA-ST adapters of SmolLM2 (one step each), composed for a third task from 3 examples; the
    PEFT export reproduces the recorded best loss."""
    recipe = {
        "name": "st",
        "output_dir": str(tmp_path),
        "algorithm": "lora_st",
        "model": "smollm2-135m",
        "adapter": {"type": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"tasks": ["sst2", "rte"], "examples_per_task": 4, "max_length": 48},
        "multitask": {"batch_size": 2},
        "train": {"max_steps": 1, "lr": 1e-3, "progress": False},
    }
    run_dir = run(recipe)
    out = tmp_path / "composed"
    args = ["compose", str(run_dir), "--task", "boolq", "--k", "3", "--budget", "4", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "compose.json").read_text())
    assert set(record["weights"]) == {"sst2", "rte"} and record["model"] == "smollm2-135m"
    assert record["max_length"] == 48 and record["template"] == "plain"  # the run's data settings
    model, tok = ml.load_base("smollm2-135m")
    loaded = PeftModel.from_pretrained(model, str(out)).eval()
    task = load_task("boolq", seed=0)
    items = few_shot_pool(task.train, 3, 0, "boolq")
    assert [ex.id for ex in items] == record["example_ids"]
    loss = response_loss(loaded, few_shot_batches(items, tok, max_length=48))
    assert loss == pytest.approx(record["best"]["loss"], abs=1e-5)


# the authors' package --------------------------------------------------------------------------------


@pytest.mark.optional
def test_matches_the_authors_lorahub_package(tmp_path, monkeypatch):
    """``lorahub==0.1.0``'s ``lorahub_learning`` on the same PEFT adapters, examples and budget. As published
    it refuses a causal LM (``AutoModelForSeq2SeqLM``), and its cache of the last adapter aliases the live
    LoRA tensors, so each composition reads the previous one in that adapter's place. With those two parts
    substituted (a causal-LM class; a copying state-dict getter) and our loss as its ``get_loss`` hook
    (divided by k, as its default is), it visits the same weights with the same losses as
    ``objective="lorahub_code"``, recommends the same weights, and its merged model has our logits."""
    algorithm = pytest.importorskip("lorahub.algorithm", reason="needs lorahub==0.1.0 importable")

    base_dir = tmp_path / "base"
    base().save_pretrained(base_dir)  # float64, loaded as float64 by both sides
    tokenizer().save_pretrained(base_dir)
    paths = []
    for j in range(3):
        model = ml.add_adapter(ml.load_base(base_dir, dtype=torch.float64)[0], ml.LoRAConfig(r=4, alpha=8))
        randomize_adapter(model, scale=0.5, seed=j)
        paths.append(str(ml.export_peft(model, tmp_path / f"lib{j}")))
    items = examples(5)
    prompts, responses = [ex.prompt for ex in items], [ex.response for ex in items]
    with pytest.raises(ValueError, match="Unrecognized configuration class .*AutoModelForSeq2SeqLM"):
        algorithm.lorahub_learning(paths, prompts, responses, max_inference_step=2)
    monkeypatch.setattr(algorithm, "AutoModelForSeq2SeqLM", AutoModelForCausalLM)
    peft_model, tok, cache = algorithm.load_base_model_and_lora_modules(paths)
    live = {p.data_ptr() for name, p in peft_model.named_parameters() if "lora_" in name}
    assert all(t.data_ptr() in live for t in cache[paths[-1]].values())
    assert not any(t.data_ptr() in live for t in cache[paths[0]].values())
    state_dict = algorithm.get_peft_model_state_dict
    monkeypatch.setattr(
        algorithm, "get_peft_model_state_dict", lambda m: {k: v.clone() for k, v in state_dict(m).items()}
    )
    batches, losses = few_shot_batches(items, tok), []

    def get_loss(dataset, model, batch_size):
        losses.append(response_loss(model, batches))
        return losses[-1] / len(dataset["input"])

    theirs, merged, _ = algorithm.lorahub_learning(
        paths, prompts, responses, max_inference_step=15, get_loss=get_loss, seed=0
    )
    config = LoRAHubConfig(budget=15, objective="lorahub_code")
    model = ml.load_base(base_dir, dtype=torch.float64)[0]
    composed, result = compose(model, load_library(paths), batches, config)
    assert [s.loss for s in result.history] == pytest.approx(losses, abs=1e-12)
    assert result.recommendation == pytest.approx(list(theirs), abs=1e-12)
    composed.set_weights(theirs)
    assert torch.allclose(logits(merged), logits(composed.model), atol=1e-10, rtol=0)
