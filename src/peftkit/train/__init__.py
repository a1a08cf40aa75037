"""``peftkit train``: configuration, data, the training loop and evaluation; tasks and
training extensions are plug-ins (``peftkit.train.plugins``).

A user of the library, never imported by it.
"""

from peftkit.train.config import ConfigError, RunConfig, build_config, load_config
from peftkit.train.loop import run_training

__all__ = ["ConfigError", "RunConfig", "build_config", "load_config", "run_training"]
