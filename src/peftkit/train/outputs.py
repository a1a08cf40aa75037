"""A run's output folder: what a run writes there, when a new run or a resume may use it,
and ``--dry-run`` (every check a run makes before it loads the model)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from peftkit.train.data import prepare_task_data
from peftkit.train.plugins import get_task
from peftkit.train.schema import ConfigError, RunConfig

__all__ = ["CHECKPOINT", "RUN_FILES", "WATCHING", "checkpoint_path", "config_changes", "dry_run", "prepare_output_dir"]

CHECKPOINT = "checkpoint"
#: what a run writes into its folder; ``--overwrite`` deletes these and nothing else
RUN_FILES = ("adapter", CHECKPOINT, f"{CHECKPOINT}.tmp", f"{CHECKPOINT}.old", "metrics.jsonl", "summary.json", "config.yaml",
             "labels.json", "training_curve.png")
#: settings that change how a run is watched, not what it computes: ``--resume`` accepts changes
WATCHING = ("train.log_every", "train.eval_batch_size", "train.checkpoint_every", "train.checkpoint_minutes", "train.threads",
            "output_dir", "compare")


def checkpoint_path(out: str) -> str | None:
    """The folder's checkpoint; one left as ``checkpoint.old`` by a save killed between its
    two renames is put back first."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        os.replace(path + ".old", path)
    return path if os.path.isdir(path) else None


def _flat(tree: Any, path: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for each leaf of a nested mapping."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{path}{key}.").items()}
    return {path.rstrip("."): tree}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: the settings in which ``current`` differs from ``saved``, split
    into those that change a run's results and those that only change how it is watched."""
    old, new = _flat(saved), _flat(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    describe = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    allowed = [d for k, d in zip(changed, describe, strict=True) if any(k == w or k.startswith(w + ".") for w in WATCHING)]
    return [d for d in describe if d not in allowed], allowed


def prepare_output_dir(cfg: RunConfig, resume: bool, overwrite: bool, log: Callable[..., None], dry: bool = False) -> None:
    """Refuses a fresh run into a folder holding another run (unless ``overwrite``), and a
    resume whose config changes results; runs before any model loads. ``dry``: check only,
    delete nothing."""
    out = cfg.output_dir
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if resume:
        path = checkpoint_path(out)
        if path is None:
            return
        saved = torch.load(os.path.join(path, "state.pt"), weights_only=False).get("config")
        if saved is None:
            raise ConfigError(f"the checkpoint in {out!r} records no config, so it cannot be checked against this one; "
                              "start afresh with --overwrite")
        refused, allowed = config_changes(saved, cfg.to_dict())
        if refused:
            raise ConfigError(f"--resume: the config differs from the checkpoint's in settings that change results: "
                              f"{'; '.join(refused)}. Restore them, or start afresh with --overwrite")
        if allowed:
            log("resuming with changed settings: " + "; ".join(allowed))
    elif present:
        if not overwrite:
            raise ConfigError(f"output_dir {out!r} holds another run ({', '.join(present)}); continue it with --resume, "
                              "start afresh with --overwrite (deletes those files), or choose another output_dir")
        if dry:
            log(f"--overwrite would remove the earlier run's {', '.join(present)} from {out}")
            return
        for name in present:
            target = os.path.join(out, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        log(f"--overwrite: removed the earlier run's {', '.join(present)} from {out}")


def dry_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Everything a run would check, without loading the model or training: the config (already
    validated), the output folder, and the data (files, columns, labels, batches per step).

    Returns:
        What the run would train on: record counts, labels, steps.
    """
    log = (lambda *a: None) if quiet else print
    prepare_output_dir(cfg, resume, overwrite, log, dry=True)
    t = cfg.train
    data = prepare_task_data(get_task(cfg.task), cfg.data, t.seed)
    batches = math.ceil(len(data.train) / t.batch_size)
    if batches < t.grad_accum:
        raise ConfigError(f"the training data make {batches} batches of {t.batch_size}, fewer than train.grad_accum={t.grad_accum}")
    steps = t.max_steps or max(1, int(round(max(1, batches // t.grad_accum) * t.epochs)))
    report = {"task": cfg.task, "method": cfg.method.get("name"), "train_records": len(data.train),
              "validation_records": len(data.validation), "labels": data.labels, "steps": steps,
              "extensions": sorted(cfg.extensions)}
    log("config and data are valid: " + json.dumps(report))
    return report
