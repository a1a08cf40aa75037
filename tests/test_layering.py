"""DESIGN.md section 2: `peftkit`, its core and its methods need torch and safetensors
alone. A fresh interpreter imports them, wraps a plain nn.Module, trains a step, saves and
reloads, and none of the optional packages may have been imported on the way. In the
core-only job (make test-core) they are not even installed."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import peftkit

# what the library may use only behind peftkit.integrations, or only in peftkit.train
OPTIONAL = ("transformers", "accelerate", "bitsandbytes", "peft", "yaml", "matplotlib", "diffusers", "PIL")

SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    import torch
    from torch import nn

    import peftkit
    from peftkit import LoraConfig, PeftModel, get_peft_model

    for package in ("peftkit.core", "peftkit.methods"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            importlib.import_module(info.name)

    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    x = torch.randn(4, 8)
    model = get_peft_model(base(), LoraConfig(r=4, target_modules=["0", "2"]))
    before = model(x).detach()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):  # B starts at zero: the first step moves B, the second also A
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = model(x).detach()
    model.save_pretrained(sys.argv[1])
    reloaded = PeftModel.from_pretrained(base(), sys.argv[1]).eval()
    print(json.dumps({
        "version": peftkit.__version__,
        "changed": not torch.allclose(before, trained),
        "round_trip": torch.equal(reloaded(x), trained),
        "imported": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:])),
    }))
    """
)


def test_library_runs_on_a_plain_module_without_optional_packages(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "adapter"), *OPTIONAL],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    assert result["changed"] and result["round_trip"]
    assert result["version"] == peftkit.__version__
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_version_is_the_installed_distributions():
    """pyproject.toml holds the version; `peftkit.__version__` reads what the install recorded."""
    assert peftkit.__version__ == importlib.metadata.version("peftkit")
