"""Inference latency with LoRA adapters, peftkit against Hugging Face PEFT, interleaved.

    python bench/inference.py [--model llama120m|minilm] [--pairs 5] [--reps 3]

Each run (a fresh subprocess, libraries alternating A B A B ...) builds the base model and
times, in turn, ``reps`` times each (float32, ``torch.inference_mode``):

* prefill: one forward pass over a batch (llama120m: 4 × 128 tokens; minilm: 32 SST-2
  sentences) of the base model, the model with an unmerged LoRA adapter (r=8, targets as in
  ``train_step.py``), and a copy of it after ``merge_and_unload()``;
* mixed adapters: four adapters loaded, a batch of four requests with one adapter each,
  served as one batch (``adapter_names=[...]``) against four single-request passes with
  ``set_adapter`` between them; as a forward pass over the four requests, and (llama120m)
  as greedy generation of 16 tokens from 32-token prompts.

Adapter tensors are random (``common.identical_adapter_state``, B ≠ 0) and the same in both
libraries. The script checks merged against unmerged outputs, the mixed batch against the
single passes, and the two libraries' outputs against each other.
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

ADAPTERS = ("a0", "a1", "a2", "a3")
NEW_TOKENS = 16


def _inputs(model_name: str) -> tuple[dict, dict]:
    """(prefill batch, four requests) for the model."""
    import torch

    if model_name == "minilm":
        tok = C.minilm_tokenizer()
        texts = [r["text"] for r in C.sst2_rows(32)]
        batch = dict(tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        requests = dict(tok(texts[:4], padding=True, truncation=True, max_length=64, return_tensors="pt"))
        return batch, requests
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 32000, (4, 128), generator=g)
    prompts = torch.randint(3, 32000, (4, 32), generator=g)
    return ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)})


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def one(lib_name: str, model_name: str, reps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    lib = C.Lib(lib_name)
    batch, requests = _inputs(model_name)
    base = C.build_model(model_name, seed=0).eval()

    def wrapped():
        m = lib.wrap(copy.deepcopy(base), "lora", model_name)
        C.set_identical_adapter(lib, m, seed=1, randomise_constants=True)
        return m.eval()

    unmerged = wrapped()
    merged = wrapped().merge_and_unload().eval()
    variants = {"base": base, "unmerged": unmerged, "merged": merged}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outs = {}
    with torch.inference_mode():
        for _ in range(reps + 1):  # the first round warms up and is dropped
            for name, model in variants.items():
                t, out = _timed(lambda model=model: model(**batch))
                times[name].append(t)
                outs[name] = _logits(out)
        result: dict = {"lib": lib_name}
        result.update({f"{k}_s": statistics.median(v[1:]) for k, v in times.items()})
        result["unmerged_over_base"] = statistics.median(u / b for u, b in zip(times["unmerged"][1:], times["base"][1:], strict=True))
        result["merged_over_base"] = statistics.median(m / b for m, b in zip(times["merged"][1:], times["base"][1:], strict=True))
        result["merged_vs_unmerged_max_diff"] = float((outs["merged"] - outs["unmerged"]).abs().max())
        result["adapter_changes_output"] = float((outs["unmerged"] - outs["base"]).abs().max())
        result["unmerged_logits_sample"] = outs["unmerged"].flatten()[:64].tolist()
        del variants, merged

        # four adapters, one per request
        multi = lib.wrap(copy.deepcopy(base), "lora", model_name, adapter_name=ADAPTERS[0])
        ours, theirs = C.configs("lora", model_name)
        for name in ADAPTERS[1:]:
            multi.add_adapter(name, ours if lib_name == "peftkit" else theirs)
        for i, name in enumerate(ADAPTERS):
            C.set_identical_adapter(lib, multi, adapter_name=name, seed=10 + i, randomise_constants=True)
        multi.eval()

        def singles_forward():
            outs = []
            for i, name in enumerate(ADAPTERS):
                multi.set_adapter(name)
                outs.append(_logits(multi(**{k: v[i : i + 1] for k, v in requests.items()})))
            return torch.cat(outs)

        def singles_generate():
            outs = []
            for i, name in enumerate(ADAPTERS):
                multi.set_adapter(name)
                outs.append(multi.generate(**{k: v[i : i + 1] for k, v in requests.items()}, max_new_tokens=NEW_TOKENS,
                                           do_sample=False, pad_token_id=0))
            return torch.cat(outs)

        cases = {"forward": (lambda: _logits(multi(**requests, adapter_names=list(ADAPTERS))), singles_forward)}
        if model_name == "llama120m":
            cases["generate"] = (lambda: multi.generate(**requests, adapter_names=list(ADAPTERS), max_new_tokens=NEW_TOKENS,
                                                        do_sample=False, pad_token_id=0), singles_generate)
        for case, (mixed_fn, singles_fn) in cases.items():
            mixed_t, singles_t = [], []
            for _ in range(reps + 1):
                t, mixed_out = _timed(mixed_fn)
                mixed_t.append(t)
                t, singles_out = _timed(singles_fn)
                singles_t.append(t)
            result[f"mixed_{case}_s"] = statistics.median(mixed_t[1:])
            result[f"singles_{case}_s"] = statistics.median(singles_t[1:])
            result[f"singles_over_mixed_{case}"] = statistics.median(s / m for s, m in zip(singles_t[1:], mixed_t[1:], strict=True))
            if case == "forward":
                result["mixed_vs_singles_max_diff"] = float((mixed_out - singles_out).abs().max())
            else:
                result["mixed_generate_equals_singles"] = bool(torch.equal(mixed_out, singles_out))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama120m", choices=C.MODELS)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON file (default bench/inference_<model>.json)")
    parser.add_argument("--one", choices=C.LIBS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import json

        print(json.dumps(one(args.one, args.model, args.reps, args.threads)))
        return
    runs = C.interleave(lambda lib, i: C.run_child(__file__, ["--one", lib, "--model", args.model, "--reps", str(args.reps),
                                                               "--threads", str(args.threads)]), args.pairs)
    pk, pf = runs["peftkit"], runs["peft"]

    def med(lib: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[lib])

    cases = ["forward", "generate"] if args.model == "llama120m" else ["forward"]
    result: dict = {"model": args.model, "pairs": args.pairs, "reps": args.reps, "threads": args.threads, "machine": C.machine(),
                    "runs": runs}
    for key in ("base_s", "unmerged_s", "merged_s", *(f"mixed_{c}_s" for c in cases), *(f"singles_{c}_s" for c in cases)):
        result[f"ratio_{key[:-2]}"] = C.ratio_summary([r[key] for r in pk], [r[key] for r in pf])
    sample_diff = max(abs(a - b) for a, b in zip(pk[0]["unmerged_logits_sample"], pf[0]["unmerged_logits_sample"], strict=True))
    result["libraries_max_logit_diff"] = sample_diff
    print(f"{args.model}: {args.pairs} interleaved pairs, {args.reps} timed repetitions each, {args.threads} threads")
    rows = []
    for label, key in (("base (prefill)", "base_s"), ("unmerged LoRA", "unmerged_s"), ("merged", "merged_s")):
        rows.append([label, f"{med('peftkit', key) * 1000:.1f}", f"{med('peft', key) * 1000:.1f}",
                     C.fmt_ratio(result[f"ratio_{key[:-2]}"])])
    for c in cases:
        for kind in ("mixed", "singles"):
            key = f"{kind}_{c}_s"
            label = f"4 adapters {c}: {'one mixed batch' if kind == 'mixed' else '4 single passes'}"
            rows.append([label, f"{med('peftkit', key) * 1000:.1f}", f"{med('peft', key) * 1000:.1f}", C.fmt_ratio(result[f"ratio_{key[:-2]}"])])
    C.print_table(["ms (median)", "peftkit", "peft", "peftkit / peft"], rows)
    rows = []
    for label, key in (("unmerged / base", "unmerged_over_base"), ("merged / base", "merged_over_base"),
                       *((f"4 singles / mixed batch ({c})", f"singles_over_mixed_{c}") for c in cases)):
        rows.append([label, *(f"{med(lib, key):.3f} ({min(r[key] for r in runs[lib]):.3f}–{max(r[key] for r in runs[lib]):.3f})"
                              for lib in C.LIBS)])
    C.print_table(["within each library", "peftkit", "peft"], rows)
    for lib in C.LIBS:
        r = runs[lib][0]
        checks = f"merged vs unmerged max |diff| {r['merged_vs_unmerged_max_diff']:.2e}, mixed vs singles {r['mixed_vs_singles_max_diff']:.2e}"
        if "mixed_generate_equals_singles" in r:
            checks += f", generated tokens equal: {r['mixed_generate_equals_singles']}"
        print(f"{lib}: {checks}; adapter changes logits by up to {r['adapter_changes_output']:.2f}")
    print(f"peftkit vs peft logits (unmerged, 64 values): max |diff| {sample_diff:.2e}")
    C.write_json(args.out or os.path.join(C.BENCH, f"inference_{args.model}.json"), result)


if __name__ == "__main__":
    main()
