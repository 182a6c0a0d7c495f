"""Training and evaluation on real data: ``train(config)``, ``evaluate(run_dir)``, ``generate(run_dir, ...)``.

Single process or DDP under torchrun; atomic checkpoints; bit-exact ``resume``.
"""

from .config import TASKS, TrainConfig
from .runs import evaluate, generate, load_run
from .trainer import train

__all__ = ["TASKS", "TrainConfig", "evaluate", "generate", "load_run", "train"]
