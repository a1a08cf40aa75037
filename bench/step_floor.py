"""How much of a LoRA training step the adapter costs at all: the step against its floor.

    python bench/step_floor.py [--model minilm|llama120m] [--method lora|ia3] [--rounds 6] [--profile]

The floor is the same frozen model, same batches, with gradients still flowing back through
every layer (the embedding output requires a gradient) but no adapter: the work any library
must do for an adapter on every layer, before the adapter's own matrix products, element-wise
ops, optimiser update and Python code. One process holds three models (floor, peftkit,
peft) and alternates them step by step; the report gives each library's median step time
and its excess over the floor. ``--profile`` adds a torch.profiler table (calls and self time per operator) of one step of each.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C
from train_step import _batches


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=C.MODELS)
    parser.add_argument("--method", default="lora", choices=("lora", "ia3"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", help="JSON file (default bench/step_floor_<model>_<method>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = C.build_model(args.model, seed=0)
    batches = _batches(args.model, 2)
    floor = copy.deepcopy(base)
    for p in floor.parameters():
        p.requires_grad_(False)
    floor.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_())
    models = {"floor": floor}
    for name in C.LIBS:
        lib = C.Lib(name)
        models[name] = lib.wrap(copy.deepcopy(base), args.method, args.model)
        C.set_identical_adapter(lib, models[name], seed=1)
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items() if k != "floor"}

    def step(key: str, batch: dict) -> float:
        model = models[key]
        model.train()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if key in opts:
            opts[key].step()
            opts[key].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds + 1):
        for key in models:
            t = step(key, batches[r % 2])
            if r:
                times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "method": args.method, "rounds": args.rounds, "threads": args.threads, "machine": C.machine(),
              "step_ms": {k: [t * 1000 for t in v] for k, v in times.items()},
              "median_ms": {k: v * 1000 for k, v in med.items()},
              "over_floor": {k: statistics.median(a / b for a, b in zip(times[k], times["floor"], strict=True)) for k in C.LIBS}}
    print(f"{args.model} {args.method}: {args.rounds} rounds (floor, peftkit, peft alternating), {args.threads} threads")
    C.print_table(["", "step ms (median)", "/ floor (median of rounds)"],
                  [["floor: frozen model, gradients through all layers", f"{med['floor'] * 1000:.1f}", "1.000"]]
                  + [[k, f"{med[k] * 1000:.1f}", f"{result['over_floor'][k]:.3f}"] for k in C.LIBS])
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        per_op: dict[str, dict[str, tuple[int, float]]] = {}
        for key in models:
            step(key, batches[0])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(key, batches[1])
            per_op[key] = {e.key: (e.count, e.self_cpu_time_total / 1000) for e in prof.key_averages()}
        ops = sorted(set().union(*per_op.values()), key=lambda op: -max(v.get(op, (0, 0.0))[1] for v in per_op.values()))[:20]
        print("one profiled step each: calls and self CPU ms per operator")
        C.print_table(["operator", *models], [[op, *(f"{per_op[k].get(op, (0, 0.0))[0]} / {per_op[k].get(op, (0, 0.0))[1]:.1f}"
                                                     for k in models)] for op in ops])
        result["profile"] = per_op
    C.write_json(args.out or os.path.join(C.BENCH, f"step_floor_{args.model}_{args.method}.json"), result)


if __name__ == "__main__":
    main()
