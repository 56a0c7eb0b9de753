"""Task separability of the adapted representations: MTL-LoRA's Table 6 / Fig. 1 at our scale (issue 19).

    python benchmarks/separability.py base=smollm2-135m lora_mt=RUN_DIR mtl_lora=RUN_DIR [--per-task 50]
    python benchmarks/separability.py --markdown

For each model, every test item's prompt (the first run's ``data.tasks`` and ``data.seed``; ``--per-task``
items of each task) is run once and the output of the last decoder block's ``o_proj`` (adapter included) is
averaged over the prompt's tokens: one vector per item. A task-routed adapter (MTL-LoRA) runs with each
item's own task id, as it is served. Separability is the 5-fold cross-validated accuracy of a linear
classifier (scikit-learn's multinomial logistic regression on standardised features) predicting the task
from the vector, beside the majority-class rate; the same vectors go through t-SNE (scikit-learn) into
``results/separability_tsne.png``. Stored in ``results/separability.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, measure_or_print  # noqa: E402

from metalora.adapters import is_task_routed, task_ids  # noqa: E402
from metalora.data import load_task  # noqa: E402
from metalora.eval.targets import load_eval_target  # noqa: E402
from metalora.rundir import RunDir  # noqa: E402

STORE = RESULTS / "separability.json"
PLOT = RESULTS / "separability_tsne.png"


def items(run_dir: Path, per_task: int) -> list[tuple[str, str]]:
    """(task, prompt) of the first ``per_task`` test items of each of the run's tasks."""
    data = RunDir(run_dir).read_config()["data"]
    out = []
    for spec in data["tasks"]:
        task = load_task(spec, seed=data["seed"])
        out += [(task.name, ex.prompt) for ex in task.test[:per_task]]
    return out


@torch.no_grad()
def vectors(target: str, prompts: list[tuple[str, str]]) -> np.ndarray:
    model, tok, _ = load_eval_target(target)
    captured: list[torch.Tensor] = []
    o_proj = model.model.layers[-1].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda m, i, out: captured.append(out[0].mean(0)))
    try:
        for task, prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            if is_task_routed(model):
                with task_ids(model, [task]):
                    model(input_ids=ids)
            else:
                model(input_ids=ids)
    finally:
        handle.remove()
    return torch.stack(captured).float().numpy()


def separability(x: np.ndarray, labels: list[str]) -> dict[str, float]:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(classifier, x, labels, cv=5)
    counts = np.unique(labels, return_counts=True)[1]
    return {
        "cv_accuracy": float(scores.mean()),
        "cv_std": float(scores.std()),
        "majority": float(counts.max() / len(labels)),
    }


def plot(embedded: dict[str, np.ndarray], labels: list[str]) -> None:
    names = sorted(set(labels))
    fig, axes = plt.subplots(1, len(embedded), figsize=(4.2 * len(embedded), 4.2), squeeze=False)
    for ax, (model, xy) in zip(axes[0], embedded.items(), strict=True):
        for j, task in enumerate(names):
            rows = [i for i, t in enumerate(labels) if t == task]
            ax.scatter(xy[rows, 0], xy[rows, 1], s=6, color=f"C{j}", label=task)
        ax.set_title(model)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle("t-SNE of the last block's o_proj output (mean over prompt tokens)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def measure(targets: dict[str, str], per_task: int) -> dict[str, Any]:
    runs = [Path(t) for t in targets.values() if (Path(t) / "config.yaml").is_file()]
    prompts = items(runs[0], per_task)
    labels = [task for task, _ in prompts]
    rows, embedded = {}, {}
    for name, target in targets.items():
        x = vectors(target, prompts)
        rows[name] = separability(x, labels)
        embedded[name] = TSNE(n_components=2, random_state=0, init="pca").fit_transform(x)
    plot(embedded, labels)
    return {"targets": targets, "per_task": per_task, "n": len(labels), "models": rows, "machine": machine()}


def markdown(result: dict[str, Any]) -> str:
    body = [
        [n, f"{r['cv_accuracy']:.3f} ± {r['cv_std']:.3f}", f"{r['majority']:.3f}"]
        for n, r in result["models"].items()
    ]
    head = (
        f"{result['n']} test prompts ({result['per_task']} per task); 5-fold CV, mean ± std over folds.\n\n"
    )
    return head + markdown_table(["model", "task-ID linear probe accuracy", "majority class"], body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "targets", nargs="*", help="name=model-or-run-dir (the first run directory names the tasks)"
    )
    p.add_argument("--per-task", type=int, default=50)
    p.add_argument("--markdown", action="store_true", help="print the docs table from the stored JSON")
    args = p.parse_args()
    targets = dict(t.split("=", 1) for t in args.targets)
    measure_or_print(args.markdown, STORE, lambda: measure(targets, args.per_task), markdown)


if __name__ == "__main__":
    main()
