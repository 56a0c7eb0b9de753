"""lm-evaluation-harness interop: an adapter exported by ``ml.export_peft`` scores, through lm-eval's ``hf``
model with ``peft=`` on a local task written by ``write_lm_eval_task``, the same per-item log-likelihoods
and the same acc / acc_norm as ``metalora eval`` on the same items and prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (pip install 'metalora[dev]' or pip install lm-eval)"
)

from transformers import AutoTokenizer  # noqa: E402

import metalora as ml  # noqa: E402
from metalora.data import Task, TaskSpec, load_task  # noqa: E402
from metalora.eval.lm_eval_task import write_lm_eval_task  # noqa: E402
from metalora.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from metalora.eval.tasks import evaluate_tasks, mc_view, route_for  # noqa: E402
from metalora.testing import tiny_llama  # noqa: E402

TASKS = ["arc_easy", "boolq"]
N = 20


@pytest.fixture(scope="module")
def arc() -> Task:
    return load_task(TaskSpec(name="arc_easy"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    from metalora.models import convert_embedded

    return AutoTokenizer.from_pretrained(convert_embedded("smollm2-135m"))


def interop_llama(vocab_size: int) -> torch.nn.Module:
    """A random-init 2-layer Llama; a wide init spreads the option log-likelihoods (no near-ties)."""
    return tiny_llama(
        vocab_size=vocab_size, max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=True
    )


def metalora_lls(model, tokenizer, task: Task, shots: int) -> list[np.ndarray]:
    """Per-item option log-likelihoods as ``metalora eval`` computes them (``evaluate_tasks``'s
    MC path: ``mc_view`` items, the dev split as few-shot pool, routed to the task by name)."""
    with torch.no_grad():
        res = evaluate_multiple_choice(
            model,
            tokenizer,
            [mc_view(e) for e in task.test],
            fewshot_pool={task.name: [mc_view(e) for e in task.dev]},
            num_fewshot=shots,
            forward_context=route_for(model, task.name, "uniform"),
            progress=False,
        )
    return [np.array(p.loglikelihoods) for p in res.predictions]


def lm_eval_scores(
    base_dir, peft_dir, include: str, name: str
) -> tuple[dict[str, float], list[np.ndarray], list]:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={base_dir},peft={peft_dir},dtype=float32,device=cpu",
        tasks=[name],
        task_manager=TaskManager(include_path=include),
        batch_size=8,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    metrics = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in samples]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}, lls, samples


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 2])
def test_exported_peft_adapter_scores_the_same_in_lm_eval_and_metalora_eval(
    shots, arc, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = Task(arc.name, train=[], dev=arc.dev, test=arc.test[:N], meta=arc.meta)
    name = f"metalora_interop_{shots}shot"
    yaml_path = write_lm_eval_task(task.test, tmp_path / "tasks", name, fewshot=task.dev, num_fewshot=shots)

    model = interop_llama(len(tokenizer))
    base_dir, peft_dir = tmp_path / "base", tmp_path / "peft"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base_lls = metalora_lls(model, tokenizer, task, shots)

    model = ml.add_adapter(model, ml.MTLLoRAConfig(r=4, task_names=TASKS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random adapter values (B = 0 at init would make the adapter a no-op)
        for p in ml.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ml.export_peft(model, peft_dir, task="arc_easy")

    with torch.no_grad():
        ours = evaluate_tasks(model, tokenizer, [task], split="test", shots=shots, progress=False)[task.name]
    our_lls = metalora_lls(model, tokenizer, task, shots)
    theirs, their_lls, samples = lm_eval_scores(base_dir, peft_dir, str(yaml_path.parent), name)

    # lm-eval saw the same contexts and continuations (first item's request)
    view = mc_view(task.test[0])
    demos = "".join(f"{mc_view(s).prompt} {mc_view(s).options[s.answer]}\n\n" for s in task.dev[:shots])
    assert [tuple(a) for a in samples[0]["arguments"]] == [
        (demos + view.prompt, " " + o) for o in view.options
    ]
    assert len(samples) == N
    assert [len(x) for x in their_lls] == [len(x) for x in our_lls]

    ours_flat, theirs_flat = np.concatenate(our_lls), np.concatenate(their_lls)
    assert np.abs(ours_flat - np.concatenate(base_lls)).max() > 0.1, "the adapter should change the scores"
    diff = float(np.abs(ours_flat - theirs_flat).max())
    print(f"{shots}-shot: max |ΔLL| = {diff:.2e} (|LL| ≤ {np.abs(ours_flat).max():.1f}); "
          f"metalora {ours}; lm-eval {theirs}")  # fmt: skip
    # the README's bound; measured 1.5e-5 (0-shot) and 2.3e-5 (2-shot) at |LL| up to 130, where one fp32
    # rounding is 7.6e-6: the two tools sum the same fp32 log-probabilities in different orders
    assert diff < 5e-5
    for e, a, b in zip(task.test, our_lls, their_lls, strict=True):  # the same predictions on every item
        chars = np.array([len(o) for o in mc_view(e).options], dtype=float)
        assert a.argmax() == b.argmax() and (a / chars).argmax() == (b / chars).argmax()
    assert theirs["acc"] == pytest.approx(ours["acc"], abs=1e-12)
    assert theirs["acc_norm"] == pytest.approx(ours["acc_norm"], abs=1e-12)


def test_write_lm_eval_task_rejects_non_multiple_choice_and_bad_names(tmp_path):
    from metalora.data import Example

    gen = Example(prompt="2+2=", response=" 4", task="t", id="t/0")
    with pytest.raises(ValueError, match="has no options"):
        write_lm_eval_task([gen], tmp_path, "t")
    mc = Example(prompt="Q", response=" A. x", task="t", id="t/1", options=["x", "y"], answer=0)
    with pytest.raises(ValueError, match="task_name"):
        write_lm_eval_task([mc], tmp_path, "bad name")
    with pytest.raises(ValueError, match="needs that many fewshot"):
        write_lm_eval_task([mc], tmp_path, "t", fewshot=[mc], num_fewshot=2)
