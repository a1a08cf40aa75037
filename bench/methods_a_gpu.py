"""Checks and measures (IA)³, BitFit, LN tuning, layer-wise and full fine-tuning on an accelerator.

On a config-built Llama-style model (bf16 weights, or float32 with --dtype float32) each
method is wrapped, checked (output unchanged at init, a training step lowers the loss,
save/load reproduces outputs, disabling gives the base output where the method can,
merge keeps the output) and timed: median step time and peak memory over interleaved
runs, with ratios against full fine-tuning measured in the same run.

    PYTHONPATH=src python bench/methods_a_gpu.py [--hidden 1024 --layers 8 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from peftkit import (
    BitFitConfig,
    FullFineTuningConfig,
    IA3Config,
    LayerwiseConfig,
    LNTuningConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
)


def build(hidden: int, layers: int, dtype: torch.dtype, device: str, bias: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=8000, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512, attention_bias=bias, mlp_bias=bias,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


CONFIGS = {
    "full": lambda: FullFineTuningConfig(keep_original=True),
    "layerwise_top2": lambda: LayerwiseConfig(top_layers=2, keep_original=True),
    "lora_r8": lambda: LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "ia3": lambda: IA3Config(),
    "bitfit": lambda: BitFitConfig(),
    "ln_tuning": lambda: LNTuningConfig(),
}


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def check(name: str, base: torch.nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(copy.deepcopy(base), CONFIGS[name]())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected), f"{name}: output changed at init"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3 if name in ("full", "layerwise_top2") else 1e-2)
    first = loss_of(model, ids)
    for _ in range(5):
        loss = loss_of(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = loss_of(model, ids)
    assert last.item() < first.item(), f"{name}: loss {first.item():.4f} -> {last.item():.4f}"
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, expected), f"{name}: disable is not the base"
        assert torch.equal(model(input_ids=ids).logits, trained), f"{name}: re-enabled output differs"
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), d)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, trained), f"{name}: reload differs"
    model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    diff = (merged.float() - trained.float()).abs().max().item()
    scale = trained.float().abs().max().item()
    print(f"  {name:15s} checks passed; loss {first.item():.3f} -> {last.item():.3f}; merged max|diff| {diff:.2e} (of {scale:.1f})")


def time_steps(name: str, base: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[list[float], int, int]:
    model = get_peft_model(copy.deepcopy(base), CONFIGS[name]())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    trainable = model.get_nb_trainable_parameters()[0]
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
    return times[2:], peak, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, {args}")
    ids = torch.randint(0, 8000, (args.batch, args.seq), device=device)
    small = build(256, 2, torch.float32, device, bias=True)
    small_ids = ids[:2, :32]
    print("checks (float32, with biases):")
    for name in CONFIGS:
        check(name, small, small_ids)
    print(f"checks ({args.dtype}):")
    small_low = build(256, 2, dtype, device, bias=True)
    for name in CONFIGS:
        check(name, small_low, small_ids)
    if device != "cuda":
        return
    base = build(args.hidden, args.layers, dtype, device, bias=True)
    total = sum(p.numel() for p in base.parameters())
    print(f"timing: {total / 1e6:.1f}M parameters, {args.dtype}, batch {args.batch} x {args.seq}")
    results: dict[str, list[float]] = {n: [] for n in CONFIGS}
    peaks: dict[str, int] = {}
    counts: dict[str, int] = {}
    for _ in range(args.rounds):  # interleaved rounds
        for name in CONFIGS:
            times, peak, count = time_steps(name, base, ids, args.steps)
            results[name].extend(times)
            peaks[name] = max(peak, peaks.get(name, 0))
            counts[name] = count
    full_t = statistics.median(results["full"])
    full_m = peaks["full"]
    print(f"{'method':15s} {'trainable':>12s} {'share':>8s} {'step ms':>8s} {'vs full':>8s} {'peak GiB':>9s} {'vs full':>8s}")
    for name in CONFIGS:
        t = statistics.median(results[name])
        print(f"{name:15s} {counts[name]:12,d} {100 * counts[name] / total:7.3f}% {1000 * t:8.1f} {t / full_t:8.2f} "
              f"{peaks[name] / 2**30:9.2f} {peaks[name] / full_m:8.2f}")


if __name__ == "__main__":
    main()
