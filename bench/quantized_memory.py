"""Weight memory and LoRA-step peak memory on float32, 8-bit and NF4 (double-quantised) bases.

    python bench/quantized_memory.py                 # CPU, both models, writes bench/quantized_memory.json
    python bench/quantized_memory.py --device cuda   # on a GPU (peak = torch.cuda.max_memory_allocated)

Each (model, mode) runs in a fresh subprocess. On CPU the peak is the process's peak
resident memory (VmHWM, reset just before the measured step, with glibc's mmap threshold
fixed at 128 KiB so that freed tensors leave the resident set) — it includes the weights,
activations, gradients and optimiser state, and the Python/torch runtime (reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C

MODELS = C.MODELS
# -gc: gradient checkpointing; -ce: the loss computed in chunks (peftkit.chunked_causal_lm_loss)
MODES = ("fp32", "int8", "nf4", "fp32-gc", "nf4-gc", "fp32-gc-ce", "nf4-gc-ce")


def _vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def one(name: str, mode: str, device: str) -> dict:
    import transformers

    from peftkit import LoraConfig, get_peft_model, memory_report, quantize_model

    transformers.logging.set_verbosity_error()
    runtime = _vm("VmRSS")  # the interpreter, torch and transformers, before any model exists
    model = C.build_model(name, seed=0)
    linear_fp32 = sum(m.weight.numel() * 4 for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in ("lm_head", "classifier"))
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    model.to(device)  # quantise where the model runs: 8-bit statistics do not follow a later .to()
    precision, *extras = mode.split("-")
    if precision != "fp32":
        quantize_model(model, bits=4 if precision == "nf4" else 8, quant_type="nf4", double_quant=True, compute_dtype=compute)
    report = memory_report(model)
    if "gc" in extras:  # the QLoRA recipe: checkpointed blocks, inputs that require grad
        from peftkit import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, gradient_checkpointing=True)
    targets = ["query", "key", "value", "dense"] if name == "minilm" else "all-linear"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="SEQ_CLS" if name == "minilm" else "CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = 30522 if name == "minilm" else 32000
    ids = torch.randint(5, vocab, (2, 256), device=device)
    labels = torch.tensor([0, 1], device=device) if name == "minilm" else ids
    model.train()

    def step() -> float:
        if "ce" in extras:
            from peftkit import chunked_causal_lm_loss

            loss = chunked_causal_lm_loss(model, ids, labels, chunk_size=128)
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # optimiser state exists from here on
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Memory freed by building the float model and quantising it stays in the C heap
        # until trimmed; without this the peak would count it as in use.
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    loss = step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _vm("VmHWM")
    quant = report["quantized_bytes"]
    return {"model": name, "mode": mode, "device": device, "linear_fp32_bytes": linear_fp32,
            "linear_bytes": quant if precision != "fp32" else linear_fp32, "frozen_bytes": report["frozen_bytes"],
            "step_peak_bytes": peak, "runtime_bytes": runtime if device != "cuda" else 0, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", nargs=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "quantized_memory.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.device)))
        return
    rows = []
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            if "ce" in mode.split("-") and name == "minilm":
                continue  # the chunked loss is for causal LMs; MiniLM classifies
            # A fixed mmap threshold makes glibc return large freed blocks to the system at once,
            # so the resident peak follows the tensors alive rather than the heap's high-water mark.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            proc = subprocess.run([sys.executable, __file__, "--one", name, mode, "--device", args.device],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{name} {mode}: failed\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'model':<10} {'mode':<8} {'linear MiB':>10} {'vs fp32':>8} {'step peak MiB':>14} {'vs fp32':>8} {'above runtime':>14} {'vs fp32':>8}")
    for r in rows:
        base = next((x for x in rows if x["model"] == r["model"] and x["mode"] == "fp32"), r)
        above, base_above = r["step_peak_bytes"] - r["runtime_bytes"], base["step_peak_bytes"] - base["runtime_bytes"]
        print(f"{r['model']:<10} {r['mode']:<8} {r['linear_bytes'] / 2**20:10.1f} {r['linear_bytes'] / r['linear_fp32_bytes']:8.3f} "
              f"{r['step_peak_bytes'] / 2**20:14.1f} {r['step_peak_bytes'] / base['step_peak_bytes']:8.3f} "
              f"{above / 2**20:14.1f} {above / base_above:8.3f}")
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(rows, fh, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
