"""The training process of one job: ``peftkit train`` on the job's config, with the outcome
written to the job folder (``outcome.json``) for its worker.

A worker forks it (the training modules already imported, so a job starts in about a second)
or, for a job of N processes, launches ``python -m torch.distributed.run --nproc_per_node N -m
peftkit.jobs.child JOB_DIR``. Exit status: 0 finished, 130 stopped by SIGTERM with a checkpoint
saved, 2 a config or data error, 1 anything else.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

__all__ = ["CONFIG", "OUTCOME", "RUN", "main", "train_job"]

CONFIG = "config.yaml"
OUTCOME = "outcome.json"
RUN = "run"


def _write_outcome(job_dir: str, outcome: dict) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    from peftkit.core.io import atomic_write_text

    atomic_write_text(os.path.join(job_dir, OUTCOME), json.dumps(outcome) + "\n")


def train_job(job_dir: str) -> int:
    """Trains the job of ``job_dir``; resumes from the run's checkpoint where there is one.
    Returns the exit status."""
    import yaml

    from peftkit.train.config import build_config
    from peftkit.train.loop import run_training
    from peftkit.train.outputs import checkpoint_path
    from peftkit.train.schema import ConfigError

    try:
        with open(os.path.join(job_dir, CONFIG), encoding="utf-8") as fh:
            cfg = build_config(yaml.safe_load(fh), job_dir)
        resume = checkpoint_path(cfg.output_dir) is not None
        result = run_training(cfg, resume=resume, overwrite=not resume, quiet=True)
    except ConfigError as exc:
        _write_outcome(job_dir, {"status": "failed", "code": "invalid_config", "message": str(exc)})
        return 2
    except Exception as exc:
        traceback.print_exc()
        _write_outcome(job_dir, {"status": "failed", "code": "training_error", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    if result.get("interrupted"):
        _write_outcome(job_dir, {"status": "interrupted", "step": result.get("step")})
        return 130
    _write_outcome(job_dir, {"status": "succeeded", "summary": result, "adapter_dir": os.path.join(cfg.output_dir, "adapter")})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m peftkit.jobs.child JOB_DIR", file=sys.stderr)
        return 2
    return train_job(args[0])


if __name__ == "__main__":
    sys.exit(main())
