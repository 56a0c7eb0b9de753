"""``metalora export``: a saved adapter (or a run's) to a PEFT LoRA directory and/or a merged HF model.

A QLoRA run (``quantization: nf4 | int8``) follows the same rule as ``merge``: ``--peft`` writes the
adapter, which loads over a quantized or a full-precision base; ``--merge`` loads the recorded base
un-quantized (its original weights, as every export does) and merges there, so the merged model is a
plain full-precision HF model. (In Python, ``merge(model, dequantize=True)`` merges into the dequantized
copy of an in-memory quantized model instead.)
"""

from __future__ import annotations

import argparse

from metalora.adapters.merge import export_peft, merge
from metalora.rundir import load_adapted, task_adapters


def run(args: argparse.Namespace) -> None:
    if not args.peft and not args.merge:
        raise ValueError("nothing to do: give --peft DIR and/or --merge DIR")
    if task_adapters(args.source):
        # LoRA-ST: --task picks the task's own adapter, a plain LoRA
        model, task = load_adapted(args.source, args.base, args.task), None
    else:
        model = load_adapted(args.source, args.base)
        task = int(args.task) if args.task is not None and args.task.isdigit() else args.task
    if args.peft:
        export_peft(model, args.peft, task=task)
        print(f"PEFT LoRA adapter written to {args.peft}")
    if args.merge:
        merged = merge(model, task=task, inplace=True)
        merged.save_pretrained(args.merge, safe_serialization=True)
        print(f"merged model written to {args.merge}")
