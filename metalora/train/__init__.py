"""Training: one engine (``engine.Engine``) and the algorithms on it.

* ``multitask``: LoRA-MT (``train_multitask``), LoRA-ST (``train_single_task``), the few-shot protocol;
* ``meta``: MeTA-LoRA and its -STA ablation (``train_meta``);
* ``reweight``: META-LoRA sample reweighting (``train_reweight``);
* ``run(config, overrides)``: a whole run from a YAML/dict config into ``runs/NAME/`` (what the CLI calls).
"""

from metalora.train.counters import Counters
from metalora.train.engine import Engine, EngineConfig, NonFiniteLossError, StepOutput
from metalora.train.meta import MetaConfig, meta_step, train_meta
from metalora.train.multitask import MultitaskConfig, multitask_step, train_multitask, train_single_task
from metalora.train.reweight import ReweightConfig, train_reweight
from metalora.train.runner import run

__all__ = [
    "Counters",
    "Engine",
    "EngineConfig",
    "MetaConfig",
    "MultitaskConfig",
    "NonFiniteLossError",
    "ReweightConfig",
    "StepOutput",
    "meta_step",
    "multitask_step",
    "run",
    "train_meta",
    "train_multitask",
    "train_reweight",
    "train_single_task",
]
