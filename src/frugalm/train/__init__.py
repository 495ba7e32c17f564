"""Pre-training: the run config, AdamW + schedule, expert balancing, atomic checkpoints, metrics, the loop.

Entry points: `load_run_config` (TOML + overrides -> `RunConfig`) and `train` (run or resume into a
folder); `Trainer` for code that reuses the loop's parts. Heavy modules are imported lazily so
``import frugalm.train`` stays cheap.
"""

from frugalm.train.config import RunConfig, TrainConfig, load_run_config

__all__ = ["RunConfig", "TrainConfig", "load_run_config", "train", "Trainer"]


def __getattr__(name: str):
    if name in ("train", "Trainer", "TrainSummary", "NonFiniteLossError"):
        from frugalm.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
