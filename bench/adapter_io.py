"""Adapter save and load: time and bytes on disk, peftkit against Hugging Face PEFT, interleaved.

    python bench/adapter_io.py [--models minilm,llama120m] [--pairs 5] [--reps 5]

Each run (a fresh subprocess, libraries alternating A B A B ...) builds the base model,
wraps it with a LoRA adapter (r=8; MiniLM: query, key, value, attention.output.dense and
the classifier head; llama120m: all linear layers) holding the same tensors in both
libraries, then times ``reps`` calls (after one warm-up call) of
``save_pretrained(folder)`` and of ``PeftModel.from_pretrained(base, folder)`` onto a fresh
copy of the base model (the copy is made outside the timed region; the file is read from
the page cache). Loading includes wrapping the model. The script checks that the loaded
model reproduces the saved one's output.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C


def one(lib_name: str, model_name: str, reps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    lib = C.Lib(lib_name)
    base = C.build_model(model_name, seed=0).eval()
    model = lib.wrap(copy.deepcopy(base), "lora", model_name)
    C.set_identical_adapter(lib, model, seed=1, randomise_constants=True)
    model.eval()
    ids = torch.randint(3, 30000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    root = tempfile.mkdtemp(prefix="peftkit-bench-io-")
    try:
        save_t, load_t = [], []
        for i in range(reps + 1):
            folder = os.path.join(root, f"save{i}")
            start = time.perf_counter()
            model.save_pretrained(folder)
            save_t.append(time.perf_counter() - start)
        folder = os.path.join(root, "save0")
        size = C.dir_bytes(folder)
        tensor_bytes = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
        for _ in range(reps + 1):
            fresh = copy.deepcopy(base)
            start = time.perf_counter()
            loaded = lib.PeftModel.from_pretrained(fresh, folder)
            load_t.append(time.perf_counter() - start)
        with torch.inference_mode():
            diff = float((loaded.eval()(input_ids=ids).logits - expected).abs().max())
    finally:
        shutil.rmtree(root)
    return {"lib": lib_name, "model": model_name, "save_s": statistics.median(save_t[1:]), "load_s": statistics.median(load_t[1:]),
            "folder_bytes": size, "tensor_file_bytes": tensor_bytes, "reload_max_diff": diff,
            "files": sorted(os.listdir(folder)) if os.path.isdir(folder) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(C.MODELS))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(C.BENCH, "adapter_io.json"))
    parser.add_argument("--one", nargs=2, metavar=("LIB", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import json

        print(json.dumps(one(args.one[0], args.one[1], args.reps, args.threads)))
        return
    result: dict = {"pairs": args.pairs, "reps": args.reps, "threads": args.threads, "machine": C.machine(), "models": {}}
    rows = []
    for name in args.models.split(","):
        runs = C.interleave(lambda lib, i, name=name: C.run_child(__file__, ["--one", lib, name, "--reps", str(args.reps),
                                                                               "--threads", str(args.threads)]), args.pairs)
        pk, pf = runs["peftkit"], runs["peft"]
        entry = {"runs": runs,
                 "save_ratio": C.ratio_summary([r["save_s"] for r in pk], [r["save_s"] for r in pf]),
                 "load_ratio": C.ratio_summary([r["load_s"] for r in pk], [r["load_s"] for r in pf])}
        result["models"][name] = entry
        for lib in C.LIBS:
            r = runs[lib][0]
            rows.append([name, lib, f"{statistics.median(x['save_s'] for x in runs[lib]) * 1000:.1f}",
                         f"{statistics.median(x['load_s'] for x in runs[lib]) * 1000:.1f}", f"{r['tensor_file_bytes']:,}",
                         f"{r['folder_bytes']:,}", f"{r['reload_max_diff']:.1e}"])
        rows.append([name, "peftkit / peft", C.fmt_ratio(entry["save_ratio"]), C.fmt_ratio(entry["load_ratio"]),
                     f"{pk[0]['tensor_file_bytes'] / pf[0]['tensor_file_bytes']:.3f}", f"{pk[0]['folder_bytes'] / pf[0]['folder_bytes']:.3f}", ""])
    print(f"{args.pairs} interleaved pairs, {args.reps} timed repetitions each, {args.threads} threads")
    C.print_table(["model", "", "save ms", "load ms", "safetensors bytes", "folder bytes", "reload |diff|"], rows)
    C.write_json(args.out, result)


if __name__ == "__main__":
    main()
