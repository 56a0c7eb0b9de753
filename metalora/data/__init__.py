"""metalora's data layer: tasks and their sources, templates, built-in real tasks, tokenization with
prompt-masked labels, collation, and samplers (few-shot pools, mixtures, MeTA-LoRA episodes).

See ``docs/data.md`` for the built-in tasks, their sizes, splits and licenses.
"""

from metalora.data.builtin import BUILTINS, list_builtins, mmlu_subjects, resolve_builtin
from metalora.data.collate import collate, collate_packed
from metalora.data.errors import MetaloraDataError
from metalora.data.example import Example, Task
from metalora.data.samplers import (
    Episode,
    EpisodicSampler,
    MixtureSampler,
    build_pools,
    few_shot_pool,
    mixture_weights,
)
from metalora.data.sources import read_records
from metalora.data.tasks import TaskSpec, load_task, load_tasks, split_examples, split_sizes, task_id_map
from metalora.data.templates import format_mc_prompt, format_mc_response, record_to_example
from metalora.data.tokenize import (
    IGNORE_INDEX,
    TokenizeStats,
    render,
    tokenize_example,
    tokenize_examples,
)

__all__ = [
    "BUILTINS",
    "IGNORE_INDEX",
    "Episode",
    "EpisodicSampler",
    "Example",
    "MetaloraDataError",
    "MixtureSampler",
    "Task",
    "TaskSpec",
    "TokenizeStats",
    "build_pools",
    "collate",
    "collate_packed",
    "few_shot_pool",
    "format_mc_prompt",
    "format_mc_response",
    "list_builtins",
    "load_task",
    "load_tasks",
    "mixture_weights",
    "mmlu_subjects",
    "read_records",
    "record_to_example",
    "render",
    "resolve_builtin",
    "split_examples",
    "split_sizes",
    "task_id_map",
    "tokenize_example",
    "tokenize_examples",
]
