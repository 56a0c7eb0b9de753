"""The ``metalora`` command: train, eval, export, select, compare, demo.

The command layer: this module builds the parser; each sub-command lives in ``metalora/cli/<command>.py``
as ``run(args)``, which calls the library. Exit statuses: 0 done; 2 an error the user can fix in the input
(a bad config key or value, a missing file), printed as one line; 1 a damaged checkpoint, a failed write,
a run directory in use or another OS error, one line too; 130 / 143 stopped by SIGINT / SIGTERM after
writing a checkpoint (the same command resumes).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from metalora.errors import CheckpointError, RunDirInUse, RunInterrupted


def _command(name: str):
    """The sub-command's ``run(args)``, imported only when that command runs (a fast ``--help``)."""

    def run(args: argparse.Namespace) -> None:
        importlib.import_module(f"metalora.cli.{name}").run(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalora",
        description="Multi-task, data-efficient LoRA fine-tuning (MeTA-LoRA, META-LoRA reweighting, MTL-LoRA).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train from a YAML recipe with key=value overrides",
        description="Train from a YAML recipe (configs/*.yaml). Overrides use dotted keys, e.g. "
        "`metalora train configs/meta_lora.yaml model=smollm2-135m meta.inner_steps=1`.",
    )
    p.add_argument("config", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, YAML values)")
    p.set_defaults(func=_command("train"))

    p = sub.add_parser(
        "eval",
        help="evaluate a run, a saved adapter, a PEFT adapter, or the base model",
        description="Evaluate a run directory (LoRA-ST runs: each task with its own adapter), a metalora "
        "adapter directory, a PEFT adapter directory, or a base model name on built-in or file tasks; "
        "adapted targets are also scored as their base model on the same prompts.",
    )
    p.add_argument(
        "target", help="runs/NAME, an adapter directory, a PEFT adapter directory, or a base model name"
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated built-in task names and/or YAML/JSON files of task specs (e.g. "
        "arc_easy,mmlu:anatomy,my_tasks.yaml); default for a run directory: the tasks it was trained on",
    )
    p.add_argument("--base", default=None, help="base model (default: the one recorded with the adapter)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument(
        "--shots", type=int, default=None, help="k-shot (default: 5 for MMLU, 3 for BBH, 0 otherwise)"
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--unseen-task",
        default="uniform",
        help="task-routed adapters only: how to route a task the adapter was not trained on. "
        "'uniform' averages the option log-likelihoods over every trained task id (one pass "
        "per id); a task name or id routes it to that task",
    )
    p.add_argument("--out", default=None, help="write the results JSON here (default: TARGET/eval.json)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="split seed (default: a run directory's data.seed, else 0) and few-shot sampling seed",
    )
    p.set_defaults(func=_command("eval"))

    p = sub.add_parser(
        "export",
        help="export an adapter to PEFT LoRA format or merge it into the base",
        description="Export runs/NAME (or an adapter directory) as a plain PEFT LoRA adapter "
        "and/or a merged HF model.",
    )
    p.add_argument("source", help="runs/NAME or an adapter directory")
    p.add_argument("--peft", default=None, help="write a PEFT LoRA adapter to this directory")
    p.add_argument(
        "--merge", default=None, help="write a merged HF model (save_pretrained) to this directory"
    )
    p.add_argument(
        "--task",
        default=None,
        help="task name or id (MTL-LoRA and MoELoRA need one; for a LoRA-ST run, the task whose adapter to export)",
    )
    p.add_argument("--base", default=None, help="base model (default: the one recorded with the adapter)")
    p.set_defaults(func=_command("export"))

    p = sub.add_parser(
        "compose",
        help="LoRAHub: weigh a library of LoRA adapters for a new task from k examples",
        description="LoRAHub (Huang et al. 2023): learn one weight per library adapter (A = Σ w_j A_j, "
        "B = Σ w_j B_j) minimising the loss on k examples of --task plus an L1 penalty, with nevergrad's "
        "NGOpt; write the composed adapter to --out as a plain PEFT LoRA with compose.json and compose.md.",
    )
    p.add_argument(
        "library",
        nargs="+",
        help="LoRA-ST run directories (one adapter per task), metalora LoRA adapters or runs, MTL-LoRA or "
        "MoELoRA adapters or runs (one LoRA per task), PEFT LoRA directories; one rank and targets for all",
    )
    p.add_argument(
        "--task", required=True, help="the new task: a built-in name or a YAML/JSON task spec file"
    )
    p.add_argument(
        "--k", type=int, default=5, help="examples of the task to weigh the adapters on (default 5)"
    )
    p.add_argument(
        "--split", default="train", choices=["train", "dev", "test"], help="drawn from (default train)"
    )
    p.add_argument("--budget", type=int, default=40, help="objective evaluations (default 40, the authors')")
    p.add_argument("--l1", type=float, default=0.05, help="L1 penalty weight λ (default 0.05, the authors')")
    p.add_argument("--bound", type=float, default=1.5, help="weights lie in [-bound, bound] (default 1.5)")
    p.add_argument(
        "--objective",
        default="paper",
        help="'paper' (L + λ·Σ|w|, default) or 'lorahub_code' (L/k + λ·mean|w|, as lorahub==0.1.0 computes it)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the k-example draw and of the optimiser")
    p.add_argument(
        "--data-seed", type=int, default=None, help="split seed (default: the first library run's, else 0)"
    )
    p.add_argument("--model", default=None, help="base model (default: the one the adapters record)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the run's)")
    p.add_argument(
        "--template", default=None, choices=["plain", "chat"], help="default: the run's, else plain"
    )
    p.add_argument("--batch-size", type=int, default=None, help="examples per forward (default: all k)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory: a PEFT LoRA adapter and its record")
    p.set_defaults(func=_command("compose"))

    p = sub.add_parser(
        "select",
        help="data selection baselines: bm25, dsir, classifier, mix",
        description="Select or weight candidate training rows by similarity to target rows; "
        "writes a JSONL usable as a task file.",
    )
    p.add_argument("method", choices=["bm25", "dsir", "classifier", "mix"])
    p.add_argument("--candidates", required=True, help="JSONL of candidate training rows")
    p.add_argument("--target", required=True, help="JSONL of target/validation rows")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--k", type=int, default=None, help="number of rows to select")
    p.add_argument("--ratio", type=float, default=None, help="MIX: fraction of target rows in the mixture")
    p.add_argument("--text-fields", default=None, help="comma-separated fields whose text is compared")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_command("select"))

    p = sub.add_parser(
        "compare",
        help="train recipes over seeds and compare them on the same held-out items, with 95% intervals",
        description="Train every recipe on every seed (resumable), score each on the same held-out items, "
        "and write DIR/compare.json, DIR/compare.md and DIR/plots/: per task and macro, the mean over seeds "
        "with a 95%% Student-t interval, and against --reference a paired bootstrap over the test items. "
        "key=value overrides apply to every recipe.",
    )
    p.add_argument(
        "items",
        nargs="+",
        metavar="RECIPE|key=value",
        help="recipe YAML files (a variant: RECIPE.yaml@key=value[@key=value], a row of its own), then overrides",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--tasks", default=None, help="tasks to score, as for eval (default: each recipe's own)")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument(
        "--reference",
        default=None,
        help="the recipe (file stem, or stem@key=value) the others are tested against",
    )
    p.add_argument("--base", action="store_true", help="also score the untrained base model (recipe 'base')")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (default 1)")
    p.add_argument("--lr-grid", default=None, help="comma-separated rates; each recipe's best on dev is used")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--shots", type=int, default=None, help="k-shot (default: each benchmark's own)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.set_defaults(func=_command("compare"))

    p = sub.add_parser(
        "demo",
        help="the main job: MeTA-LoRA on SmolLM2 + built-in tasks, eval, report, export",
        description="Fine-tune the embedded SmolLM2-135M with MeTA-LoRA on several built-in real "
        "tasks (50 examples each), evaluate before/after on held-out splits, write "
        "a report with plots and export a PEFT adapter.",
    )
    p.add_argument("--quick", action="store_true", help="a ~2-minute version (CI smoke test)")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.set_defaults(func=_command("demo"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "compare" and extra and not any(e.startswith("-") for e in extra):
        args.items += extra  # key=value overrides written after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:  # validation errors carry their own clear message
        print(f"metalora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:  # SIGINT/SIGTERM: the step finished and a checkpoint was written
        print(f"metalora {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (CheckpointError, RunDirInUse) as exc:  # a damaged checkpoint, a failed write, a busy directory
        print(f"metalora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine's side: permissions, a full disk, a vanished file system
        print(f"metalora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
