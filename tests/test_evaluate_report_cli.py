"""``metalora eval`` task routing, the run report, and the CLI's error messages."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_eval_lm import model, reference_loglikelihood, tok  # noqa: F401

import metalora as ml
from metalora.adapters import adapter_parameters
from metalora.cli import main
from metalora.data import Example, Task
from metalora.eval.tasks import evaluate_tasks, mc_view
from metalora.report import write_report


def _task(name: str, rows: list[tuple[str, list[str], int]]) -> Task:
    examples = [Example(p, "", name, f"{name}/{i}", opts, ans) for i, (p, opts, ans) in enumerate(rows)]
    return Task(name, train=[], dev=[], test=examples, meta={"kind": "mc"})


TASKS = [
    _task(
        "colors",
        [
            ("Question: what color is the sky?\nAnswer:", ["blue", "green", "red"], 0),
            ("Question: the cat sat on the\nAnswer:", ["mat", "dog", "ball"], 0),
        ],
    ),
    _task(
        "geo",
        [("Capital of France?", ["Paris", "Rome", "Lima"], 0), ("Capital of Italy?", ["Rome", "Paris"], 1)],
    ),
]


@pytest.fixture(scope="module")
def routed(model):  # noqa: F811
    m = ml.add_adapter(copy.deepcopy(model), ml.MTLLoRAConfig(r=4, task_names=["colors", "geo"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(m).values():
            p.copy_(torch.randn_like(p) * 0.5)
    return m.eval()


def _reference_lls(model, tok, example, task):  # noqa: F811
    view = mc_view(example)
    with ml.task_ids(model, [task]):
        return np.array([reference_loglikelihood(model, tok, view.prompt, " " + o)[0] for o in view.options])


def test_each_task_is_evaluated_with_its_own_task_id(routed, tok, monkeypatch):  # noqa: F811
    """Oracle: every item's option log-likelihoods (captured from the MC scorer ``evaluate_tasks`` calls)
    equal a one-item reference run inside ``task_ids(model, [its task])``, and differ from the reference
    under the other task, so an item routed to the wrong task cannot match; acc follows from them.

    Shown to fail when every item is routed to the same task (planted: ``route_for`` sending all rows to
    "geo", the adapter's last task): the old accuracy-only check passed, this one failed on the "colors"
    items; routed to the first task instead, both failed."""
    import metalora.eval.tasks as eval_tasks

    scored: dict[str, list[float]] = {}
    scorer = eval_tasks.evaluate_multiple_choice

    def recording(*args, **kwargs):
        result = scorer(*args, **kwargs)
        scored.update({p.id: p.loglikelihoods for p in result.predictions})
        return result

    monkeypatch.setattr(eval_tasks, "evaluate_multiple_choice", recording)
    got = evaluate_tasks(routed, tok, TASKS, shots=0, progress=False)
    for task in TASKS:
        other = next(t.name for t in TASKS if t.name != task.name)
        for ex in task.test:
            own = _reference_lls(routed, tok, ex, task.name)
            np.testing.assert_allclose(scored[ex.id], own, atol=1e-4, rtol=0)
            assert np.abs(own - _reference_lls(routed, tok, ex, other)).max() > 1e-2
        preds = [int(np.argmax(scored[ex.id])) for ex in task.test]
        expected = np.mean([p == ex.answer for p, ex in zip(preds, task.test, strict=True)])
        assert got[task.name]["acc"] == pytest.approx(expected)
        assert got[task.name]["n"] == len(task.test)


def test_unseen_task_uniform_averages_log_likelihoods_over_task_ids(routed, tok):  # noqa: F811
    unseen = _task(
        "unseen",
        [
            ("Capital of France?", ["Paris", "Rome", "Lima"], 0),
            ("Question: what color is grass?\nAnswer:", ["blue", "green"], 1),
            ("2 + 3 =", ["5", "six", "7"], 0),
        ],
    )
    got = evaluate_tasks(routed, tok, [unseen], shots=0, unseen_task="uniform", progress=False)
    correct = 0
    for ex in unseen.test:
        mean_ll = np.mean([_reference_lls(routed, tok, ex, t) for t in ("colors", "geo")], axis=0)
        correct += int(np.argmax(mean_ll) == ex.answer)
    assert got["unseen"]["acc"] == pytest.approx(correct / 3)
    # a chosen id routes everything to that task
    chosen = evaluate_tasks(routed, tok, [unseen], shots=0, unseen_task="geo", progress=False)
    preds = [int(np.argmax(_reference_lls(routed, tok, ex, "geo"))) for ex in unseen.test]
    assert chosen["unseen"]["acc"] == pytest.approx(
        np.mean([p == ex.answer for p, ex in zip(preds, unseen.test, strict=True)])
    )


def test_report_has_tables_and_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": s, "loss": 2.0 - 0.1 * s, "loss/boolq": 2.1 - 0.1 * s, "loss/piqa": 1.9 - 0.1 * s}
        for s in range(1, 6)
    ]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"event": "resumed", "step": 3}\n'
    )
    (run / "counters.json").write_text(
        json.dumps(
            {"status": "completed", "optimizer_steps": 5, "samples": 320, "peak_memory_bytes": 3 * 2**30}
        )
    )
    (run / "eval.json").write_text(
        json.dumps(
            {
                "after": {"boolq": {"acc": 0.75, "acc_norm": 0.7, "n": 4}},
                "base": {"boolq": {"acc": 0.5, "acc_norm": 0.5, "n": 4}},
            }
        )
    )
    report = write_report(run).read_text()
    assert "| boolq | 4 | acc | 0.500 | 0.750 | +0.250 |" in report
    assert "| optimizer_steps | 5 |" in report and "| samples | 320 |" in report and "3.0 GiB" in report
    for png in ("loss.png", "accuracy.png"):
        assert f"plots/{png}" in report
        assert (run / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "nowhere.yaml"], "config file nowhere.yaml not found"),
        (["train", "{cfg}", "bogus=1"], "override 'bogus=1': unknown key 'bogus'; known: ['adapter'"),
        (["train", "{cfg}", "train.lr=-1"], "train.lr=-1"),
        (["train", "{cfg}", "algorithm=maml"], "algorithm='maml': expected one of"),
        (
            ["train", "{cfg}", "adapter.type=qlora"],
            "adapter.type='qlora': expected one of ['hydra_lora', 'lora'",
        ),
        (["export", "nowhere", "--peft", "x"], "neither a metalora adapter directory nor a run directory"),
        (["eval", "nowhere"], "--tasks is required: nowhere is not a run directory with a config.yaml"),
        (["eval", "smollm2-135m", "--tasks", "arc_easy,gone.yaml"], "task spec file gone.yaml not found"),
        (
            ["select", "bm25", "--candidates", "no.jsonl", "--target", "no.jsonl", "--out", "o.jsonl"],
            "file not found: no.jsonl",
        ),
    ],
)
def test_cli_errors_name_the_problem(args, message, tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("data:\n  tasks: [arc_easy]\ntrain:\n  max_steps: 1\n")
    argv = [a.replace("{cfg}", str(cfg)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_binary_metrics_match_sklearn():
    from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

    from metalora.eval.tasks import MCView, binary_metrics

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 40).tolist()
    lls = [rng.normal(size=2) + (0.8 if g else -0.8) * np.array([-1, 1]) for g in gold]
    views = [MCView("p", ["no", "yes"], g, "t", str(i)) for i, g in enumerate(gold)]
    got = binary_metrics(views, lls)
    margin = [ll[1] - ll[0] for ll in lls]
    pred = [int(m > 0) for m in margin]
    assert got["f1"] == pytest.approx(f1_score(gold, pred))
    assert got["mcc"] == pytest.approx(matthews_corrcoef(gold, pred))
    assert got["auc_roc"] == pytest.approx(roc_auc_score(gold, margin))
    assert binary_metrics(views[:1] + [MCView("p", ["a", "b", "c"], 0, "t", "x")], lls[:2]) == {}
