"""``metalora.train.run``: recipes resolve with overrides and a whole run writes its directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_train_utils import adapter_state, max_abs_diff

import metalora as ml
from metalora.testing import tiny_llama, word_tokenizer
from metalora.train import run
from metalora.train.runner import RunConfigError, resolve_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["meta_lora", "lora_mt", "lora_st"])
def test_shipped_configs_resolve(name):
    cfg = resolve_config(CONFIGS / f"{name}.yaml", ["train.lr=3e-4", "data.tasks=[arc_easy,boolq]"])
    assert cfg["train"]["lr"] == 3e-4 and cfg["data"]["tasks"] == ["arc_easy", "boolq"]
    assert cfg["name"] == name


def test_meta_recipe_has_the_paper_defaults():
    cfg = resolve_config(CONFIGS / "meta_lora.yaml")
    paper = {
        "n_tasks": 2,
        "inner_steps": 3,
        "support_size": 8,
        "query_size": 8,
        "inner_lr": 5e-6,
        "sta": False,
    }
    assert {k: cfg["meta"][k] for k in paper} == paper
    assert cfg["train"]["lr"] == 2e-6 and cfg["adapter"]["r"] == 16
    assert cfg["adapter"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "lrr"),
        ("meta.k=3", "'k'"),
        ("algorithm=maml", "maml"),
        ("nope=1", "nope"),
        ("train.schedule=step", "schedule"),
    ],
)
def test_bad_recipes_raise_naming_the_key(override, message):
    with pytest.raises((RunConfigError, ValueError), match=message):
        resolve_config(CONFIGS / "meta_lora.yaml", [override])


def _tiny_base(path: Path) -> None:
    words = [f"w{i}" for i in range(40)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    fast = word_tokenizer(vocab, split="whitespace", **special)
    model = tiny_llama(vocab_size=len(vocab), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(path)
    fast.save_pretrained(path)


def _tasks(path: Path, rows_per_task: int = 80) -> list[dict]:
    specs = []
    for t in range(3):
        rows = [
            {"id": f"{t}-{i}", "q": f"w{t} w{i % 20} w{(i * 7) % 20}", "a": f"w{20 + (i + t) % 20}"}
            for i in range(rows_per_task)
        ]
        file = path / f"task{t}.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs.append(
            {
                "name": f"task{t}",
                "path": str(file),
                "prompt_field": "q",
                "response_field": "a",
                "id_field": "id",
            }
        )
    return specs


def _recipe(tmp_path: Path, algorithm: str) -> dict:
    _tiny_base(tmp_path / "base")
    return {
        "name": "r",
        "output_dir": str(tmp_path / "runs"),
        "algorithm": algorithm,
        "model": str(tmp_path / "base"),
        "adapter": {"type": "mtl_lora", "r": 4} if algorithm == "meta" else {"type": "lora", "r": 4},
        "data": {"tasks": _tasks(tmp_path), "examples_per_task": 20, "max_length": 16},
        "meta": {"support_size": 4, "query_size": 4, "inner_lr": 1e-2},
        "multitask": {"batch_size": 10},
        "train": {"max_steps": 3, "lr": 1e-2, "progress": False},
    }


@pytest.mark.parametrize("algorithm", ["meta", "lora_mt", "lora_st"])
def test_run_writes_the_run_directory_and_resumes(tmp_path, algorithm):
    run_dir = run(_recipe(tmp_path, algorithm), overrides=["train.seed=1"])
    assert run_dir == tmp_path / "runs" / "r"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["seed"] == 1 and resolved["algorithm"] == algorithm
    data = json.loads((run_dir / "data.json").read_text())
    assert data["task_to_id"] == {"task0": 0, "task1": 1, "task2": 2}
    assert data["train_examples"] == {"task0": 20, "task1": 20, "task2": 20}
    out = run_dir / "tasks" / "task1" if algorithm == "lora_st" else run_dir
    counters = json.loads((out / "counters.json").read_text())
    samples = {"meta": 3 * 2 * (3 * 4 + 4), "lora_mt": 3 * 10, "lora_st": 3 * 10}[algorithm]
    assert (counters["optimizer_steps"], counters["samples"]) == (3, samples)
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoints" / "latest").is_file()
    adapted = ml.load_adapter(ml.load_base(tmp_path / "base")[0], out / "adapter")
    assert max_abs_diff(adapter_state(adapted), adapter_state(_fresh(tmp_path, algorithm))) > 0
    # the same recipe into the same directory resumes the finished run: nothing changes
    run(_recipe(tmp_path, algorithm), overrides=["train.seed=1"])
    again = ml.load_adapter(ml.load_base(tmp_path / "base")[0], out / "adapter")
    assert max_abs_diff(adapter_state(adapted), adapter_state(again)) == 0.0


def _fresh(tmp_path: Path, algorithm: str):
    cfg = ml.MTLLoRAConfig(r=4, num_tasks=3) if algorithm == "meta" else ml.LoRAConfig(r=4)
    return ml.add_adapter(ml.load_base(tmp_path / "base")[0], cfg)


def test_few_shot_protocol_sets_the_epochs(tmp_path):
    recipe = _recipe(tmp_path, "lora_mt")
    recipe["multitask"] = {"batch_size": 50, "protocol": "few_shot"}
    run_dir = run(recipe, overrides=["data.examples_per_task=50"])
    counters = json.loads((run_dir / "counters.json").read_text())
    assert counters["optimizer_steps"] == 5 * 3 * 50 // 50  # 5 epochs over 3 tasks x 50 examples
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["multitask"]["epochs"] == 5
    with pytest.raises(RunConfigError, match="examples_per_task"):
        run(recipe, overrides=["data.examples_per_task=null", "name=bad"])


def test_reweight_recipe_runs_end_to_end(tmp_path):
    recipe = _recipe(tmp_path, "lora_mt")
    recipe.pop("multitask")
    recipe.update(algorithm="reweight", reweight={"batch_size": 10, "val_ratio": 10})
    recipe["data"]["val_task"] = recipe["data"]["tasks"][1]
    run_dir = run(recipe)
    counters = json.loads((run_dir / "counters.json").read_text())
    weights = [json.loads(line) for line in (run_dir / "weights.jsonl").read_text().splitlines()]
    assert [(r["case"], r["skipped"]) for r in weights] == [("no_signal", False)] + [("eq8", False)] * 2
    # every forward/backward counts: 10 training + min(10, M) validation samples per step, where the
    # validation set holds M = N / val_ratio = 60 / 10 = 6 examples
    assert (counters["optimizer_steps"], counters["samples"]) == (3, 3 * (10 + 6))
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["reweight"]["val_ratio"] == 10 and resolved["data"]["val_task"]["name"] == "task1"
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()
    # the run records which examples formed the validation set: 6 of task1's dev split, no test item
    from metalora.data import load_task

    val_ids = json.loads((run_dir / "data.json").read_text())["validation_ids"]
    task1 = load_task(recipe["data"]["val_task"], seed=0)
    assert len(set(val_ids)) == 6 and set(val_ids) <= {e.id for e in task1.dev}
    assert not set(val_ids) & {e.id for e in task1.test}
    with pytest.raises(RunConfigError, match="needs data.val_task"):
        resolve_config({**recipe, "data": {**recipe["data"], "val_task": None}})


def test_lora_st_run_is_evaluated_and_exported_per_task(tmp_path, capsys):
    """``metalora eval RUN`` on a LoRA-ST run scores each of the run's own tasks (default ``--tasks``) with
    that task's adapter; ``export --task`` writes that task's adapter as PEFT LoRA."""
    import peft

    from metalora.cli import main
    from metalora.data import load_task
    from metalora.eval.tasks import evaluate_tasks

    recipe = _recipe(tmp_path, "lora_st")
    recipe["train"]["max_steps"] = 2
    run_dir = run(recipe)
    assert main(["eval", str(run_dir), "--limit", "3", "--out", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())
    assert got["kind"] == "metalora_st" and list(got["after"]) == ["task0", "task1", "task2"]
    base, tok = ml.load_base(tmp_path / "base")
    for spec in recipe["data"]["tasks"]:  # oracle: each task evaluated by hand with its own adapter
        task = load_task(spec, seed=0)
        own = ml.load_adapter(ml.load_base(tmp_path / "base")[0], run_dir / "tasks" / task.name / "adapter")
        with torch.no_grad():
            expected = evaluate_tasks(own, tok, [task], limit=3, progress=False)[task.name]
            plain = evaluate_tasks(base, tok, [task], limit=3, progress=False)[task.name]
        assert got["after"][task.name] == expected and got["base"][task.name] == plain

    # --tasks names one of the run's own (file) tasks: its spec and the run's split seed are used
    assert (
        main(["eval", str(run_dir), "--tasks", "task2", "--limit", "3", "--out", str(tmp_path / "t2.json")])
        == 0
    )
    assert json.loads((tmp_path / "t2.json").read_text())["after"] == {"task2": got["after"]["task2"]}
    assert main(["export", str(run_dir), "--peft", str(tmp_path / "nope")]) == 2
    assert (
        "is a LoRA-ST run with one adapter per task (task0, task1, task2): pass --task"
        in capsys.readouterr().err
    )
    assert main(["export", str(run_dir), "--task", "task1", "--peft", str(tmp_path / "peft1")]) == 0
    own = ml.load_adapter(ml.load_base(tmp_path / "base")[0], run_dir / "tasks" / "task1" / "adapter").eval()
    reloaded = peft.PeftModel.from_pretrained(
        ml.load_base(tmp_path / "base")[0], str(tmp_path / "peft1")
    ).eval()
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, own(ids).logits, atol=1e-5)
