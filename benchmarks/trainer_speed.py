"""LoRA-MT tokens/s against HF ``Trainer`` + PEFT, each with its best batching (issue 17 item 6).

    python benchmarks/trainer_speed.py             # measure on SmolLM2-135M, store results/trainer_speed.json
    python benchmarks/trainer_speed.py --markdown  # the docs table from the stored JSON

The same tokenized pools as ``benchmarks/padding.py``'s Table 2 setting (eight commonsense tasks, 100
examples each, ≤ 256 tokens, SmolLM2 tokenizer), LoRA r=16 on q,k,v,o, batch 8, AdamW at 1e-3, grad-norm
clip 1.0, fp32, one thread. Variants: metalora's engine (``multitask_step`` + ``outer_step``) with one batch,
with sorted micro-batches of 2, with ``group_by_length``, and padding-free (``multitask.packing``: one packed
row per step); ``Trainer`` + ``peft.get_peft_model`` (HF's ``DataCollatorForSeq2Seq`` padding) plain, with
``train_sampling_strategy="group_by_length"`` (transformers 5's name for ``group_by_length=True``), and
padding-free with HF's ``DataCollatorWithFlattening`` (the same packed row and position ids). A step's time is this process's
CPU time between consecutive step ends (the first step is left out), so neighbours on a shared machine do
not count; tokens/s = the non-padding input tokens of the timed batches over their time. Variants run
round-robin ``--repeats`` times; the fastest repeat of each is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peft
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, measure_or_print  # noqa: E402
from padding import COMMONSENSE  # noqa: E402

from metalora.adapters.api import add_adapter, config_from_dict  # noqa: E402
from metalora.data import build_pools, load_tasks, task_id_map, tokenize_examples  # noqa: E402
from metalora.models import load_base  # noqa: E402
from metalora.train.engine import Engine, EngineConfig  # noqa: E402
from metalora.train.multitask import EpochBatches, MultitaskConfig, multitask_step  # noqa: E402

STORE = RESULTS / "trainer_speed.json"
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
OURS = {  # name: (micro_batch_size, group_by_length, packing)
    "metalora, one batch": (None, False, False),
    "metalora, sorted micro-batches of 2": (2, False, False),
    "metalora, group_by_length": (None, True, False),
    "metalora, packed (padding-free)": (None, False, True),
}
THEIRS = {  # name: (group_by_length, padding-free)
    "Trainer + PEFT": (False, False),
    "Trainer + PEFT, group_by_length": (True, False),
    "Trainer + PEFT, padding-free (DataCollatorWithFlattening)": (False, True),
}


def pools(tokenizer: Any) -> list[dict[str, Any]]:
    tasks = load_tasks(COMMONSENSE, seed=0)
    ids = task_id_map(tasks)
    examples = build_pools(tasks, 100, seed=0)
    return [f for exs in examples.values() for f in tokenize_examples(exs, tokenizer, ids, max_length=256)[0]]


def ours(
    features: list[dict], micro: int | None, grouped: bool, packing: bool, steps: int
) -> tuple[float, int]:
    model = add_adapter(load_base("smollm2-135m")[0], config_from_dict("lora", dict(LORA)), seed=0)
    config = MultitaskConfig(batch_size=8, micro_batch_size=micro, group_by_length=grouped, packing=packing)
    batches = EpochBatches(features, 8, seed=0, group_by_length=grouped)
    seconds, tokens = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(model, EngineConfig(max_steps=steps, lr=1e-3, max_grad_norm=1.0, progress=False), tmp)
        model.train()
        for step in range(steps):
            batch = batches.sample()
            t0 = time.process_time()
            engine.outer_step(multitask_step(engine, batch, config, 0), step)
            if step:  # the first step warms up, as Trainer's first interval is not timed either
                seconds += time.process_time() - t0
                tokens += sum(len(f["input_ids"]) for f in batch)
    return seconds, tokens


def theirs(features: list[dict], tokenizer: Any, grouped: bool, flat: bool, steps: int) -> tuple[float, int]:
    model = peft.get_peft_model(
        load_base("smollm2-135m")[0],
        peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"]),
    )
    data = [
        {"input_ids": f["input_ids"], "labels": f["labels"], "attention_mask": [1] * len(f["input_ids"])}
        for f in features
    ]
    pad = (
        DataCollatorWithFlattening()  # one row, position ids restarting per sample, no attention mask
        if flat
        else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    )
    tokens: list[int] = []
    ends: list[float] = []

    def collate(rows: list[dict]) -> dict:
        tokens.append(sum(len(r["input_ids"]) for r in rows))
        return pad(rows)

    class StepEnds(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.process_time())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-3,
            max_grad_norm=1.0, optim="adamw_torch", use_cpu=True,
            train_sampling_strategy="group_by_length" if grouped else "random",
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False, seed=0,
        )  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):
            trainer = Trainer(
                model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[StepEnds()]
            )
            trainer.train()
    return ends[-1] - ends[0], sum(tokens[1 : len(ends)])


def measure(steps: int, repeats: int) -> dict[str, Any]:
    tokenizer = load_base("smollm2-135m")[1]
    features = pools(tokenizer)
    best: dict[str, tuple[float, int]] = {}
    for _ in range(repeats):  # round-robin, so drift hits every variant alike
        runs = {n: (lambda v=v: ours(features, *v, steps)) for n, v in OURS.items()}
        runs |= {n: (lambda v=v: theirs(features, tokenizer, *v, steps)) for n, v in THEIRS.items()}
        for name, fn in runs.items():
            seconds, tokens = fn()
            if name not in best or seconds / tokens < best[name][0] / best[name][1]:
                best[name] = (seconds, tokens)
    rows = {n: {"cpu_s": s, "tokens": t, "tokens_per_s": t / s} for n, (s, t) in best.items()}
    return {
        "variants": rows,
        "steps": steps,
        "repeats": repeats,
        "machine": machine(),
        "clock": "process_time",
    }


def markdown(result: dict[str, Any]) -> str:
    rows, ref = result["variants"], result["variants"]["Trainer + PEFT, group_by_length"]["tokens_per_s"]
    body = [
        [
            n,
            f"{r['tokens']:,}",
            f"{r['cpu_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / ref:.2f}",
        ]
        for n, r in rows.items()
    ]  # a variant stored before it existed (packing) is simply absent
    header = ["variant", "tokens timed", "CPU s", "tokens/s", "vs Trainer + group_by_length"]
    return (
        f"{result['steps'] - 1} timed steps of batch 8 each, fastest of {result['repeats']} round-robin repeats.\n\n"
        + markdown_table(header, body)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", action="store_true", help="print the docs table from the stored JSON")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    measure_or_print(args.markdown, STORE, lambda: measure(args.steps, args.repeats), markdown)


if __name__ == "__main__":
    main()
