"""``peftkit train``: configuration, data, the training loop and evaluation.

A user of the library, never imported by it.
"""

from peftkit.train.config import ConfigError, RunConfig, load_config
from peftkit.train.loop import run_training

__all__ = ["ConfigError", "RunConfig", "load_config", "run_training"]
