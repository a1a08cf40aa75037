"""Self-training on SST-2: LoRA on MiniLM with 500 labelled sentences, alone and with 7,500
unlabelled ones through ``train.self_training``, accuracy on ``test.jsonl`` (the GLUE dev
set), checkpoints chosen on ``validation.jsonl``.

    python bench/self_training.py --seeds 0,1,2

Each seed draws its own 500 + 7,500 sentences from the training split (the unlabelled ones
written without their labels). Writes ``bench/self_training.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "datasets" / "sst2"


def _split(seed: int, labelled: int, unlabelled: int, folder: Path) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in (SST2 / "train.jsonl").read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    lab, unl = folder / "labelled.jsonl", folder / "unlabelled.jsonl"
    lab.write_text("".join(json.dumps(r) + "\n" for r in rows[:labelled]))
    unl.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[labelled : labelled + unlabelled]))
    return lab, unl


def _run(cfg_raw: dict, label: str) -> dict:
    from peftkit.train import build_config, run_training
    from peftkit.train.run import load_run

    start = time.perf_counter()
    summary = run_training(build_config(cfg_raw), quiet=True)
    run, model = load_run(cfg_raw["output_dir"])
    records = run.task.read(str(SST2 / "test.jsonl"), run.cfg.data)
    test = run.evaluate(model, run.encode_all(records))
    out = {"run": label, "test_accuracy": test["accuracy"], "validation_accuracy": summary["metric_after"]["accuracy"],
           "steps": summary["steps"], "rounds": summary["rounds"], "wall_seconds": time.perf_counter() - start}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--labelled", type=int, default=500)
    p.add_argument("--unlabelled", type=int, default=7500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--max-per-class", type=int, default=2500)
    p.add_argument("--epochs", type=float, default=8, help="epochs of the labelled-only round (and the baseline)")
    p.add_argument("--round-epochs", type=float, default=2, help="epochs of each pseudo-labelled round")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_self_training"))
    args = p.parse_args()
    if not SST2.is_dir():
        print(f"{SST2} not found", file=sys.stderr)
        return 1
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        folder = Path(args.out) / f"seed{seed}"
        lab, unl = _split(seed, args.labelled, args.unlabelled, folder / "data")
        base = {
            "task": "classification",
            "model": {"name": "minilm", "max_length": 64},
            "data": {"train": str(lab), "validation": str(SST2 / "validation.jsonl"), "max_eval_examples": 1000},
            "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": 2e-3, "seed": seed, "log_every": 50,
                      "eval_every": 16},
        }
        results.append(_run({**base, "output_dir": str(folder / "labelled_only")}, f"seed {seed}: 500 labelled"))
        st = {**base, "train": {**base["train"], "self_training": {
            "unlabeled": str(unl), "rounds": args.rounds, "threshold": args.threshold, "max_per_class": args.max_per_class,
            "epochs": args.round_epochs}}}
        results.append(_run({**st, "output_dir": str(folder / "self_training")}, f"seed {seed}: + self-training"))
    alone = [r["test_accuracy"] for r in results[0::2]]
    self_trained = [r["test_accuracy"] for r in results[1::2]]
    report = {"args": vars(args), "runs": results,
              "median_test_accuracy": {"labelled_only": statistics.median(alone), "self_training": statistics.median(self_trained)},
              "paired_gain": [b - a for a, b in zip(alone, self_trained, strict=True)]}
    from peftkit.core.io import atomic_write_text

    atomic_write_text(str(ROOT / "bench" / "self_training.json"), json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["median_test_accuracy"]), "gains", report["paired_gain"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
