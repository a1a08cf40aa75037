"""`peftkit serve`'s engine against one-request-at-a-time serving with peft, and against its own
ceiling (one merged adapter, no adapter work), on the 134 M decoder.

    python bench/serve.py [--rounds 2] [--clients 16] [--adapters 8] [--prompt-tokens 64] [--new-tokens 64]

Every round, ``clients`` requests arrive at once, spread over ``adapters`` LoRA adapters (r 8 on
every linear layer of the attention and MLP, random factors), each with a prompt of
``prompt-tokens`` tokens, asking for exactly ``new-tokens`` greedy tokens:

- **peftkit**: the engine of `peftkit serve` (continuous batching, one mixed-adapter batch per
  step) with all adapters resident;
- **peft, one at a time**: the same requests served in arrival order, `set_adapter` and
  `generate` per request (what a simple server does);
- **merged ceiling**: the engine over the base with one adapter merged in, no adapter work:
  the same batching with nothing per-adapter to do.

The three alternate in one process (order reversed every round) after a warm-up. Reported:
generated tokens per second and the p50/p95 of request latency (arrival to last token), and
the ratios. The engine runs in-process here (no HTTP), so the figures are the scheduler's and
the model's, not the network's. Writes ``bench/serve.json``.
"""
import argparse
import copy
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C


def _tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` made-up words (the decoder has no tokenizer of its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", pad_token="w0")


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_engine(engine, requests, new_tokens):
    """Submits every request at once; returns (wall seconds, latencies, generated texts)."""
    from peftkit.serve.engine import GenerationRequest
    from peftkit.serve.sampling import SamplingParams

    done = queue.Queue()
    start = time.perf_counter()
    texts = {}
    for i, (ids, adapter) in enumerate(requests):
        parts = []

        def emit(event, i=i, parts=parts):
            if event[0] == "delta":
                parts.append(event[2])
            elif event[0] in ("done", "error"):
                texts[i] = "".join(parts)
                done.put((i, time.perf_counter(), event))
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(ids, adapter, params, emit))
    latencies = []
    for _ in requests:
        _, t, event = done.get(timeout=3600)
        if event[0] == "error":
            raise event[1]
        latencies.append(t - start)
    return time.perf_counter() - start, latencies, texts


def run_sequential(model, tokenizer, requests, new_tokens):
    import torch

    start = time.perf_counter()
    latencies, texts = [], {}
    for i, (ids, adapter) in enumerate(requests):
        model.set_adapter(adapter)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        texts[i] = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        latencies.append(time.perf_counter() - start)
    return time.perf_counter() - start, latencies, texts


def main() -> None:
    import torch

    from peftkit.serve.engine import GenerationEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [f"a{i}" for i in range(args.adapters)]
    base = C.build_model("llama120m", seed=0).eval()
    tokenizer = _tokenizer(base.config.vocab_size)
    ours = C.with_adapters(C.Lib("peftkit"), base, "llama120m", names)
    theirs = C.with_adapters(C.Lib("peft"), base, "llama120m", names)
    merged = copy.deepcopy(ours)
    merged.set_adapter(names[0])
    merged = merged.merge_and_unload().eval()
    # peftkit's engine loads adapters from folders, as the server does.
    folder = tempfile.mkdtemp(prefix="peftkit-bench-serve-")
    paths = {}
    for name in names:
        ours.save_pretrained(os.path.join(folder, name), selected_adapters=[name])
        paths[name] = os.path.join(folder, name, name)
    del ours
    engine = GenerationEngine(copy.deepcopy(base), tokenizer, adapters={}, max_adapters=args.adapters,
                              max_batch_size=args.clients, max_model_len=512)
    for name, path in paths.items():
        engine.pool.add(name, path)
    ceiling = GenerationEngine(merged, tokenizer, max_batch_size=args.clients, max_model_len=512)
    engine.start()
    ceiling.start()
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randint(2, base.config.vocab_size, (args.prompt_tokens,), generator=g).tolist(),
                 names[i % len(names)]) for i in range(args.clients)]
    ceiling_requests = [(ids, None) for ids, _ in requests]
    systems = {
        "peftkit": lambda: run_engine(engine, requests, args.new_tokens),
        "peft one at a time": lambda: run_sequential(theirs, tokenizer, requests, args.new_tokens),
        "merged ceiling": lambda: run_engine(ceiling, ceiling_requests, args.new_tokens),
    }
    short = [(ids[:8], a) for ids, a in requests[:2]]  # warm-up
    run_engine(engine, short, 4)
    run_sequential(theirs, tokenizer, short, 4)
    run_engine(ceiling, [(ids, None) for ids, _ in short], 4)
    results = {name: [] for name in systems}
    agree = None
    for r in range(args.rounds):
        order = list(systems) if r % 2 == 0 else list(reversed(systems))
        texts = {}
        for name in order:
            wall, latencies, texts[name] = systems[name]()
            tokens = args.clients * args.new_tokens
            results[name].append({"tokens_per_s": tokens / wall, "wall_s": wall,
                                  "p50_s": _percentile(latencies, 0.5), "p95_s": _percentile(latencies, 0.95)})
            print(f"round {r} {name:<20} {tokens / wall:8.1f} tok/s  p50 {results[name][-1]['p50_s']:.2f} s  "
                  f"p95 {results[name][-1]['p95_s']:.2f} s", flush=True)
        agree = sum(texts["peftkit"][i] == texts["peft one at a time"][i] for i in range(args.clients))
    engine.stop()
    ceiling.stop()
    shutil.rmtree(folder, ignore_errors=True)
    med = {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for name, rows in results.items()}
    ratios = {
        "throughput vs peft one at a time": statistics.median(
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["peftkit"], results["peft one at a time"], strict=True)),
        "throughput vs merged ceiling": statistics.median(
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["peftkit"], results["merged ceiling"], strict=True)),
    }
    C.print_table(["system", "tokens/s", "p50 latency s", "p95 latency s"],
                  [[n, f"{m['tokens_per_s']:.1f}", f"{m['p50_s']:.2f}", f"{m['p95_s']:.2f}"] for n, m in med.items()])
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"greedy answers equal to peft's, one at a time: {agree}/{args.clients}")
    C.write_json(args.out, {"machine": C.machine(), "args": vars(args), "median": med, "rounds": results,
                            "ratios": ratios, "greedy_agreement": f"{agree}/{args.clients}"})


if __name__ == "__main__":
    main()
