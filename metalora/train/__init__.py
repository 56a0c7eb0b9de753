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


def __getattr__(name: str):
    if name in ("ReweightConfig", "train_reweight"):
        from metalora.train import reweight

        return getattr(reweight, name)
    if name == "run":
        from metalora.train.runner import run

        return run
    raise AttributeError(f"module 'metalora.train' has no attribute {name!r}")
