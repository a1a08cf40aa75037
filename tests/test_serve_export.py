"""`peftkit export RUN --for vllm`: what vLLM's LoRA loader refuses is refused here with the fix,
and per-module scales are folded so that one global scale computes the same adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import tiny_llama  # noqa: E402
from peftkit import IA3Config, LoraConfig, get_peft_model  # noqa: E402
from peftkit.serve.vllm_export import export_for_vllm  # noqa: E402


def _base():
    torch.manual_seed(1)  # the same base weights every time
    return tiny_llama()


def _lora(tmp_path, **kwargs):
    model = get_peft_model(_base(), LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_patterns_are_folded_and_peft_computes_the_same(tmp_path):
    peft = pytest.importorskip("peft")
    model, folder = _lora(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 32})
    export = export_for_vllm(str(folder), str(tmp_path / "out"), name="mine")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["r"] == 8
    assert export.folded_modules == 4  # two layers × (down_proj by rank, v_proj by alpha)
    assert export.max_lora_rank == 8
    # A config-built model has no name to serve it by: the command says where it goes.
    assert export.command().startswith("vllm serve BASE_MODEL --enable-lora --lora-modules mine=")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    theirs = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "out")).eval()
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        got = theirs(input_ids=ids).logits
    assert (expected - _base()(input_ids=ids).logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # two libraries: float32 rounding only


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(r=4, target_modules=["q_proj"], bias="lora_only"), "biases"),
])
def test_what_vllm_refuses_is_refused_with_the_fix(tmp_path, kwargs, message):
    _, folder = _lora(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=message) as err:
        export_for_vllm(str(folder), str(tmp_path / "out"))
    assert "peftkit merge" in str(err.value) or "bias='none'" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_other_methods_are_sent_to_convert_and_the_cli_prints_the_command(tmp_path):
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="peftkit convert"):
        export_for_vllm(str(tmp_path / "ia3"), str(tmp_path / "out"))
    _, folder = _lora(tmp_path, r=16, target_modules=["q_proj"])
    out = subprocess.run([sys.executable, "-m", "peftkit.cli", "export", str(folder), "--for", "vllm",
                          "--out", str(tmp_path / "v")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"--lora-modules adapter={tmp_path / 'v'} --max-lora-rank 16" in out.stdout
