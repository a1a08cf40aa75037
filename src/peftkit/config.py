"""The configuration base classes, re-exported from :mod:`peftkit.core.config` (their home)."""

from peftkit.core.config import PeftConfig, PeftType, TargetedConfig, TaskType

__all__ = ["PeftConfig", "PeftType", "TargetedConfig", "TaskType"]
