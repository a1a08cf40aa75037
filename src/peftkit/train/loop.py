"""The training loop of ``peftkit train``: plain, readable top to bottom, on accelerate.

One global batch is cut into equal shards, one per process, so a run on N processes
(``accelerate launch`` / ``torchrun``, DDP) takes the same optimiser steps as one process
with the same global batch.

A run trains in rounds: one, unless a training extension hands it more records when a
round ends (self-training does, with pseudo-labels). Each round has its own optimiser and
learning-rate schedule; the best checkpoint is chosen over all of them. The method's
training hooks and the extensions are the only plug-ins the loop calls, at the points that
``peftkit.core.training`` documents.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.io import atomic_write_text, save_tensors
from peftkit.core.training import TrainingHooks, run_hooks
from peftkit.train.config import method_config, method_training_options, split_method
from peftkit.train.data import batch_order, prepare_task_data
from peftkit.train.evaluate import metric_direction
from peftkit.train.interrupts import Interrupts, handle_interrupts
from peftkit.train.outputs import CHECKPOINT, checkpoint_path, prepare_output_dir
from peftkit.train.plugins import EXTENSIONS, get_task
from peftkit.train.report import format_metrics, plot_history, run_summary, summary_table
from peftkit.train.run import Prepared
from peftkit.train.schema import ConfigError, RunConfig
from peftkit.train.tasks.base import to_device

__all__ = ["RunState", "cpu_threads", "run_training"]



@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint, so ``--resume`` continues exactly."""

    step: int = 0  # optimiser steps taken, over all rounds
    epoch: int = 0  # epochs begun, over all rounds (it seeds the batch order)
    batch: int = 0  # micro-batches of the current epoch done, at the last optimiser step
    round: int = 0
    round_start: int = 0  # the step the current round began at
    round_epochs: float | None = None  # epochs of the current round, when not train.epochs
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    finished: bool = False
    pending_eval: bool = False  # the step just taken is due an evaluation not yet made
    # micro-batch losses since the last logged row: floats, or detached loss tensors not yet read
    # (read when the row is written, so that the host waits for the device once per row, not once
    # per micro-batch)
    loss_window: list[Any] = field(default_factory=list)
    units: int = 0
    train_seconds: float = 0.0
    metric_before: dict[str, float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extra_records: list[dict[str, Any]] = field(default_factory=list)  # records an extension added for this round
    hooks: dict[str, Any] = field(default_factory=dict)  # each hook's state_dict, by position


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms or other 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _regulariser(named: list[tuple[str, nn.Parameter]], reference: dict[str, torch.Tensor], cfg: RunConfig) -> torch.Tensor | None:
    t = cfg.train
    if not (t.l1 or t.l2 or t.l2sp):
        return None
    total = None
    for name, p in named:
        term = 0.0
        if t.l1:
            term = term + t.l1 * p.abs().sum()
        if t.l2:
            term = term + t.l2 * p.pow(2).sum()
        if t.l2sp:
            term = term + t.l2sp * (p - reference[name]).pow(2).sum()
        total = term if total is None else total + term
    return total


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Progress:
    def __init__(self, enabled: bool, unit: str) -> None:
        self.enabled, self.tty, self.unit = enabled, sys.stdout.isatty(), unit

    def show(self, step: int, total: int, loss: float, lr: float, rate: float, extra: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * step / max(1, total))
        shown = "".join(f"  {key} {value:.4g}" for key, value in (extra or {}).items())
        line = f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}  loss {loss:.4f}{shown}  lr {lr:.2e}  {rate:,.0f} {self.unit}/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print()


class Run:
    """Everything a run holds while it trains. It is also the context that training hooks
    and extensions see (``peftkit.core.training.TrainingContext``)."""

    def __init__(self, cfg: RunConfig, quiet: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from peftkit import get_peft_model

        self.cfg, t = cfg, cfg.train
        torch.set_num_threads(cpu_threads(t.threads))
        mixed = t.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process
        self.quiet = quiet
        self.started = time.perf_counter()
        set_seed(t.seed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # this run's peak, not an earlier run's in the same process
        data = prepare_task_data(get_task(cfg.task), cfg.data, t.seed)
        self.parts = Prepared(cfg, data.labels)
        self.task, self.labels = self.parts.task, data.labels
        peft_config = method_config(cfg)
        base = self.parts.model
        if t.gradient_checkpointing and hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable()
        self.model = get_peft_model(base, self.parts.with_heads(peft_config))  # the PeftModel hooks see
        self.labelled_items = self.parts.encode_all(data.train)
        self.val_items = self.parts.encode_all(data.validation)
        self.train_items = self.labelled_items
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if t.batch_size % self.world:
            raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the {self.world} processes")
        self.metric = self.parts.metric
        self.higher_better = metric_direction(self.metric)
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.reference = {n: p.detach().clone() for n, p in self.named} if t.l2sp else {}  # L2-SP's anchor: a copy of the trained parameters only
        self.wrapped = self.accelerator.prepare(self.model)  # what the steps call (DDP across processes)
        self.hooks = _hooks(cfg)
        self.state = RunState()
        self.rng = _rng_state()  # as of the last optimiser step: what a checkpoint restores
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.round_steps = 0
        self.eval_every = 1
        self.micro_losses: list[torch.Tensor] = []  # losses of the micro-batches of a step not yet taken
        self.saved_at = time.monotonic()
        self.interrupts = Interrupts()
        self.out = cfg.output_dir
        self.progress = _Progress(self.main and not quiet, self.task.unit)

    # -- the TrainingContext of hooks --------------------------------------------------------
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def total_steps(self) -> int:
        """The step the current round ends at."""
        return self.state.round_start + self.round_steps

    def batches(self, count: int) -> Iterator[Any]:
        """The first ``count`` training batches of the first epoch (this process's shard)."""
        order = batch_order([self.task.length(i) for i in self.train_items], self.cfg.train.batch_size, self.cfg.train.seed, 0,
                            self.cfg.train.group_by_length)
        for batch_ids in order[:count]:
            yield self.collate_shard(batch_ids)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.task.loss(model, batch)

    def log(self, message: str) -> None:
        if self.main and not self.quiet:
            self.progress.close()
            print(message)

    # -- helpers for extensions ---------------------------------------------------------------
    @torch.no_grad()
    def class_probabilities(self, records: list[dict[str, Any]]) -> torch.Tensor:
        """``(records, classes)`` probabilities the current model gives (every process computes
        all of them, so every process reaches the same decisions)."""
        items = self.parts.encode_all(records)
        was_training = self.model.training
        self.model.eval()
        out = []
        size = self.cfg.train.eval_batch_size
        for start in range(0, len(items), size):
            batch = to_device(self.parts.collate(items[start : start + size]), self.accelerator.device)
            out.append(self.task.class_probabilities(self.model, batch).cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, len(self.labels or []))

    def collate_shard(self, batch_ids: list[int]) -> Any:
        return to_device(self.collate_shard_on_host(batch_ids), self.accelerator.device)

    def collate_shard_on_host(self, batch_ids: list[int]) -> Any:
        """This process's shard of the batch ``batch_ids``, collated, before it moves to the device."""
        shard = batch_ids[self.rank * len(batch_ids) // self.world : (self.rank + 1) * len(batch_ids) // self.world]
        return self.parts.collate([self.train_items[i] for i in shard])

    def use_records(self, extra: list[dict[str, Any]]) -> None:
        """Trains on the labelled records plus ``extra`` from now on."""
        self.state.extra_records = extra
        self.train_items = self.labelled_items + self.parts.encode_all(extra)


def cpu_threads(wanted: int | None) -> int:
    """The CPU threads a run uses: ``wanted``; else ``OMP_NUM_THREADS`` when set; else the
    cores this process may use less those other processes keep busy (the 1-minute load
    average), at least one. Threads beyond the idle cores spin against the other processes:
    on a loaded 2-core machine two threads trained several times slower than one."""
    if wanted:
        return wanted
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


def _hooks(cfg: RunConfig) -> list[TrainingHooks]:
    """The method's training hooks, then each configured extension's, in config order."""
    hooks: list[TrainingHooks] = []
    method, _, _ = split_method(cfg)
    if method.training_hooks is not None:
        made = method.training_hooks(method_config(cfg), method_training_options(cfg))
        if made is not None:
            hooks.append(made)
    for key, options in cfg.extensions.items():
        hooks.append(EXTENSIONS.get(key).setup(options))
    return hooks


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tunes the configured model with the configured method; writes the output folder.

    Args:
        resume: continue from the folder's checkpoint (refused when the checkpoint's config
            differs from ``cfg`` in a setting that changes results).
        overwrite: start afresh in a folder that holds another run, deleting its files.

    Returns:
        The run summary (also written to ``summary.json``), or ``{"interrupted": True, ...}``
        when Ctrl-C or SIGTERM stopped it (a checkpoint was written; continue with ``resume``).
    """
    log = (lambda *a: None) if quiet else print
    prepare_output_dir(cfg, resume, overwrite, log)
    run = Run(cfg, quiet)
    saved = _read_checkpoint(run) if resume else None
    if resume and saved is None:
        run.log("no checkpoint found; starting from the beginning")
    if saved is not None and run.state.finished:
        run.log(f"the run in {cfg.output_dir} has finished; nothing to resume")
        with open(os.path.join(cfg.output_dir, "summary.json"), encoding="utf-8") as fh:
            return json.load(fh)
    _start_round(run, run.state.round_epochs)
    for hook, state in zip(run.hooks, run.state.hooks.get("list", []), strict=False):
        hook.load_state_dict(state)
    run_hooks(run.hooks, "before_training", run)
    if saved is not None:
        _restore(run, saved)
        run.log(f"resumed from step {run.state.step}")
    _open_metrics(run, resumed=saved is not None)
    try:
        with handle_interrupts() as run.interrupts:
            if run.state.metric_before is None and run.val_items:
                run.state.metric_before = _evaluate(run)
                run.log(f"before training: {format_metrics(run.state.metric_before)}")
            if run.state.pending_eval:  # interrupted during an evaluation: make it now
                _evaluate_and_select(run)
                _save_checkpoint(run)
            while True:
                _train_round(run)
                if not _next_round(run):
                    break
            _return_freed_memory()
            with run.interrupts.deferred():
                return _finish(run)
    except KeyboardInterrupt:
        if run.state.finished:  # the stop came while the run was finishing, which it did
            with open(os.path.join(cfg.output_dir, "summary.json"), encoding="utf-8") as fh:
                return json.load(fh)
        run.log("interrupted: saving a checkpoint (continue with --resume)")
        _save_checkpoint(run)
        return {"interrupted": True, "step": run.state.step}
    except torch.OutOfMemoryError as exc:
        _save_checkpoint(run)
        limits = [f"train.batch_size={cfg.train.batch_size}"]
        if hasattr(cfg.model, "max_length"):
            limits.append(f"model.max_length={cfg.model.max_length}")
        raise ConfigError(f"out of memory at step {run.state.step} with {' and '.join(limits)}: lower them (train.grad_accum "
                          "keeps the global batch; train.gradient_checkpointing saves activations). A checkpoint of "
                          f"step {run.state.step} was written: continue with --resume ({str(exc).splitlines()[0]})") from exc


def _start_round(run: Run, epochs: float | None = None) -> None:
    """A fresh optimiser and learning-rate schedule over the current training records, for
    ``epochs`` (default ``train.epochs``) or ``train.max_steps``."""
    t = run.cfg.train
    batches_per_epoch = math.ceil(len(run.train_items) / t.batch_size)
    if batches_per_epoch < t.grad_accum:
        raise ConfigError(f"the training data make {batches_per_epoch} batches of {t.batch_size}, fewer than "
                          f"train.grad_accum={t.grad_accum}: no optimiser step could be taken; lower train.grad_accum or "
                          "train.batch_size")
    steps_per_epoch = max(1, batches_per_epoch // t.grad_accum)
    run.round_steps = t.max_steps or max(1, int(round(steps_per_epoch * (t.epochs if epochs is None else epochs))))
    run.eval_every = t.eval_every or steps_per_epoch
    optimizer = torch.optim.AdamW(_param_groups(run.model, t.weight_decay), lr=t.lr)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(t.schedule, int(t.warmup_ratio * run.round_steps), run.round_steps))
    run.optimizer = run.accelerator.prepare(optimizer)


def _train_round(run: Run) -> None:
    """Epochs over the current records until the round's steps are taken (or early stopping)."""
    t, state = run.cfg.train, run.state
    lengths = [run.task.length(i) for i in run.train_items]
    run.wrapped.train()
    while state.step < run.total_steps and not state.stopped_early:
        order = batch_order(lengths, t.batch_size, t.seed, state.epoch, t.group_by_length)
        usable = len(order) - len(order) % t.grad_accum
        micro = state.batch
        for batch_ids in order[micro:usable]:
            micro += 1
            boundary = micro % t.grad_accum == 0
            loss = _train_step(run, batch_ids, sync=boundary)
            if not boundary:
                run.micro_losses.append(loss)
                continue
            with run.interrupts.deferred():  # the step and its bookkeeping happen whole or not at all
                _optimizer_step(run)
                state.batch = micro
                state.loss_window += [*run.micro_losses, loss]
                run.micro_losses = []
                _log_step(run)
                state.pending_eval = bool(run.val_items) and _eval_due(run)
            _after_step(run)
            if state.step >= run.total_steps or state.stopped_early:
                return
        state.epoch += 1
        state.batch = 0


def _return_freed_memory() -> None:
    """Hands the C heap's free pages back to the system once training is over (glibc's
    ``malloc_trim``; nothing elsewhere). The allocator keeps the pages of the steps' freed
    activations (the resident set stays at the training peak), so what the run allocates
    afterwards (the summary, the final evaluation, the plot: importing matplotlib alone takes
    ~20 MiB) would lie on top of that peak and raise it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _train_step(run: Run, batch_ids: list[int], sync: bool) -> torch.Tensor:
    """Forward and backward on one micro-batch; returns its loss, detached and not read: on a
    GPU, reading it (or counting the batch's tokens on the device) would make the host wait for
    the device at every micro-batch instead of queueing the next one."""
    tick = time.perf_counter()
    host_batch = run.collate_shard_on_host(batch_ids)
    batch = to_device(host_batch, run.accelerator.device)
    with run.accelerator.no_sync(run.wrapped) if not sync else nullcontext(), run.accelerator.autocast():
        loss = run.task.loss(run.wrapped, batch)
        reg = _regulariser(run.named, run.reference, run.cfg)
        run.accelerator.backward((loss + reg if reg is not None else loss) / run.cfg.train.grad_accum)
    run.state.units += run.task.units(host_batch) * run.world  # after the loss: a task may count what it generated
    run.state.train_seconds += time.perf_counter() - tick
    return loss.detach()


def _optimizer_step(run: Run) -> None:
    tick = time.perf_counter()
    t = run.cfg.train
    if t.max_grad_norm:
        run.accelerator.clip_grad_norm_([p for _, p in run.named], t.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.state.step += 1
    run_hooks(run.hooks, "after_optimizer_step", run)
    run.optimizer.zero_grad(set_to_none=True)
    run.rng = _rng_state()
    run.state.train_seconds += time.perf_counter() - tick


def _eval_due(run: Run) -> bool:
    step = run.state.step
    return (step - run.state.round_start) % run.eval_every == 0 or step == run.total_steps


def _log_step(run: Run) -> None:
    """The training row of ``metrics.jsonl`` when one is due: the mean loss since the last."""
    state, step, end = run.state, run.state.step, run.total_steps
    if step % run.cfg.train.log_every == 0 or step == end:
        tick = time.perf_counter()
        losses, state.loss_window = _read_losses(state.loss_window), []  # the host waits for the device here
        state.train_seconds += time.perf_counter() - tick  # the steps' device time that it waited for
        lr = run.scheduler.get_last_lr()[0]
        rate = state.units / max(state.train_seconds, 1e-9)
        row = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, f"{run.task.unit}_per_second": rate}
        _record(run, {**row, **run.task.train_metrics()})
        own = state.history[-1]
        run.progress.show(step, end, own["loss"], lr, rate, {k: own[k] for k in run.task.progress_metrics if k in own})


def _read_losses(values: list[Any]) -> list[float]:
    """Losses as floats (detached loss tensors read from their device)."""
    return [float(v) for v in values]


def _after_step(run: Run) -> None:
    """Evaluation (and the best adapter), checkpoints, early stopping."""
    t, state = run.cfg.train, run.state
    step = state.step
    minutes = t.checkpoint_minutes
    if state.pending_eval:
        _evaluate_and_select(run)
        _save_checkpoint(run)
    elif (t.checkpoint_every and step % t.checkpoint_every == 0) or (minutes and time.monotonic() - run.saved_at >= 60 * minutes):
        _save_checkpoint(run)


def _evaluate(run: Run) -> dict[str, float]:
    result = run.parts.evaluate(run.model, run.val_items, run.accelerator)
    run.wrapped.train()
    return result


def _evaluate_and_select(run: Run) -> None:
    state = run.state
    result = _evaluate(run)
    value = result[run.metric]
    better = state.best is None or (value > state.best if run.higher_better else value < state.best)
    with run.interrupts.deferred():  # the row, the best adapter and the state change together
        _record(run, {"step": state.step, **result})
        if better:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            _save_adapter(run)
        else:
            state.bad_evals += 1
        state.pending_eval = False
    run.log(f"step {state.step}: {format_metrics(result)}" + ("  (best)" if better else ""))
    patience = run.cfg.train.early_stopping_patience
    if patience and state.bad_evals >= patience:
        run.log(f"early stopping: {run.metric} did not improve in {state.bad_evals} evaluations")
        state.stopped_early = True


def _next_round(run: Run) -> bool:
    """Asks the extensions for another round; starts it when one hands over records."""
    for hook in run.hooks:
        ask = getattr(hook, "next_round", None)
        records = ask(run) if ask is not None else None
        if records is not None:
            state = run.state
            run.use_records(records)
            state.round += 1
            state.round_start, state.stopped_early, state.bad_evals = state.step, False, 0
            state.round_epochs = hook.round_epochs()
            _start_round(run, state.round_epochs)
            run.log(f"round {state.round + 1}: {len(run.labelled_items)} labelled + {len(records)} added records, "
                    f"{run.round_steps} steps")
            _save_checkpoint(run)
            return True
    return False


def _finish(run: Run) -> dict[str, Any]:
    state = run.state
    changed = any(run_hooks(run.hooks, "after_training", run))
    if changed:  # a hook changed the model at the end (e.g. cut it to a budget): that is the result
        state.best_step = state.step
        if run.val_items:
            _record(run, {"step": state.step, **_evaluate(run)})
        _save_adapter(run)
    elif not run.val_items or state.best is None:
        _save_adapter(run)
    state.finished = True
    _save_checkpoint(run)
    summary = run_summary(run)
    if run.main:
        import yaml

        atomic_write_text(os.path.join(run.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        atomic_write_text(os.path.join(run.out, "config.yaml"), yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
        plot_history(state.history, os.path.join(run.out, "training_curve.png"), run.metric, state.metric_before)
        run.log(summary_table(summary))
    return summary


# -- files -------------------------------------------------------------------------------------
def _record(run: Run, row: dict[str, Any]) -> None:
    """One row of ``metrics.jsonl`` (and of the run's history)."""
    run.state.history.append(row)
    if run.main:
        with open(os.path.join(run.out, "metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def _open_metrics(run: Run, resumed: bool) -> None:
    """``metrics.jsonl`` as of the run's state: empty for a new run; on resume, the rows up to
    the checkpoint (rows written after it are written again as the steps are replayed)."""
    if not run.main:
        return
    os.makedirs(run.out, exist_ok=True)
    atomic_write_text(os.path.join(run.out, "labels.json"), json.dumps(run.labels) + "\n")
    rows = run.state.history if resumed else []
    atomic_write_text(os.path.join(run.out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def _save_adapter(run: Run) -> None:
    if run.main:
        directory = os.path.join(run.out, "adapter")
        run.model.save_pretrained(directory)
        run.task.after_save(run.model, directory, run.cfg)


def _save_checkpoint(run: Run) -> None:
    """Trainable weights, optimiser, schedule, random state (as of the last step) and the run
    state, written to a temporary folder and swapped in."""
    with run.interrupts.deferred():
        _write_checkpoint(run)
    run.saved_at = time.monotonic()
    run.accelerator.wait_for_everyone()


def _write_checkpoint(run: Run) -> None:
    if run.main:
        run.state.hooks = {"list": [h.state_dict() for h in run.hooks]}
        run.state.loss_window = _read_losses(run.state.loss_window)  # a checkpoint holds numbers, not device tensors
        path = os.path.join(run.out, CHECKPOINT)
        os.makedirs(run.out, exist_ok=True)
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        trainable = {n: p.detach().cpu() for n, p in run.model.named_parameters() if p.requires_grad}
        save_tensors(os.path.join(tmp, "trainable.safetensors"), trainable)
        torch.save({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": run.rng,
                    "state": dataclasses.asdict(run.state), "config": run.cfg.to_dict()}, os.path.join(tmp, "state.pt"))
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)  # left by a save killed (kill -9) before it removed it
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(run: Run) -> dict[str, Any] | None:
    """The checkpoint of the run's folder, or None; sets the run's state and records from it."""
    path = checkpoint_path(run.out)
    if path is None:
        return None
    from safetensors.torch import load_file

    blob = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    blob["trainable"] = load_file(os.path.join(path, "trainable.safetensors"))
    run.state = RunState(**blob["state"])
    if run.state.extra_records:
        run.use_records(run.state.extra_records)
    return blob


def _restore(run: Run, blob: dict[str, Any]) -> None:
    params = dict(run.model.named_parameters())
    with torch.no_grad():
        for name, value in blob["trainable"].items():
            params[name].copy_(value)
    run.optimizer.load_state_dict(blob["optimizer"])
    run.scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    run.rng = blob["rng"]
