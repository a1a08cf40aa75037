"""Sentiment steering, offline: teach a small review-writing model to write positive reviews,
with DPO (from pairs) and with GRPO (from a sentiment classifier's reward), both on LoRA.

Run from the repository root (SST-2 in ../shared/datasets/sst2):

    python examples/preference/steering.py prepare  --out runs/steer    # data, tokenizer, configs
    python examples/preference/steering.py pretrain --out runs/steer --steps 1100 --threads 1
    peftkit train runs/steer/sentiment.yaml      # MiniLM + LoRA on SST-2: the reward and the judge
    peftkit train runs/steer/dpo.yaml            # DPO on SST-2 pairs
    python examples/preference/steering.py pairs --out runs/steer       # pairs of the writer's own samples
    peftkit train runs/steer/dpo_sampled.yaml    # DPO on those
    peftkit train runs/steer/grpo.yaml
    python examples/preference/steering.py evaluate --out runs/steer

``prepare`` writes the pre-training sentences (the SST-2 training phrases of six words or
more), a byte-level BPE tokenizer learnt from them (4,096 tokens), preference pairs (prompt =
the first three words of a training review, chosen = the rest of a positive review, rejected
= the rest of a negative one), GRPO prompts, 256 validation prompts, and the run configs.
``pretrain`` trains a GPT-2-shaped model built from config (384 wide, 6 layers: 12 M
parameters; ``--size tiny`` for tests) on the training sentences and reports its validation
perplexity. ``pairs`` samples continuations of the GRPO prompts from the pre-trained writer
and keeps, for each prompt, the one the judge rates most positive as chosen and the one it
rates least as rejected (on-policy pairs). ``evaluate`` samples one continuation per
validation prompt from the reference model and from each tuned run and reports the share the
judge rates positive, the mean reward (the judge's probability of positive), the KL to the
reference (mean over samples of Σ log π − log π_ref over the sampled tokens) and the
reference's perplexity of the samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

SST2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "datasets", "sst2")
PROMPT_WORDS = 3


def _read(name: str) -> list[dict]:
    with open(os.path.join(SST2, name), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write(path: str, rows: list[dict]) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
    return path


def _dump(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def prepare(out: str, pairs: int, seed: int, vocab_size: int = 4096) -> None:
    import yaml

    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    train = [r for r in _read("train.jsonl") if len(r["text"].split()) >= PROMPT_WORDS + 3]
    val = [r for r in _read("validation.jsonl") if len(r["text"].split()) >= PROMPT_WORDS + 3]
    rng.shuffle(val)
    build_tokenizer([r["text"] for r in train], vocab_size).save_pretrained(os.path.join(out, "tokenizer"))
    _write(os.path.join(out, "lm_train.jsonl"), [{"text": r["text"]} for r in train])
    _write(os.path.join(out, "lm_val.jsonl"), [{"text": r["text"]} for r in val[:500]])
    pos = [r["text"].split() for r in train if int(r["label"]) == 1]
    neg = [r["text"].split() for r in train if int(r["label"]) == 0]
    rows = []
    for _ in range(pairs):
        prompt = rng.choice(train)["text"].split()[:PROMPT_WORDS]
        rows.append({"prompt": " ".join(prompt), "chosen": " " + " ".join(rng.choice(pos)[PROMPT_WORDS:]),
                     "rejected": " " + " ".join(rng.choice(neg)[PROMPT_WORDS:])})
    held = min(64, pairs // 4)
    _write(os.path.join(out, "pairs.jsonl"), rows[: pairs - held])
    _write(os.path.join(out, "pairs_val.jsonl"), rows[pairs - held :])
    _write(os.path.join(out, "prompts.jsonl"), [{"prompt": " ".join(r["text"].split()[:PROMPT_WORDS])} for r in rng.sample(train, 2000)])
    _write(os.path.join(out, "val_prompts.jsonl"), [{"prompt": " ".join(r["text"].split()[:PROMPT_WORDS])} for r in val[500:756]])
    _write(os.path.join(out, "val_prompts_small.jsonl"), [{"prompt": " ".join(r["text"].split()[:PROMPT_WORDS])} for r in val[756:788]])
    base = os.path.abspath(os.path.join(out, "lm"))
    lora = {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]}
    configs = {
        "sentiment": {"task": "classification", "model": {"name": "minilm", "max_length": 64},
                      "data": {"train": os.path.abspath(os.path.join(SST2, "train.jsonl")),
                               "validation": os.path.abspath(os.path.join(SST2, "validation.jsonl")),
                               "max_train_examples": 16000, "max_eval_examples": 872},
                      "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
                      "train": {"epochs": 1, "batch_size": 32, "lr": 2e-3, "seed": seed, "log_every": 25},
                      "output_dir": os.path.abspath(os.path.join(out, "sentiment"))},
        "dpo": {"task": {"name": "preference", "beta": 0.1}, "model": {"name": base, "max_length": 64},
                "data": {"train": os.path.abspath(os.path.join(out, "pairs.jsonl")),
                         "validation": os.path.abspath(os.path.join(out, "pairs_val.jsonl"))},
                "method": lora, "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "seed": seed, "log_every": 10},
                "output_dir": os.path.abspath(os.path.join(out, "dpo"))},
        "dpo_sampled": {"task": {"name": "preference", "beta": 0.1}, "model": {"name": base, "max_length": 64},
                        "data": {"train": os.path.abspath(os.path.join(out, "pairs_sampled.jsonl")),
                                 "validation": os.path.abspath(os.path.join(out, "pairs_sampled_val.jsonl"))},
                        "method": lora, "train": {"epochs": 4, "batch_size": 16, "lr": 1e-3, "seed": seed, "log_every": 10},
                        "output_dir": os.path.abspath(os.path.join(out, "dpo_sampled"))},
        "grpo": {"task": {"name": "grpo", "reward": os.path.abspath(os.path.join(out, "sentiment")), "reward_label": "1",
                          "num_generations": 8, "max_completion_length": 16, "temperature": 1.0, "beta": 0.075,
                          "empty_reward": 0.0},
                 "model": {"name": base, "max_length": 64},
                 "data": {"train": os.path.abspath(os.path.join(out, "prompts.jsonl")),
                          "validation": os.path.abspath(os.path.join(out, "val_prompts_small.jsonl"))},
                 "method": lora, "train": {"max_steps": 400, "batch_size": 4, "lr": 2e-3, "eval_every": 200, "seed": seed,
                                           "log_every": 5},
                 "output_dir": os.path.abspath(os.path.join(out, "grpo"))},
    }
    for name, cfg in configs.items():
        with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
    print(f"{len(train)} training sentences, {len(rows)} pairs, configs in {out}")


SIZES = {"small": {"n_embd": 384, "n_layer": 6, "n_head": 6}, "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 2}}
EOS = "<|endoftext|>"


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer learnt from ``texts``; its one special token ends a review
    and pads (MiniLM's 30,522-word vocabulary would make the output layer most of a small
    model's compute)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS, bos_token=EOS, model_max_length=64)


def _tokenizer(out: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))


def _texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def _encode(tok, texts: list[str]) -> list[list[int]]:
    enc = tok(texts, add_special_tokens=False, truncation=True, max_length=63)
    return [[*ids, tok.eos_token_id] for ids in enc["input_ids"]]


def _batch(rows: list[list[int]], pad: int):
    import torch

    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _grouped(rows: list[list[int]], size: int, rng: random.Random) -> list[list[list[int]]]:
    """Batches of rows of similar length (little padding), in random order."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), rng.random()))
    batches = [[rows[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
    rng.shuffle(batches)
    return batches


def perplexity(model, tok, texts: list[str]) -> float:
    """exp of the mean negative log-likelihood per predicted token (the end-of-review token
    included, a review's first token excluded: nothing precedes it)."""
    import torch

    rows, total, count = _encode(tok, texts), 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            ids, mask, labels = _batch(rows[start : start + 64], tok.pad_token_id)
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
            count += n
    return math.exp(total / count)


def pretrain(out: str, steps: int, size: str, seed: int, batch_size: int = 32, lr: float = 6e-4, more: bool = False) -> dict:
    """Trains the review writer from scratch (or, with ``more``, the one in ``out/lm`` further):
    AdamW, linear warm-up over 5 % of ``steps`` then cosine decay to a tenth, length-grouped
    batches, gradient clipping at 1."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = _tokenizer(out)
    previous = None
    if more:
        model = GPT2LMHeadModel.from_pretrained(os.path.join(out, "lm"))
        with open(os.path.join(out, "lm_report.json"), encoding="utf-8") as fh:
            previous = json.load(fh)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, bos_token_id=tok.eos_token_id,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SIZES[size]))
    params = sum(p.numel() for p in model.parameters())
    rows = _encode(tok, _texts(os.path.join(out, "lm_train.jsonl")))
    val = _texts(os.path.join(out, "lm_val.jsonl"))
    print(f"{params / 1e6:.1f} M parameters; {len(rows)} training sentences, {sum(map(len, rows))} tokens", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    start, step, seen, recent, rng = time.monotonic(), 0, 0, [], random.Random(seed + (previous["steps"] if previous else 0))
    model.train()
    while step < steps:
        for rows_ in _grouped(rows, batch_size, rng):
            ids, mask, labels = _batch(rows_, tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, seen = step + 1, seen + int(mask.sum())
            recent = [*recent[-99:], loss.item()]
            if step % 100 == 0 or step == steps:
                print(f"step {step}/{steps}  loss {sum(recent) / len(recent):.3f} (mean of the last {len(recent)})  "
                      f"{time.monotonic() - start:.0f} s", flush=True)
            if step == steps:
                break
    minutes = (time.monotonic() - start) / 60
    ppl = perplexity(model, tok, val)
    folder = os.path.join(out, "lm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    epochs = seen / sum(map(len, rows))
    if previous:
        steps, epochs, minutes = steps + previous["steps"], epochs + previous["epochs"], minutes + previous["minutes"]
    report = {"parameters": params, "steps": steps, "epochs": round(epochs, 2), "minutes": round(minutes, 2),
              "threads": torch.get_num_threads(), "validation_perplexity": ppl}
    _dump(os.path.join(out, "lm_report.json"), report)
    print(f"{steps} steps in all, {minutes:.1f} min; validation perplexity {ppl:.1f}; saved {folder}")
    return report


def _sample(model, tok, prompts: list[str], new_tokens: int):
    """One continuation of each prompt sampled at temperature 1 (no top-k), as GRPO samples:
    the ids (prompt + continuation), their attention mask, the continuation's mask (up to and
    including the first end token) and its text. ``tok`` pads on the left."""
    import torch

    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    completion = ids[:, enc["input_ids"].shape[1] :]
    is_end = (completion == tok.eos_token_id).int()
    mask = (is_end.cumsum(1) - is_end == 0).long()
    texts = [tok.decode(c[: int(m.sum())], skip_special_tokens=True) for c, m in zip(completion, mask, strict=True)]
    return ids, torch.cat([enc["attention_mask"], mask], 1), mask, texts


def _scores(judge, prompts: list[str], texts: list[str]) -> list[float]:
    """The judge's probability that prompt + continuation is positive; an empty continuation
    scores 0 (the judge would rate the prompt alone)."""
    return [score if text.strip() else 0.0 for score, text in zip(judge(prompts, texts), texts, strict=True)]


def _tuned(out: str, run: str):
    """A tuning run's model: the base its config names (the writer, or an earlier round's
    merged policy) with the run's adapter."""
    import yaml
    from transformers import AutoModelForCausalLM

    from peftkit import PeftModel

    with open(os.path.join(out, run, "config.yaml"), encoding="utf-8") as fh:
        base = yaml.safe_load(fh)["model"]["name"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), os.path.join(out, run, "adapter"))


def sampled_pairs(out: str, per_prompt: int, margin: float, seed: int, new_tokens: int, limit: int | None = None,
                  policy: str | None = None) -> int:
    """Preference pairs from the writer's own samples: for each GRPO training prompt,
    ``per_prompt`` continuations sampled from the pre-trained writer and rated by the judge;
    chosen = the one rated most positive, rejected = the one rated least, kept when the
    judge's two ratings are at least ``margin`` apart (on-policy pairs: DPO then moves the
    writer towards text it already writes). Written to ``pairs_sampled.jsonl``.

    With ``policy`` (a finished DPO run in ``out``) the samples come from that run's model
    instead: its adapter is merged into its base and saved as ``out/<policy>/merged``, the
    pairs go to ``pairs_<policy>.jsonl`` and a config ``<policy>_next.yaml`` trains a new
    LoRA on the merged model (the next round of iterated DPO: its reference is the previous
    round's policy)."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from peftkit.train.tasks.grpo import RunReward

    tok = _tokenizer(out)
    tok.padding_side = "left"
    judge = RunReward(os.path.join(out, "sentiment"), "1")
    with open(os.path.join(out, "prompts.jsonl"), encoding="utf-8") as fh:
        prompts = [json.loads(line)["prompt"] for line in fh][:limit]
    if policy:
        model = _tuned(out, policy).merge_and_unload().eval()
        model.save_pretrained(os.path.join(out, policy, "merged"))
        tok.save_pretrained(os.path.join(out, policy, "merged"))
    else:
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm")).eval()
    torch.manual_seed(seed)
    rows, start = [], time.monotonic()
    for first in range(0, len(prompts), 32 // per_prompt or 1):
        chunk = prompts[first : first + (32 // per_prompt or 1)]
        repeated = [p for p in chunk for _ in range(per_prompt)]
        texts = _sample(model, tok, repeated, new_tokens)[3]
        scores = _scores(judge, repeated, texts)
        for i, prompt in enumerate(chunk):
            group = [(s, t) for s, t in zip(scores[i * per_prompt : (i + 1) * per_prompt], texts[i * per_prompt : (i + 1) * per_prompt],
                                            strict=True) if t.strip()]
            if len(group) < 2:
                continue
            (low, rejected), (high, chosen) = min(group), max(group)
            if high - low >= margin and chosen != rejected:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": round(high - low, 4)})
    held = min(64, len(rows) // 4)
    name = f"pairs_{policy}" if policy else "pairs_sampled"
    _write(os.path.join(out, f"{name}.jsonl"), rows[: len(rows) - held])
    _write(os.path.join(out, f"{name}_val.jsonl"), rows[len(rows) - held :])
    if policy:
        with open(os.path.join(out, policy, "config.yaml"), encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
        cfg["model"]["name"] = os.path.abspath(os.path.join(out, policy, "merged"))
        cfg["data"] = {"train": os.path.abspath(os.path.join(out, f"{name}.jsonl")),
                       "validation": os.path.abspath(os.path.join(out, f"{name}_val.jsonl"))}
        cfg["output_dir"] = os.path.abspath(os.path.join(out, f"{policy}_next"))
        # a later round starts nearer its goal: two epochs (four drifted past the fluency
        # bound in the measured run, BENCHMARKS.md)
        cfg["train"]["epochs"] = min(cfg["train"].get("epochs") or 2, 2)
        with open(os.path.join(out, f"{policy}_next.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
    print(f"{len(rows)} pairs from {len(prompts)} prompts × {per_prompt} samples ({time.monotonic() - start:.0f} s)")
    return len(rows)


def evaluate(out: str, runs: list[str], seed: int, new_tokens: int, limit: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.alignment import per_token_logps
    from peftkit.train.tasks.grpo import RunReward

    tok = _tokenizer(out)
    tok.padding_side = "left"
    judge = RunReward(os.path.join(out, "sentiment"), "1")
    with open(os.path.join(out, "val_prompts.jsonl"), encoding="utf-8") as fh:
        prompts = [json.loads(line)["prompt"] for line in fh][:limit]
    reference = AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm")).eval()
    report = {}
    for name in ["reference", *runs]:
        model = reference if name == "reference" else _tuned(out, name).eval()
        torch.manual_seed(seed)
        rewards, kls, nll, count, shown = [], [], 0.0, 0, []
        for start in range(0, len(prompts), 32):
            chunk = prompts[start : start + 32]
            ids, full_mask, mask, texts = _sample(model, tok, chunk, new_tokens)
            with torch.no_grad():
                keep = mask.shape[1]
                policy = per_token_logps(model, ids, full_mask, logits_to_keep=keep)
                ref = per_token_logps(reference, ids, full_mask, logits_to_keep=keep)
            kls += ((policy - ref) * mask).sum(1).tolist()
            nll += float(-(ref * mask).sum())
            count += int(mask.sum())
            rewards += _scores(judge, chunk, texts)
            shown += [p + t for p, t in zip(chunk, texts, strict=True)][: max(0, 4 - len(shown))]
        report[name] = {"positive_share": sum(r > 0.5 for r in rewards) / len(rewards), "mean_reward": sum(rewards) / len(rewards),
                        "kl_to_reference": sum(kls) / len(kls), "reference_perplexity": math.exp(nll / max(count, 1)),
                        "samples": len(rewards), "examples": shown}
        print(name, json.dumps(report[name]))
    _dump(os.path.join(out, "steering_report.json"), report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["prepare", "pretrain", "pairs", "evaluate"])
    parser.add_argument("--out", default="runs/steer")
    parser.add_argument("--steps", type=int, default=1000, help="pre-training steps (batches of 32 sentences)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="small: 12 M parameters; tiny: for tests")
    parser.add_argument("--lr", type=float, default=6e-4, help="pretrain: the peak learning rate")
    parser.add_argument("--more", action="store_true", help="pretrain: train the writer in OUT/lm further (a new warm-up and decay)")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--per-prompt", type=int, default=4, help="pairs: continuations sampled for each prompt")
    parser.add_argument("--margin", type=float, default=0.5, help="pairs: the least gap between the judge's two ratings")
    parser.add_argument("--pair-prompts", type=int, default=2000, help="pairs: sample for the first N training prompts")
    parser.add_argument("--policy", default=None, help="pairs: sample from this DPO run's model (the next round), not the writer")
    parser.add_argument("--runs", default="dpo,dpo_sampled,dpo_sampled_next,grpo")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=256, help="evaluate on the first N validation prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.step == "prepare":
        prepare(args.out, args.pairs, args.seed)
    elif args.step == "pretrain":
        pretrain(args.out, args.steps, args.size, args.seed, lr=args.lr, more=args.more)
    elif args.step == "pairs":
        sampled_pairs(args.out, args.per_prompt, args.margin, args.seed, args.new_tokens, args.pair_prompts, args.policy)
    else:
        evaluate(args.out, [r for r in args.runs.split(",") if r], args.seed, args.new_tokens, args.prompts)


if __name__ == "__main__":
    main()
