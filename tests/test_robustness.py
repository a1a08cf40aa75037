"""Files survive crashes and other users; bad configs and files give errors that name the
problem and the fix."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.core.io import atomic_write_text
from peftkit.core.registry import all_methods

SRC = Path(__file__).resolve().parents[1] / "src"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def lora_model(r: int = 2, seed: int = 1) -> PeftModel:
    model = get_peft_model(mlp(), LoraConfig(r=r, target_modules=["0", "2"], init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def leftovers(parent: Path) -> list[str]:
    """Entries of ``parent`` that peftkit's own temporary names would leave."""
    return sorted(p.name for p in parent.iterdir() if ".peftkit-" in p.name)


# -- 1. save_pretrained replaces the whole folder at once ---------------------------------
def test_a_save_that_fails_midway_leaves_the_old_adapter_loadable(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    old = lora_model(r=2)
    old.save_pretrained(target)
    want = output(old)

    def crash(self, directory):  # the weights are written by now, the config is not
        raise OSError("disk full")

    monkeypatch.setattr(PeftConfig, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        lora_model(r=4, seed=2).save_pretrained(target)
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(mlp(), target)
    assert loaded.peft_config["default"].r == 2
    torch.testing.assert_close(output(loaded), want)
    assert leftovers(tmp_path) == []  # a failure that was caught cleans up after itself


_KILLED_SAVE = """
import os, signal, sys
import torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_robustness import lora_model
from peftkit import PeftConfig

def die(self, directory):
    os.kill(os.getpid(), signal.SIGKILL)

PeftConfig.save_pretrained = die
lora_model(r=4, seed=2).save_pretrained({target!r})
"""


def test_a_killed_save_leaves_the_old_adapter_and_the_next_save_clears_its_leftovers(tmp_path):
    target = tmp_path / "adapter"
    old = lora_model(r=2)
    old.save_pretrained(target)
    (tmp_path / ".adapter.tmp").write_text("a user's file")  # not ours: never touched
    want = output(old)
    script = _KILLED_SAVE.format(tests=str(Path(__file__).parent), target=str(target))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    loaded = PeftModel.from_pretrained(mlp(), target)
    assert loaded.peft_config["default"].r == 2
    torch.testing.assert_close(output(loaded), want)
    assert leftovers(tmp_path), "the killed save should have left its temporary folder"

    lora_model(r=4, seed=2).save_pretrained(target)
    assert leftovers(tmp_path) == []
    assert (tmp_path / ".adapter.tmp").read_text() == "a user's file"
    assert PeftModel.from_pretrained(mlp(), target).peft_config["default"].r == 4


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_without_an_atomic_exchange_the_old_folder_is_renamed_aside(tmp_path, monkeypatch):
    import peftkit.core.io as io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # file systems without renameat2
    target = tmp_path / "adapter"
    lora_model(r=2).save_pretrained(target)
    lora_model(r=4).save_pretrained(target)
    assert PeftConfig.from_pretrained(target).r == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_save_killed_between_its_renames_gets_the_old_folder_back(tmp_path):
    old = lora_model(r=2)
    old.save_pretrained(tmp_path / "adapter")
    parked = tmp_path / f".adapter.peftkit-old-{_dead_pid()}-0123abcd"
    (tmp_path / "adapter").rename(parked)  # where the fallback swap was when it was killed
    (tmp_path / "adapter.tokenizer.json").write_text("{}")
    (parked / "tokenizer.json").write_text("{}")
    lora_model(r=4).save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.tokenizer.json"]
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()  # the old folder's other files are kept
    assert PeftConfig.from_pretrained(tmp_path / "adapter").r == 4


def test_a_running_saves_temporary_folder_is_left_alone(tmp_path):
    running = tmp_path / f".adapter.peftkit-tmp-{os.getppid()}-0123abcd"
    running.mkdir()
    lora_model().save_pretrained(tmp_path / "adapter")
    assert running.is_dir()


def test_saving_again_keeps_other_files_and_adapters_in_the_folder(tmp_path):
    target = tmp_path / "out"
    model = lora_model()
    model.add_adapter("other", LoraConfig(r=3, target_modules=["0"]))
    model.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")  # what a trainer writes beside the adapter
    (target / "other" / "notes.txt").write_text("mine")
    model.save_pretrained(target, selected_adapters=["default"])
    assert (target / "tokenizer.json").read_text() == "{}"
    assert (target / "other" / "notes.txt").read_text() == "mine"
    assert PeftConfig.from_pretrained(target / "other").r == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saving_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    model = lora_model()
    model.save_pretrained(".")
    model.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), tmp_path / "here")
    assert Path("adapter_config.json").is_file()


def test_saving_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    model = lora_model()
    model.save_pretrained(tmp_path / "link")
    model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "adapter_model.safetensors").is_file()


# -- 2. peftkit merge --------------------------------------------------------------------
def _fake_run(monkeypatch):
    import peftkit.cli as cli

    run = SimpleNamespace(processor=None)
    monkeypatch.setattr(cli, "_load_run", lambda run_dir: (run, lora_model()))


def test_merge_leaves_the_users_tmp_folder_alone(tmp_path, monkeypatch):
    from peftkit.cli import main

    _fake_run(monkeypatch)
    mine = tmp_path / "merged.tmp"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    assert (mine / "keep.txt").read_text() == "mine"
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.tmp"]


def test_a_failed_merge_removes_only_what_it_wrote(tmp_path, monkeypatch):
    import peftkit.cli as cli

    _fake_run(monkeypatch)
    (tmp_path / "merged.tmp").mkdir()

    def fail(model, path):
        Path(path, "part").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(cli, "_save_model", fail)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.tmp"]


# -- 3. files honour the umask -----------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "note.txt", "x")
        model = lora_model()
        model.add_adapter("other", LoraConfig(r=3, target_modules=["0"]))
        model.save_pretrained(tmp_path / "adapter")
        model.save_pretrained(tmp_path / "adapter")  # a save over an existing folder, too
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "note.txt") == file_mode
    for folder in (tmp_path / "adapter", tmp_path / "adapter" / "other"):
        assert _mode(folder) == dir_mode, folder
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            assert _mode(folder / name) == file_mode, folder / name


def test_merge_output_honours_the_umask(tmp_path, monkeypatch):
    from peftkit.cli import main

    _fake_run(monkeypatch)
    previous = os.umask(0o022)
    try:
        assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "merged") == 0o755


# -- 4. clear errors ---------------------------------------------------------------------
@pytest.mark.parametrize(("content", "problem"), [
    (b"[1, 2]", "a JSON list"),
    (b'"LORA"', "a JSON string"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"r": 4}', "no peft_type"),
])
def test_a_bad_adapter_config_names_the_file_and_the_problem(tmp_path, content, problem):
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=problem) as err:
        PeftConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(err.value)
    with pytest.raises(ValueError, match=problem):
        PeftModel.from_pretrained(mlp(), tmp_path)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_patterns_must_be_mappings(field):
    with pytest.raises(TypeError, match=rf"{field} must be a mapping .*got str"):
        LoraConfig(**{field: "q_proj:4"})


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_4", "pissa_niter_0"])
def test_implemented_inits_are_accepted(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize("init", ["olora", "orthogonal", "loftq", "eva", "corda"])
def test_inits_peft_has_and_peftkit_lacks_say_so(init):
    with pytest.raises(NotImplementedError, match=rf"init_lora_weights={init!r}"):
        LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize("init", ["pissa_garbage", "pissa_niter_", "pissa_niter_-1", "gauss", "", 1, None])
def test_unknown_inits_list_the_valid_ones(init):
    with pytest.raises(ValueError, match=r"init_lora_weights .*'gaussian'.*'pissa_niter_<n>'"):
        LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize("kwargs", [
    {"alpha_pattern": {"0": -4}},
    {"alpha_pattern": {"0": 0}},
    {"alpha_pattern": {"0": "big"}},
    {"lora_alpha": 0},
    {"lora_alpha": -8},
    {"lora_alpha": float("nan")},
])
def test_alphas_must_be_positive(kwargs):
    with pytest.raises(ValueError, match="must be a positive number"):
        LoraConfig(**kwargs)


def test_a_rank_above_a_layers_smaller_dimension_warns_naming_the_layer():
    with pytest.warns(UserWarning, match=r"^2: r=6 .* smaller dimension \(4\)"):
        get_peft_model(mlp(), LoraConfig(r=6, target_modules=["0", "2"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(mlp(), LoraConfig(r=4, target_modules=["0", "2"]))


def test_pissa_with_a_rank_above_a_layers_smaller_dimension_is_refused_before_any_change():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^2: init_lora_weights='pissa' .* r=6 .* 4"):
        get_peft_model(model, LoraConfig(r=6, target_modules=["0", "2"], init_lora_weights="pissa"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_saving_with_no_adapter_left_is_an_error(tmp_path):
    model = lora_model()
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter to save"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_misspelt_config_field_suggests_the_right_one():
    with pytest.raises(TypeError, match=r"LoraConfig got an unexpected keyword argument 'lora_alfa'; did you mean 'lora_alpha'\?"):
        LoraConfig(lora_alfa=8)
    with pytest.raises(TypeError, match=r"'zzz'.*fields are"):
        LoraConfig(zzz=1)


@pytest.mark.parametrize("method", all_methods(), ids=lambda m: m.peft_type)
def test_every_config_class_suggests_the_closest_field(method):
    cls = method.config_cls
    name = max((f.name for f in dataclasses.fields(cls)), key=len)
    typo = name[:-2] + name[-1] + name[-2]  # last two letters swapped
    with pytest.raises(TypeError, match=rf"{cls.__name__} got an unexpected keyword argument '{typo}'; did you mean '{name}'\?"):
        cls(**{typo: 1})


def test_configs_still_copy_and_replace():
    import copy

    config = LoraConfig(r=4)
    assert copy.deepcopy(config) == config
    assert dataclasses.replace(config, r=2).r == 2
    with pytest.raises(TypeError, match="did you mean 'r'"):
        dataclasses.replace(config, rr=2)
