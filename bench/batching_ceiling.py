"""The ceiling of a mixed-adapter batch's gain on this machine (decoder, one thread).

    python bench/batching_ceiling.py [--rounds 4]

A mixed batch of four requests can be at most as much faster than four single-request calls
as the base model itself is: this measures the base model without adapters, one batch of the
four 32-token requests of ``inference.py`` against four single-request calls, for a forward
pass and for greedy generation of 16 tokens; and peftkit's mixed batch against the same batch
with one adapter for all four requests. All calls alternate in one process, the order
reversed every round, after a warm-up round. Writes ``bench/batching_ceiling.json``.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C
from inference import ADAPTERS, NEW_TOKENS, _inputs


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, req = _inputs("llama120m")
    base = C.build_model("llama120m", seed=0).eval()
    m = C.with_adapters(C.Lib("peftkit"), base, "llama120m", ADAPTERS)
    m.set_adapter("a0")
    ones = [{k: v[i:i+1] for k, v in req.items()} for i in range(4)]
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    calls = {
        "base fwd 4": lambda: base(**req),
        "base fwd 1x4": lambda: [base(**o) for o in ones],
        "a0 fwd 4": lambda: m(**req),
        "mixed fwd 4": lambda: m(**req, adapter_names=list(ADAPTERS)),
        "base gen 4": lambda: base.generate(**req, **gen),
        "base gen 1x4": lambda: [base.generate(**o, **gen) for o in ones],
        "a0 gen 4": lambda: m.generate(**req, **gen),
        "mixed gen 4": lambda: m.generate(**req, **gen, adapter_names=list(ADAPTERS)),
    }
    ts = {k: [] for k in calls}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for k in (calls if r % 2 else reversed(list(calls))):
                start = time.perf_counter()
                calls[k]()
                if r:
                    ts[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    for k, v in med.items():
        print(f"{k:14s} {v:8.1f} ms")
    print("base forward gain 1x4 / 4:", round(med["base fwd 1x4"] / med["base fwd 4"], 3))
    print("base generate gain 1x4 / 4:", round(med["base gen 1x4"] / med["base gen 4"], 3))
    print("mixed / one adapter: forward", round(med["mixed fwd 4"] / med["a0 fwd 4"], 3), "generate", round(med["mixed gen 4"] / med["a0 gen 4"], 3))
    gains = {"base_forward": med["base fwd 1x4"] / med["base fwd 4"], "base_generate": med["base gen 1x4"] / med["base gen 4"],
             "mixed_over_one_adapter_forward": med["mixed fwd 4"] / med["a0 fwd 4"],
             "mixed_over_one_adapter_generate": med["mixed gen 4"] / med["a0 gen 4"]}
    C.write_json(os.path.join(C.BENCH, "batching_ceiling.json"),
                 {"rounds": args.rounds, "threads": 1, "machine": C.machine(), "median_ms": med, "ratios": gains})


if __name__ == "__main__":
    main()
