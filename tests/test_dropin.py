"""peftkit as a drop-in for Hugging Face PEFT at the public surface: transformers' Trainer,
the task and Auto classes, PEFT's arguments, status, errors and warnings. Each test states
the PEFT behaviour (from its documentation) it checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import peftkit
from models import MLP, tiny_bert, tiny_gpt2, tiny_llama
from peftkit import (
    AdapterStateError,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)

HERE = os.path.dirname(__file__)
X = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))


def _mlp_lora(**kw) -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False, **kw))


# --- transformers' Trainer ------------------------------------------------------------
def test_trainer_saves_and_reloads_the_adapter_with_peft_importable():
    """Trainer: save_model, checkpoints and load_best_model_at_end hold the adapter (and
    modules_to_save), never model.safetensors; resume_from_checkpoint and gradient
    checkpointing work; PeftModel.from_pretrained gives the same outputs."""
    pytest.importorskip("peft")
    from transformers import trainer_utils

    import trainer_roundtrip

    trainer_roundtrip.main()
    import peft  # peft's own models are still recognised

    peft_model = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, target_modules=["lin0"]))
    assert trainer_utils._is_peft_model(peft_model)
    assert not trainer_utils._is_peft_model(MLP())


def test_trainer_saves_and_reloads_the_adapter_without_peft():
    """The same, in a process where `import peft` fails (transformers then sees no peft)."""
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(peftkit.__path__[0]), HERE]))
    done = subprocess.run([sys.executable, os.path.join(HERE, "trainer_roundtrip.py"), "--hide-peft"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TRAINER ROUNDTRIP OK peft hidden" in done.stdout


# --- task classes, AutoPeftModel, model card -------------------------------------------
@pytest.mark.parametrize("task, cls", [
    ("CAUSAL_LM", "PeftModelForCausalLM"), ("SEQ_CLS", "PeftModelForSequenceClassification"),
    ("SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM"), ("TOKEN_CLS", "PeftModelForTokenClassification"),
    ("QUESTION_ANS", "PeftModelForQuestionAnswering"), ("FEATURE_EXTRACTION", "PeftModelForFeatureExtraction"),
    (None, "PeftModel"),
])
def test_task_type_picks_the_task_class(task, cls):
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], task_type=task))
    assert type(model).__name__ == cls and isinstance(model, PeftModel)


def test_auto_peft_model_loads_base_from_local_folder_and_adapter(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    model = PeftModelForCausalLM(base, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                                  init_lora_weights=False))
    assert model.peft_config["default"].base_model_name_or_path is None  # built from config: no name
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "peftkit" in card.split("---", 2)[2]
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, PeftModelForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=X).logits, model.eval()(input_ids=X).logits)
    with pytest.raises(ValueError, match="AutoPeftModelForCausalLM"):
        AutoPeftModel.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForCausalLM"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")


# --- PEFT's arguments -------------------------------------------------------------------
def test_safe_merge_refuses_non_finite_weights_and_leaves_the_model_as_it_was():
    model = _mlp_lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.base_model.model.lin1.lora_B["default"].weight[0, 0] = float("nan")
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights.*lin1"):
        model.merge_adapter(safe_merge=True)
    after = model.state_dict()
    assert all(torch.equal(after[k], broken[k]) or k.endswith("lora_B.default.weight") for k in after)
    assert not any(layer.merged for _, layer in peftkit.core.layer.adapter_layers(model))
    with pytest.raises(ValueError, match="NaNs"):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model.base_model.model.lin0, nn.Module) and hasattr(model.base_model.model.lin0, "base_layer")
    assert torch.equal(model.state_dict()["base_model.model.lin0.base_layer.weight"], before["base_model.model.lin0.base_layer.weight"])


def test_merge_when_all_merged_warns_and_does_nothing_and_merge_and_unload_arguments():
    model = _mlp_lora()
    with torch.no_grad():
        expected = model(X)
    model.merge_adapter(safe_merge=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    model.unmerge_adapter()
    merged = model.merge_and_unload(progressbar=False, safe_merge=True, adapter_names=["default"])
    assert not list(peftkit.core.layer.adapter_layers(merged))
    with torch.no_grad():
        torch.testing.assert_close(merged(X), expected, rtol=1e-5, atol=1e-6)


def test_load_adapter_returns_missing_and_unexpected_keys_and_overwrites_an_existing_name(tmp_path):
    model = _mlp_lora()
    model.save_pretrained(tmp_path)
    other = _mlp_lora()
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    result = other.load_adapter(tmp_path, "default")  # Trainer's load_best_model_at_end does this
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded, saved = get_peft_model_state_dict(other), get_peft_model_state_dict(model)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    result = other.load_adapter(tmp_path, "second", is_trainable=True, torch_device="cpu",
                                autocast_adapter_dtype=True, ephemeral_gpu_offload=False, low_cpu_mem_usage=False)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert any(p.requires_grad for _, layer in peftkit.core.layer.adapter_layers(other.get_base_model())
               for p in layer.adapter_parameters("second"))
    state = get_peft_model_state_dict(model)
    state["base_model.model.lin0.lora_A.weight"] = torch.zeros(5, 16)
    with pytest.raises(AdapterStateError) as err:  # a ValueError, and a RuntimeError as torch's size mismatch
        set_peft_model_state_dict(other, state)
    assert isinstance(err.value, RuntimeError) and "(5, 16)" in str(err.value)
    skipped = set_peft_model_state_dict(other, state, ignore_mismatched_sizes=True)
    assert skipped.skipped_keys == ["base_model.model.lin0.lora_A.weight"]


def test_save_pretrained_arguments(tmp_path):
    peft = pytest.importorskip("peft")
    model = _mlp_lora()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"]))
    model.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()
    model.save_pretrained(tmp_path / "bin", safe_serialization=False, selected_adapters=["default"],
                          save_embedding_layers="auto")
    assert sorted(os.listdir(tmp_path / "bin")) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    theirs = peft.PeftModel.from_pretrained(MLP(), tmp_path / "bin")  # PEFT reads the .bin file
    ours_state = get_peft_model_state_dict(model)
    theirs_state = peft.get_peft_model_state_dict(theirs)
    assert set(ours_state) == set(theirs_state)
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
    reloaded = PeftModel.from_pretrained(MLP(), tmp_path / "bin")
    assert all(torch.equal(v, ours_state[k]) for k, v in get_peft_model_state_dict(reloaded).items())


def test_get_peft_model_state_dict_and_inject_adapter_in_model_take_peft_arguments():
    model = _mlp_lora()
    full = model.state_dict()
    state = get_peft_model_state_dict(model, state_dict=full, adapter_name="default", save_embedding_layers=False)
    assert set(state) == {f"base_model.model.{m}.lora_{ab}.weight" for m in ("lin0", "lin1") for ab in "AB"}
    assert torch.equal(state["base_model.model.lin1.lora_B.weight"], full["base_model.model.lin1.lora_B.default.weight"])
    # The target modules come from the state dict's keys (lin1 only), not from target_modules.
    injected = inject_adapter_in_model(LoraConfig(r=2, target_modules=["lin0"]), MLP(), adapter_name="default",
                                       low_cpu_mem_usage=False,
                                       state_dict={k: v for k, v in state.items() if ".lin1." in k})
    assert hasattr(injected.lin1, "base_layer") and not hasattr(injected.lin0, "base_layer")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_low_precision_bases_train_with_float32_adapters(dtype, method):
    """autocast_adapter_dtype=True (PEFT's default): adapter weights in float32 on a
    float16/bfloat16 base; forward, backward and merge run without dtype errors."""
    config = {"lora": LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
              "dora": LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True),
              "ia3": IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])}[method]
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(dtype), config)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    out = model(input_ids=X, labels=X)
    assert out.logits.dtype == dtype
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.merge_adapter()
    model(input_ids=X)
    low = get_peft_model(tiny_llama().to(dtype), config, autocast_adapter_dtype=False)
    assert {p.dtype for p in low.parameters() if p.requires_grad} == {dtype}


# --- the tuner object, status, disable_adapter, all-linear, hub ---------------------------
def test_base_model_is_the_tuner_object_with_peft_methods():
    model = _mlp_lora()
    tuner = model.base_model
    assert tuner.model is model.get_base_model() and isinstance(tuner.model, MLP)
    assert tuner.peft_config is model.peft_config and tuner.active_adapters == ["default"]
    assert tuner.active_adapter == "default"
    assert tuner.targeted_module_names == model.targeted_module_names == ["lin0", "lin1"]
    model.add_adapter("b", LoraConfig(r=2, target_modules=["lin0"]))
    tuner.set_adapter("b")
    assert model.active_adapters == ["b"]
    with torch.no_grad():
        with_adapter = model(X)
        tuner.disable_adapter_layers()
        disabled = model(X)
        tuner.enable_adapter_layers()
        assert torch.equal(model(X), with_adapter)
        with model.disable_adapter():
            assert torch.equal(model(X), disabled)
    tuner.delete_adapter("b")
    assert list(model.peft_config) == ["default"]
    assert isinstance(tuner.merge_and_unload(), MLP)


def test_layer_and_model_status():
    model = _mlp_lora()
    layers = model.get_layer_status()
    assert [s.name for s in layers] == ["lin0", "lin1"]
    assert all(s.enabled and s.active_adapters == ["default"] and s.merged_adapters == [] for s in layers)
    assert layers[0].requires_grad == {"default": True} and layers[0].devices == {"default": ["cpu"]}
    model.base_model.model.lin0.merge()
    status = model.get_model_status()
    assert status.merged_adapters == "irregular" and status.num_adapter_layers == 2
    assert status.peft_types == {"default": "LORA"} and status.base_model_type == "MLP"
    assert status.trainable_params == model.get_nb_trainable_parameters()[0]


def test_disable_adapter_gives_base_outputs_and_freezes_the_adapter_inside_the_block():
    torch.manual_seed(0)
    base = MLP()
    with torch.no_grad():
        expected = base(X)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with model.disable_adapter():
        with torch.no_grad():
            assert torch.equal(model(X), expected)
        assert not any(p.requires_grad for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_all_linear_selects_what_peft_selects():
    peft = pytest.importorskip("peft")
    for build in (MLP, tiny_bert, tiny_gpt2):
        ours = get_peft_model(build(), LoraConfig(r=2, target_modules="all-linear"))
        theirs = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules="all-linear"))
        assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names), build.__name__


def test_push_to_hub_offline_fails_with_a_clear_message(monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="offline mode.*save_pretrained"):
        _mlp_lora().push_to_hub("someone/adapter")


# --- configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("lora_bias", True), ("layer_replication", [[0, 1]]),
                                          ("trainable_token_indices", [1, 2]), ("ensure_weight_tying", True),
                                          ("use_qalora", True),
                                          ("eva_config", {"rho": 2.0})])
def test_lora_fields_peft_has_are_accepted_at_default_and_refused_when_set(field, value):
    assert getattr(LoraConfig(), field) == getattr(pytest.importorskip("peft").LoraConfig(), field)
    with pytest.raises(NotImplementedError, match=f"LoraConfig.{field}="):
        LoraConfig(**{field: value})


def test_config_files_and_classes(tmp_path):
    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=3, target_modules=["lin0"], lora_alpha=6).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is a known LoraConfig field
        config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is LoraConfig and (config.r, config.lora_alpha) == (3, 6)
    assert LoraConfig.from_pretrained(tmp_path, r=5).r == 5
    data = PeftConfig.from_json_file(tmp_path / "adapter_config.json")
    assert data == json.loads((tmp_path / "adapter_config.json").read_text())
    config.save_pretrained(tmp_path / "ours")
    back = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert type(back).__name__ == "LoraConfig" and back.r == 3 and config.to_dict()["peft_type"] == "LORA"
    prompt = PromptTuningConfig(task_type="CAUSAL_LM")  # as in PEFT, no num_virtual_tokens needed yet
    assert prompt.is_prompt_learning and not config.is_prompt_learning
    with pytest.raises(ValueError, match="needs num_virtual_tokens"):
        get_peft_model(tiny_gpt2(), prompt)


# --- errors and warnings as PEFT's -------------------------------------------------------
def test_errors_and_warnings_of_peft():
    model = _mlp_lora()
    with pytest.raises(ValueError, match="no adapter named"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named"):
        model.delete_adapter("nope")
    with pytest.warns(UserWarning, match="modify a model with PEFT for a second time"):
        get_peft_model(model.get_base_model(), LoraConfig(r=2, target_modules=["head"]), adapter_name="x")
    biased = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="bias"):
        biased.add_adapter("second", LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(NotImplementedError, match="mixed"):
        get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"]), mixed=True)


def test_modules_to_save_accept_keyword_only_calls():
    class KeywordHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(input=self.body(x))

    torch.manual_seed(0)
    model = get_peft_model(KeywordHead(), LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))
    model(torch.randn(2, 4)).sum().backward()
    assert model.base_model.model.head.modules_to_save["default"].weight.grad is not None


def test_deep_names_of_the_porting_guide():
    """The classes ported code checks with isinstance, and peft.utils' helpers."""
    from peftkit import utils

    model = _mlp_lora(modules_to_save=["head"])
    inner = model.get_base_model()
    assert isinstance(model.base_model, peftkit.BaseTuner)
    assert isinstance(inner.lin0, peftkit.LoraLayer) and isinstance(inner.lin0, peftkit.BaseTunerLayer)
    assert isinstance(inner.head, utils.ModulesToSaveWrapper)
    parent, target, name = utils._get_submodules(inner, "lin0")
    assert parent is inner and target is inner.lin0 and name == "lin0"
    if torch.cuda.is_available():
        assert utils.infer_device() == "cuda"
    elif not torch.backends.mps.is_available():
        assert utils.infer_device() in ("cpu", "xpu", "npu", "mlu")
    assert utils.get_peft_model_state_dict is get_peft_model_state_dict
    with pytest.raises(AttributeError):
        utils._get_submodules(inner, "lin9")


def test_copies_and_pickles_keep_the_tuner_object_bound_to_its_own_model():
    import copy
    import io

    model = _mlp_lora()
    model.add_adapter("b", LoraConfig(r=2, target_modules=["lin0"]))
    clone = copy.deepcopy(model)
    clone.base_model.set_adapter("b")
    assert clone.active_adapters == ["b"] and model.active_adapters == ["default"]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    restored.base_model.set_adapter("b")
    assert restored.active_adapters == ["b"] and model.active_adapters == ["default"]


def test_from_pretrained_picks_the_task_class_and_maps_keys(tmp_path):
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"], task_type="CAUSAL_LM",
                                             init_lora_weights=False), revision="v1")
    assert model.peft_config["default"].revision == "v1"
    model.save_pretrained(tmp_path)
    assert type(PeftModel.from_pretrained(MLP(), tmp_path)) is PeftModelForCausalLM

    class Renamed(MLP):  # the same layers under another name
        def __init__(self) -> None:
            super().__init__()
            self.first = self.lin0
            del self.lin0

        def forward(self, x):
            return self.head(self.relu(self.lin1(self.relu(self.first(self.emb(x).mean(1))))))

    config = PeftConfig.from_pretrained(tmp_path)
    config.target_modules = ["first"]
    loaded = PeftModel.from_pretrained(Renamed(), tmp_path, config=config, key_mapping={r"^lin0\.": "first."})
    assert torch.equal(loaded.base_model.model.first.lora_B["default"].weight,
                       model.base_model.model.lin0.lora_B["default"].weight)


def test_adalora_has_peft_fields_too():
    peft = pytest.importorskip("peft")
    assert peftkit.AdaLoraConfig(total_step=10).use_rslora is peft.AdaLoraConfig(total_step=10).use_rslora is False
    with pytest.raises(NotImplementedError, match="AdaLoraConfig.lora_bias="):
        peftkit.AdaLoraConfig(total_step=10, lora_bias=True)
    with pytest.raises(ValueError, match="does not support DoRA"):  # as PEFT
        peftkit.AdaLoraConfig(total_step=10, use_dora=True)
