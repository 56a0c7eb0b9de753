"""``metalora compose``: LoRAHub (Huang et al. 2023), a library of LoRA adapters weighted for a new task
from k examples, written as a plain PEFT LoRA.

``library.py`` reads and checks the adapters, ``lorahub.py`` composes them and searches the weights
(the paper's equations in its docstring), ``report.py`` writes the result.
"""

from metalora.compose.library import LibraryAdapter, LibraryError, check_library, load_library
from metalora.compose.lorahub import (
    ComposedLoRA,
    CompositionResult,
    LoRAHubConfig,
    compose,
    few_shot_batches,
    objective_value,
    response_loss,
)
from metalora.compose.report import write_composition

__all__ = [
    "ComposedLoRA",
    "CompositionResult",
    "LibraryAdapter",
    "LibraryError",
    "LoRAHubConfig",
    "check_library",
    "compose",
    "few_shot_batches",
    "load_library",
    "objective_value",
    "response_loss",
    "write_composition",
]
