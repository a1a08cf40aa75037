"""Adapter save and load: time and bytes on disk, peftkit against Hugging Face PEFT, interleaved.

    python bench/adapter_io.py [--models minilm,llama120m] [--rounds 7]

For each model one process builds the base model and wraps copies of it with a LoRA
adapter (r=8; MiniLM: query, key, value, attention.output.dense and the classifier head;
llama120m: all linear layers) holding the same tensors in both libraries, then times
``save_pretrained(folder)`` and ``PeftModel.from_pretrained(base, folder)`` onto a fresh copy
of the base model, libraries alternating (order reversed every round; a warm-up round, then
``--rounds`` rounds). The copy is made outside the timed region; the file is read from the
page cache; loading includes wrapping the model. The script checks that the loaded model
reproduces the saved one's output.
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


def measure(model_name: str, rounds: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    base = C.build_model(model_name, seed=0).eval()
    ids = torch.randint(3, 30000, (2, 16), generator=torch.Generator().manual_seed(3))
    libs = {name: C.Lib(name) for name in C.LIBS}
    models, expected = {}, {}
    for name, lib in libs.items():
        models[name] = lib.wrap(copy.deepcopy(base), "lora", model_name)
        C.set_identical_adapter(lib, models[name], seed=1, randomise_constants=True)
        models[name].eval()
        with torch.inference_mode():
            expected[name] = models[name](input_ids=ids).logits
    root = tempfile.mkdtemp(prefix="peftkit-bench-io-")
    loaded: dict = {}
    try:
        def save(name: str):
            def call(i: int) -> float:
                start = time.perf_counter()
                models[name].save_pretrained(os.path.join(root, f"{name}{i}"))
                return time.perf_counter() - start
            return call

        def load(name: str):
            def call(_i: int) -> float:
                fresh = copy.deepcopy(base)  # not timed
                start = time.perf_counter()
                loaded[name] = libs[name].PeftModel.from_pretrained(fresh, os.path.join(root, f"{name}0"))
                return time.perf_counter() - start
            return call

        save_t = C.alternate({name: save(name) for name in libs}, rounds)
        load_t = C.alternate({name: load(name) for name in libs}, rounds)
        out: dict = {"model": model_name, "save_s": save_t, "load_s": load_t,
                     "save_ratio": C.ratio_summary(save_t["peftkit"], save_t["peft"]),
                     "load_ratio": C.ratio_summary(load_t["peftkit"], load_t["peft"])}
        for name in libs:
            folder = os.path.join(root, f"{name}0")
            out[f"{name}_files"] = sorted(os.listdir(folder))
            out[f"{name}_folder_bytes"] = C.dir_bytes(folder)
            out[f"{name}_tensor_bytes"] = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
            with torch.inference_mode():
                out[f"{name}_reload_max_diff"] = float((loaded[name].eval()(input_ids=ids).logits - expected[name]).abs().max())
    finally:
        shutil.rmtree(root)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(C.MODELS))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after a warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(C.BENCH, "adapter_io.json"))
    args = parser.parse_args()
    result: dict = {"rounds": args.rounds, "threads": args.threads, "machine": C.machine(), "models": {}}
    rows = []
    med = statistics.median
    for name in args.models.split(","):
        r = result["models"][name] = measure(name, args.rounds, args.threads)
        for lib in C.LIBS:
            rows.append([name, lib, f"{med(r['save_s'][lib]) * 1000:.1f}", f"{med(r['load_s'][lib]) * 1000:.1f}",
                         f"{r[f'{lib}_tensor_bytes']:,}", f"{r[f'{lib}_folder_bytes']:,}", f"{r[f'{lib}_reload_max_diff']:.1e}"])
        rows.append([name, "peftkit / peft", C.fmt_ratio(r["save_ratio"]), C.fmt_ratio(r["load_ratio"]),
                     f"{r['peftkit_tensor_bytes'] / r['peft_tensor_bytes']:.3f}",
                     f"{r['peftkit_folder_bytes'] / r['peft_folder_bytes']:.3f}", ""])
    print(f"{args.rounds} rounds (libraries alternating in one process), {args.threads} threads")
    C.print_table(["model", "", "save ms", "load ms", "safetensors bytes", "folder bytes", "reload |diff|"], rows)
    C.write_json(args.out, result)


if __name__ == "__main__":
    main()
