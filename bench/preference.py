"""DPO step time and peak memory, peftkit's ``preference`` task against TRL's ``DPOTrainer``;
GRPO's sampling rate against TRL's ``GRPOTrainer``.

    PYTHONPATH=src python bench/preference.py [--pairs 3] [--steps 8] [--threads 1] [--skip-grpo]

Sides, each in a fresh process, alternating (A B C, C B A, ...; a warm-up round dropped):

- ``peftkit``: ``PreferenceTask.loss`` (DPO sigmoid, β 0.1) on a peftkit LoRA model; the
  reference is the model with its adapters off;
- ``trl_peft``: ``DPOTrainer.compute_loss`` with a peft LoRA model and no reference model (TRL
  then also switches the adapter off);
- ``trl_copy``: ``DPOTrainer.compute_loss`` with a peft LoRA model and an explicit reference
  model (a second copy of the base: the way without adapters).

Same model (a Llama-shaped decoder built from config, hidden 256, 4 layers, vocabulary 8,192:
about 7.6 M parameters, float32), the same LoRA (r 8 on q_proj and v_proj, initial tensors from
one seed), the same batch (4 pairs, prompt 64 and completions 64 tokens, random ids). A step is
loss + backward + AdamW step; the figure is the median step after two warm-up steps. Peak
memory is the process's resident peak (VmHWM) measured from just before the model is built
(the libraries already imported).

GRPO: ``GRPOTask.sample`` (generation of 4 completions of 24 tokens for each of 4 prompts,
temperature 1, no top-k) against TRL's ``GRPOTrainer`` generating the same numbers through
transformers' ``generate`` (no vLLM): completion tokens per second.
JSON: ``bench/preference.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

VOCAB, HIDDEN, LAYERS, PROMPT, COMPLETION, PAIRS = 8192, 256, 4, 64, 64, 4
INTERMEDIATE = 688  # set with HIDDEN by --hidden: about 2.7 × the width, as here


def build_base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=INTERMEDIATE, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def batch():
    import torch

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, VOCAB, (PAIRS, PROMPT), generator=gen)
    chosen, rejected = (torch.randint(3, VOCAB, (PAIRS, COMPLETION), generator=gen) for _ in range(2))
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    completion = torch.zeros_like(ids)
    completion[:, PROMPT:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}


def same_lora(model) -> None:
    """The same initial LoRA tensors on either library's model (B non-zero, so the policy
    differs from its reference)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def child(side: str, steps: int, threads: int) -> dict:
    import torch

    from common import peak_memory_bytes, reset_peak_memory

    torch.set_num_threads(threads)
    b = batch()
    if side == "peftkit":
        from peftkit import LoraConfig, get_peft_model
        from peftkit.train.tasks.preference import BaseGuard, PreferenceOptions, PreferenceTask
    else:
        import copy

        import datasets
        from peft import LoraConfig, get_peft_model
        from trl import DPOConfig, DPOTrainer

        from pref_helpers import word_tokenizer
    reset_peak_memory()  # libraries imported: the peak counts the model, the step and what the library allocates
    base = build_base()
    if side == "peftkit":
        task = PreferenceTask()
        task.opts, task.guard = PreferenceOptions(), BaseGuard(base)  # as the task's load() does, before the adapter
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        model.train()

        def loss_fn():
            return task.loss(model, b)
    else:
        ref = copy.deepcopy(base).eval() if side == "trl_copy" else None
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        args = DPOConfig(output_dir="/tmp/bench-dpo", per_device_train_batch_size=PAIRS, report_to=[], use_cpu=True, bf16=False,
                         beta=0.1)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, processing_class=word_tokenizer(),
                             train_dataset=datasets.Dataset.from_list([{"prompt": "the film", "chosen": " good", "rejected": " bad"}] * 4))
        model = trainer.model
        model.train()

        def loss_fn():
            return trainer.compute_loss(model, dict(b))
    same_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for _ in range(steps + 2):
        tick = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
        losses.append(float(loss))
    return {"side": side, "step_ms": 1000 * statistics.median(times[2:]), "peak_bytes": peak_memory_bytes(), "losses": losses}


def grpo_child(side: str, threads: int, rounds: int = 3) -> dict:
    import torch

    torch.set_num_threads(threads)
    base = build_base()
    from pref_helpers import word_tokenizer

    tok = word_tokenizer()
    prompts = torch.randint(3, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    texts = [tok.decode(p) for p in prompts]
    g, new = 4, 24
    if side == "peftkit":
        from peftkit import LoraConfig, get_peft_model
        from peftkit.train.tasks.grpo import GRPOOptions, GRPOTask, PromptCollator

        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        task = GRPOTask()
        task.opts = GRPOOptions(reward="unused.py:f", num_generations=g, max_completion_length=new)
        task.tokenizer, task.reward = tok, lambda p, c: [0.0] * len(c)
        batch = PromptCollator(0)([{"prompt_ids": p.tolist(), "prompt": t} for p, t in zip(prompts, texts, strict=True)])

        def sample() -> int:
            return int(task.sample(model, batch)["completion_mask"].sum())
    else:
        import datasets
        from peft import LoraConfig, get_peft_model
        from trl import GRPOConfig, GRPOTrainer

        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        args = GRPOConfig(output_dir="/tmp/bench-grpo", per_device_train_batch_size=g * 4, num_generations=g, report_to=[],
                          use_cpu=True, bf16=False, max_completion_length=new, temperature=1.0, top_k=0)
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              processing_class=tok, train_dataset=datasets.Dataset.from_list([{"prompt": t} for t in texts]))

        def sample() -> int:
            out = trainer._generate([t for t in texts for _ in range(g)])
            return sum(len(ids) for ids in out[1])
    sample()
    rates = []
    for _ in range(rounds):
        tick = time.perf_counter()
        tokens = sample()
        rates.append(tokens / (time.perf_counter() - tick))
    return {"side": side, "tokens_per_second": statistics.median(rates), "tokens": tokens}


def main() -> None:
    global HIDDEN, LAYERS, INTERMEDIATE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-grpo", action="store_true")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="the decoder's width (the reference copy grows with it)")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--child", default=None)
    parser.add_argument("--grpo-child", default=None)
    args = parser.parse_args()
    if (args.hidden, args.layers) != (HIDDEN, LAYERS):
        HIDDEN, LAYERS, INTERMEDIATE = args.hidden, args.layers, round(args.hidden * 2.6875 / 16) * 16
    size = ["--hidden", str(args.hidden), "--layers", str(args.layers)]
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    if args.grpo_child:
        print(json.dumps(grpo_child(args.grpo_child, args.threads)))
        return
    from common import fmt_ratio, machine, print_table, ratio_summary, run_child, write_json

    sides = ["peftkit", "trl_peft", "trl_copy"]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for round_ in range(args.pairs + 1):
        order = sides if round_ % 2 == 0 else sides[::-1]
        for side in order:
            out = run_child(__file__, ["--child", side, "--steps", str(args.steps), "--threads", str(args.threads), *size])
            if round_:
                results[side].append(out)
    first = {s: results[s][0]["losses"][0] for s in sides}
    assert abs(first["peftkit"] - first["trl_peft"]) < 1e-4 and abs(first["peftkit"] - first["trl_copy"]) < 1e-4, first
    report = {"machine": machine(), "args": vars(args), "runs": results, "first_loss": first}
    rows = []
    for other in ("trl_peft", "trl_copy"):
        t = ratio_summary([r["step_ms"] for r in results["peftkit"]], [r["step_ms"] for r in results[other]])
        m = ratio_summary([r["peak_bytes"] for r in results["peftkit"]], [r["peak_bytes"] for r in results[other]])
        report[f"vs_{other}"] = {"step_time": t, "peak_memory": m}
        rows.append([f"peftkit / {other}", fmt_ratio(t), fmt_ratio(m)])
    print_table(["DPO step", "time ratio", "peak memory ratio"], rows)
    for side in sides:
        print(f"  {side}: step {statistics.median(r['step_ms'] for r in results[side]):.1f} ms, peak "
              f"{statistics.median(r['peak_bytes'] for r in results[side]) / 2**20:.0f} MiB")
    if not args.skip_grpo:
        grpo: dict[str, list[float]] = {"peftkit": [], "trl": []}
        for round_ in range(args.pairs):
            for side in (["peftkit", "trl"] if round_ % 2 == 0 else ["trl", "peftkit"]):
                grpo[side].append(run_child(__file__, ["--grpo-child", side, "--threads", str(args.threads), *size])["tokens_per_second"])
        r = ratio_summary(grpo["peftkit"], grpo["trl"])
        report["grpo_sampling"] = {"runs": grpo, "ratio": r}
        print(f"GRPO sampling tokens/s peftkit / trl: {fmt_ratio(r)}  (peftkit {statistics.median(grpo['peftkit']):.0f}, "
              f"trl {statistics.median(grpo['trl']):.0f} tokens/s)")
    name = "preference.json" if (args.hidden, args.layers) == (256, 4) else f"preference_h{args.hidden}_l{args.layers}.json"
    write_json(os.path.join(HERE, name), report)


if __name__ == "__main__":
    main()
