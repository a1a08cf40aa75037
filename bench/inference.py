"""Inference latency with LoRA adapters, peftkit against Hugging Face PEFT, interleaved.

    python bench/inference.py [--model llama120m|minilm] [--rounds 5]

One process builds the base model once and holds copies of it with each library's adapters;
all variants run in turn, a warm-up round and then ``--rounds`` rounds, the order reversed
every round, so that each ratio compares calls made under nearly the same load (float32,
``torch.inference_mode``):

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


def run(model_name: str, rounds: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    batch, requests = _inputs(model_name)
    base = C.build_model(model_name, seed=0).eval()
    libs = {name: C.Lib(name) for name in C.LIBS}

    models = {"base": base}
    for name, lib in libs.items():
        models[f"{name}_unmerged"] = C.with_adapters(lib, base, model_name)
        models[f"{name}_merged"] = C.with_adapters(lib, base, model_name).merge_and_unload().eval()
    outs: dict = {}

    def forward(key: str):
        def call(_i: int) -> float:
            t, out = _timed(lambda: models[key](**batch))
            outs[key] = _logits(out)
            return t
        return call

    result: dict = {"model": model_name, "rounds": rounds, "threads": threads}
    with torch.inference_mode():
        times = C.alternate({key: forward(key) for key in models}, rounds)
        result["prefill_s"] = times
        for name in libs:
            u, m, b = times[f"{name}_unmerged"], times[f"{name}_merged"], times["base"]
            result[f"{name}_unmerged_over_base"] = C.ratio_summary(u, b)
            result[f"{name}_merged_over_base"] = C.ratio_summary(m, b)
            result[f"{name}_merged_vs_unmerged_max_diff"] = float((outs[f"{name}_merged"] - outs[f"{name}_unmerged"]).abs().max())
        result["unmerged_ratio"] = C.ratio_summary(times["peftkit_unmerged"], times["peft_unmerged"])
        result["merged_ratio"] = C.ratio_summary(times["peftkit_merged"], times["peft_merged"])
        result["libraries_max_logit_diff"] = float((outs["peftkit_unmerged"] - outs["peft_unmerged"]).abs().max())
        result["adapter_changes_output"] = float((outs["peftkit_unmerged"] - outs["base"]).abs().max())
        models.clear()

        # four adapters, one per request: one mixed batch against four single-request passes
        multi = {name: C.with_adapters(lib, base, model_name, ADAPTERS) for name, lib in libs.items()}

        def singles(name: str, fn):
            def call():
                pieces = []
                for i, adapter in enumerate(ADAPTERS):
                    multi[name].set_adapter(adapter)
                    pieces.append(fn(multi[name], {k: v[i : i + 1] for k, v in requests.items()}))
                return torch.cat(pieces)
            return call

        def fwd(model, inputs, **kw):
            return _logits(model(**inputs, **kw))

        def gen(model, inputs, **kw):
            return model.generate(**inputs, **kw, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

        kinds = {"forward": fwd, **({"generate": gen} if model_name == "llama120m" else {})}
        for kind, fn in kinds.items():
            calls, results = {}, {}
            for name in libs:
                calls[f"{name}_mixed"] = lambda name=name, fn=fn: fn(multi[name], requests, adapter_names=list(ADAPTERS))
                calls[f"{name}_singles"] = singles(name, fn)

            def timed(key: str, calls=calls, results=results):
                def call(_i: int) -> float:
                    t, results[key] = _timed(calls[key])
                    return t
                return call

            times = C.alternate({key: timed(key) for key in calls}, rounds)
            result[f"{kind}_s"] = times
            for name in libs:
                result[f"{name}_singles_over_mixed_{kind}"] = C.ratio_summary(times[f"{name}_singles"], times[f"{name}_mixed"])
                a, b = results[f"{name}_mixed"], results[f"{name}_singles"]
                result[f"{name}_mixed_vs_singles_{kind}"] = (bool(torch.equal(a, b)) if kind == "generate"
                                                            else float((a - b).abs().max()))
            result[f"mixed_{kind}_ratio"] = C.ratio_summary(times["peftkit_mixed"], times["peft_mixed"])
            result[f"singles_{kind}_ratio"] = C.ratio_summary(times["peftkit_singles"], times["peft_singles"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama120m", choices=C.MODELS)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after a warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="JSON file (default bench/inference_<model>.json)")
    args = parser.parse_args()
    r = run(args.model, args.rounds, args.threads)
    r["machine"] = C.machine()
    med = statistics.median
    print(f"{args.model}: {args.rounds} rounds (all variants alternating in one process, order reversed every round), "
          f"{args.threads} threads")
    p = r["prefill_s"]
    rows = [["base model", f"{med(p['base']) * 1000:.1f}", f"{med(p['base']) * 1000:.1f}", "", ""]]
    for v in ("unmerged", "merged"):
        rows.append([f"{v} LoRA", f"{med(p[f'peftkit_{v}']) * 1000:.1f}", f"{med(p[f'peft_{v}']) * 1000:.1f}",
                     C.fmt_ratio(r[f"{v}_ratio"]), " / ".join(C.fmt_ratio(r[f"{lib}_{v}_over_base"]) for lib in C.LIBS)])
    C.print_table(["prefill ms (median)", "peftkit", "peft", "peftkit / peft", "over base: peftkit / peft"], rows)
    rows = []
    for kind in ("forward", "generate"):
        if f"{kind}_s" not in r:
            continue
        t = r[f"{kind}_s"]
        for mode, label in (("mixed", "one mixed batch"), ("singles", "4 single passes")):
            rows.append([f"4 adapters, {kind}: {label}", f"{med(t[f'peftkit_{mode}']) * 1000:.1f}", f"{med(t[f'peft_{mode}']) * 1000:.1f}",
                         C.fmt_ratio(r[f"{mode}_{kind}_ratio"])])
        rows.append([f"  singles / mixed ({kind})", *(C.fmt_ratio(r[f"{lib}_singles_over_mixed_{kind}"]) for lib in C.LIBS), ""])
    C.print_table(["ms (median)", "peftkit", "peft", "peftkit / peft"], rows)
    for lib in C.LIBS:
        checks = (f"merged vs unmerged max |diff| {r[f'{lib}_merged_vs_unmerged_max_diff']:.2e}, "
                  f"mixed vs singles {r[f'{lib}_mixed_vs_singles_forward']:.2e}")
        if f"{lib}_mixed_vs_singles_generate" in r:
            checks += f", generated tokens equal: {r[f'{lib}_mixed_vs_singles_generate']}"
        print(f"{lib}: {checks}")
    print(f"adapter changes logits by up to {r['adapter_changes_output']:.2f}; "
          f"peftkit vs peft logits max |diff| {r['libraries_max_logit_diff']:.2e}")
    C.write_json(args.out or os.path.join(C.BENCH, f"inference_{args.model}.json"), r)


if __name__ == "__main__":
    main()
