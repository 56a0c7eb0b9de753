"""The output of ``metalora compose``: one directory that is a plain PEFT LoRA adapter plus its record.

OUT/adapter_config.json, adapter_model.safetensors   the composed LoRA (``export_peft``)
OUT/compose.json                                     weights, best step, every step, settings
OUT/compose.md                                       the same as tables
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalora import atomic
from metalora.adapters import export_peft
from metalora.compose.library import LibraryAdapter
from metalora.compose.lorahub import ComposedLoRA, CompositionResult

RECORD_FILE = "compose.json"
TABLES_FILE = "compose.md"


def write_composition(
    composed: ComposedLoRA,
    result: CompositionResult,
    library: Sequence[LibraryAdapter],
    out: str | Path,
    meta: dict[str, Any],
) -> Path:
    """Export the composed LoRA to ``out`` and write ``compose.json`` / ``compose.md`` beside it.

    ``meta``: what the record should also say (task, split, example ids, model, ...)."""
    out = Path(out)
    export_peft(composed.model, out)
    record = {
        "method": "lorahub",
        **meta,
        "library": [{"name": a.name, "source": a.source} for a in library],
        **result.to_dict(),
    }
    atomic.write_json(out / RECORD_FILE, record)
    atomic.write_text(out / TABLES_FILE, composition_markdown(record))
    return out


def composition_markdown(record: dict[str, Any]) -> str:
    """``compose.json`` as markdown: the settings, each adapter's weight, then every step."""
    cfg, best = record["config"], record["best"]
    penalty = "λ·Σ|w|" if cfg["objective"] == "paper" else "L/k + λ·mean|w| (lorahub code)"
    lines = [
        f"# LoRAHub composition for {record.get('task', 'the task')}",
        "",
        f"k = {record['k']} examples ({record.get('split', '?')} split, seed {record.get('seed', '?')}); "
        f"objective L + {penalty}, λ = {cfg['l1']:g}; NGOpt, budget {cfg['budget']}, "
        f"w ∈ [-{cfg['bound']:g}, {cfg['bound']:g}].",
        "",
    ]
    if record.get("base_loss") is not None:
        lines.append(f"Base model (w = 0, step 0): loss {record['base_loss']:.4f}.")
    lines += [
        f"Best: step {best['step']}, loss {best['loss']:.4f}, objective {best['objective']:.4f}.",
        "",
        "| adapter | source | weight |",
        "|---|---|---|",
    ]
    sources = {a["name"]: a["source"] for a in record["library"]}
    lines += [f"| {name} | {sources.get(name, '')} | {w:+.4f} |" for name, w in record["weights"].items()]
    names = list(record["weights"])
    lines += ["", "## Steps", "", "| step | objective | loss | penalty | " + " | ".join(names) + " |"]
    lines.append("|---" * (4 + len(names)) + "|")
    for step in record["history"]:
        weights = " | ".join(f"{w:+.3f}" for w in step["weights"])
        lines.append(
            f"| {step['step']} | {step['objective']:.4f} | {step['loss']:.4f} | {step['penalty']:.4f} | {weights} |"
        )
    return "\n".join(lines) + "\n"
