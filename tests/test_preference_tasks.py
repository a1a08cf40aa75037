"""`peftkit train` tasks `reward`, `preference` and `grpo` on a tiny Llama with a word-level
tokenizer: TRL's metric names in metrics.jsonl and on the progress line, bad pairs reported
by line before training, chat and OpenAI records, precomputed reference log-probabilities
(no reference forward afterwards), LoRA / (IA)³ / full fine-tuning, a reward run and a
Python function as GRPO's reward, `peftkit compare` on a preference task, QLoRA's reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.train import ConfigError, build_config, run_training
from pref_helpers import save_model_dir, tiny_word_bert_classifier, tiny_word_llama, word_tokenizer

pytest.importorskip("accelerate")

GOOD, BAD = ["great", "lovely", "superb", "good"], ["awful", "dull", "bad", "poor"]
POSITIVE_WORDS = "def reward(prompts, completions):\n    return [float(sum(w in c.split() for w in {words!r})) for c in completions]\n"


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"the {'film' if i % 2 else 'movie'} was", "chosen": f" {GOOD[i % 4]}", "rejected": f" {BAD[(i + 1) % 4]}"}
            for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    tok = word_tokenizer(chat=True)
    return {"root": root, "tok": tok, "llama": save_model_dir(root, "llama", tiny_word_llama(len(tok)), tok),
            "bert": save_model_dir(root, "bert", tiny_word_bert_classifier(len(tok)), tok),
            "bert2": save_model_dir(root, "bert2", tiny_word_bert_classifier(len(tok), num_labels=2), tok),
            "pairs": _jsonl(root / "pairs.jsonl", _pairs(32)), "val": _jsonl(root / "val.jsonl", _pairs(8))}


def _raw(ws, task, out, model="llama", method=None, steps=6, **train):
    return {"task": task, "model": {"name": str(ws[model]), "max_length": 32},
            "data": {"train": str(ws["pairs"]), "validation": str(ws["val"])},
            "method": method or {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 5e-3, "eval_every": 3, "log_every": 2, "threads": 1, **train},
            "output_dir": str(ws["root"] / out)}


def _rows(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "loss" not in r]


TRL_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}


def test_default_preference_task_is_dpo_sigmoid_with_beta_0_1(ws):
    cfg = build_config(_raw(ws, "preference", "x"))
    assert (cfg.task_options.loss_type, cfg.task_options.beta, cfg.data.prompt_column, cfg.data.chosen_column,
            cfg.data.rejected_column) == ("sigmoid", 0.1, "prompt", "chosen", "rejected")
    with pytest.raises(ConfigError, match="loss_type must be one of"):
        build_config(_raw(ws, {"name": "preference", "loss_type": "sigmoidd"}, "x"))


def test_dpo_with_lora_from_the_command_line_logs_trls_metrics(ws, capsys):
    from peftkit.cli import main

    path = ws["root"] / "dpo.yaml"
    path.write_text(yaml.safe_dump(_raw(ws, "preference", "dpo")))
    assert main(["train", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "rewards/accuracies" in shown and "rewards/margins" in shown  # the progress line
    out = ws["root"] / "dpo"
    train, evals = _rows(out)
    assert train and all(TRL_KEYS <= set(r) for r in train)
    assert evals and all(TRL_KEYS | {"eval_loss"} <= set(r) for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["metric_before"], summary["metric_after"]
    assert summary["metric"] == "rewards/accuracies" and before["rewards/margins"] == 0.0  # the policy starts as its reference
    assert after["rewards/margins"] > 0 and after["rewards/accuracies"] > before["rewards/accuracies"]
    assert after["eval_loss"] < before["eval_loss"]
    assert (out / "training_curve.png").stat().st_size > 0 and (out / "adapter" / "adapter_model.safetensors").is_file()
    # the finished run evaluates on other pairs and writes completions for prompts
    assert main(["eval", str(out), "--data", str(ws["val"])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["examples"] == 8 and abs(shown["rewards/margins"] - after["rewards/margins"]) < 1e-5  # the same pairs
    assert main(["predict", str(out), "--input", str(ws["val"]), "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith(("the film was\t", "the movie was\t")) for line in lines)


def test_bad_pairs_are_reported_by_line_before_anything_trains(ws):
    rows = _pairs(6)
    rows[1] = {"prompt": "the film", "chosen": " great"}                 # line 2: no rejected
    rows[2] = {**rows[2], "chosen": "  "}                                # line 3: empty completion
    rows[4] = {**rows[4], "rejected": rows[4]["chosen"]}                 # line 5: identical
    bad = _jsonl(ws["root"] / "bad.jsonl", rows)
    raw = _raw(ws, "preference", "bad")
    raw["data"] = {"train": str(bad)}
    with pytest.raises(ConfigError) as err:
        run_training(build_config(raw), quiet=True)
    text = str(err.value)
    assert "3 bad" in text and f"{bad}:2: no rejected" in text and f"{bad}:3: empty chosen" in text
    assert f"{bad}:5: chosen is identical to rejected" in text
    long = _jsonl(ws["root"] / "long.jsonl", [*_pairs(3), {"prompt": " ".join(["the film"] * 20), "chosen": " good", "rejected": " bad"}])
    raw["data"] = {"train": str(long)}
    with pytest.raises(ConfigError, match=rf"{long}:4: the prompt takes all 32 tokens.*no room"):
        run_training(build_config(raw), quiet=True)
    assert not (ws["root"] / "bad" / "metrics.jsonl").exists()


def test_chat_and_openai_records_mask_the_prompt(ws):
    from peftkit.train.tasks.preference import PairCollator, PairData, PairEncoder

    tok = ws["tok"]
    encode = PairEncoder(tok, PairData(), 64, None)
    chat = {"prompt": [{"role": "user", "content": "review the film"}], "chosen": [{"role": "assistant", "content": "great"}],
            "rejected": [{"role": "assistant", "content": "awful"}]}
    openai = {"input": {"messages": chat["prompt"]}, "preferred_output": chat["chosen"], "non_preferred_output": chat["rejected"]}
    item = encode(chat)
    assert item == encode(openai)
    prompt = tok("user : review the film assistant :", add_special_tokens=False)["input_ids"]
    assert item["chosen_ids"][: item["prompt_length"]] == prompt  # the chat template's rendering
    batch = PairCollator(0)([item])
    chosen_completion = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert tok.decode(chosen_completion) == "great <eos>"  # only the completion (and its end) is scored


def test_precomputed_reference_logps_make_no_reference_forward(ws, monkeypatch):
    from peftkit import PeftModel

    calls = []
    original = PeftModel.disable_adapter
    monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: calls.append(1) or original(self))
    plain = run_training(build_config(_raw(ws, "preference", "live", steps=2)), overwrite=True, quiet=True)
    assert calls  # the reference forward switches the adapters off
    calls.clear()
    cached = run_training(build_config(_raw(ws, {"name": "preference", "precompute_ref_logps": True}, "cached", steps=2)),
                          overwrite=True, quiet=True)
    assert not calls
    # the cached reference is the same reference: the same training, within float rounding
    for a, b in zip(_rows(ws["root"] / "live")[0], _rows(ws["root"] / "cached")[0], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5
    assert abs(plain["metric_after"]["rewards/margins"] - cached["metric_after"]["rewards/margins"]) < 1e-5


@pytest.mark.parametrize(("name", "method", "loss_type"), [
    ("ia3", {"name": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, "ipo"),
    ("full", {"name": "full"}, "sigmoid"),
    ("orpo", None, "orpo"),
])
def test_methods_and_loss_types_train(ws, name, method, loss_type):
    from peftkit.train.plugins import get_task

    raw = _raw(ws, {"name": "preference", "loss_type": loss_type, "beta": 0.5}, f"m-{name}", method=method, steps=4,
               lr=1e-3 if name == "full" else 1e-2)
    summary = run_training(build_config(raw), overwrite=True, quiet=True)
    task = get_task("preference")
    if name == "full":  # weights trained in place: the reference is a frozen copy, and stays the untouched base
        assert task.reference is not None and not any(p.requires_grad for p in task.reference.parameters())
        untouched = tiny_word_llama(len(ws["tok"])).state_dict()
        assert all(torch.equal(value, untouched[key]) for key, value in task.reference.state_dict().items())
    else:
        assert task.reference is None
    assert summary["metric_after"]["eval_loss"] < summary["metric_before"]["eval_loss"]


def test_reward_run_then_grpo_scored_by_it_and_by_a_function(ws):
    reward = run_training(build_config(_raw(ws, "reward", "rm", model="bert", method={"name": "lora", "r": 4,
                                                                                    "target_modules": ["query", "value"]},
                                            lr=2e-2)), overwrite=True, quiet=True)
    assert reward["metric"] == "accuracy" and reward["metric_after"]["accuracy"] >= reward["metric_before"]["accuracy"]
    train, evals = _rows(ws["root"] / "rm")
    assert {"accuracy", "margin"} <= set(train[-1]) and "accuracy" in evals[-1]
    # a sentiment classifier run: its probability of "pos" is the reward
    texts = [{"text": f"the film was {(GOOD if i % 2 else BAD)[i % 4]}", "label": "pos" if i % 2 else "neg"} for i in range(16)]
    classifier = _raw(ws, "classification", "clf", model="bert2", method={"name": "lora", "r": 4, "target_modules": ["query"]},
                      steps=2)
    classifier["data"] = {"train": str(_jsonl(ws["root"] / "sentiment.jsonl", texts))}
    run_training(build_config(classifier), overwrite=True, quiet=True)
    (ws["root"] / "words.py").write_text(POSITIVE_WORDS.format(words=GOOD))
    for reward_spec, label, out, beta in ((str(ws["root"] / "rm"), None, "grpo-rm", 0.0), ("words.py:reward", None, "grpo-fn", 0.04),
                                          (str(ws["root"] / "clf"), "pos", "grpo-clf", 0.0)):
        raw = _raw(ws, {"name": "grpo", "reward": reward_spec, "reward_label": label, "num_generations": 4,
                        "max_completion_length": 5, "beta": beta}, out, steps=2, batch_size=4)
        raw["data"]["max_eval_examples"] = 4
        path = ws["root"] / f"{out}.yaml"
        path.write_text(yaml.safe_dump(raw))
        from peftkit.train import load_config

        summary = run_training(load_config(str(path)), overwrite=True, quiet=True)  # words.py is found next to the config
        train, evals = _rows(ws["root"] / out)
        keys = {"reward", "reward_std", "completions/mean_length", "clip_ratio/region_mean", "frac_reward_zero_std"}
        assert keys <= set(train[-1]) and ("kl" in train[-1]) == bool(beta)
        assert summary["metric"] == "reward" and 0 < train[-1]["completions/mean_length"] <= 5
        assert summary["throughput"] > 0  # generated tokens per second
        if label is not None:
            assert all(0.0 <= r["reward"] <= 1.0 for r in train + evals)  # a class probability
    bad = _raw(ws, {"name": "grpo", "reward": "nowhere.py:f", "max_completion_length": 5}, "grpo-bad")
    with pytest.raises(ConfigError, match="nowhere.py"):
        run_training(build_config(bad), overwrite=True, quiet=True)


def test_compare_runs_preference_methods_side_by_side(ws, capsys):
    from peftkit.cli import main

    raw = _raw(ws, "preference", "cmp", steps=2)
    del raw["method"]
    path = ws["root"] / "cmp.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = ws["root"] / "cmp-report"
    from peftkit.train.compare import run_config

    for name in ("lora", "ia3"):  # trained here, in this process; compare then finds them finished and reuses them
        cfg = run_config(raw, name, str(out))
        folder = Path(cfg["output_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compare_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
        run_training(build_config(cfg), overwrite=True, quiet=True)
    capsys.readouterr()
    assert main(["compare", str(path), "--methods", "lora,ia3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    data = json.loads((out / "compare.json").read_text())
    assert data["metric"] == "rewards/accuracies"
    assert {r["method"]: r["status"] for r in data["rows"]} == {"lora": "ok", "ia3": "ok"}
    assert all(r["metric"] is not None for r in data["rows"])


def test_qlora_reference_is_the_quantised_base(ws):
    pytest.importorskip("bitsandbytes")
    from peftkit import LoraConfig, get_peft_model
    from peftkit.alignment import completion_logps, reference_mode
    from peftkit.quantization import quantize_model
    from pref_helpers import perturb

    tok = ws["tok"]
    base = tiny_word_llama(len(tok))
    try:
        quantize_model(base, bits=4, skip_modules=["lm_head"])
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # a build of bitsandbytes without CPU 4-bit kernels
        pytest.skip(f"bitsandbytes cannot quantise on this CPU: {exc}")
    ids = torch.tensor([[3, 5, 7, 9, 1], [3, 6, 8, 10, 1]])
    mask, completion = torch.ones_like(ids), torch.tensor([[0, 0, 0, 1, 1]] * 2)
    with torch.no_grad():
        expected, _ = completion_logps(base, ids, mask, completion)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model, scale=0.5, trainable_only=True)
    with reference_mode(model) as ref:
        ours, _ = completion_logps(ref, ids, mask, completion)
    policy, _ = completion_logps(model, ids, mask, completion)
    assert torch.equal(ours, expected) and not torch.allclose(policy.detach(), expected)
    policy.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_grpo_empty_reward_replaces_the_score_of_empty_completions(ws):
    from peftkit.train.tasks.grpo import GRPOOptions, GRPOTask, PromptCollator

    tok = ws["tok"]
    model = tiny_word_llama(len(tok)).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0  # every completion ends at once: no text
    model.lm_head = head
    batch = PromptCollator(tok.pad_token_id)([{"prompt_ids": tok("the film was", add_special_tokens=False)["input_ids"],
                                                "prompt": "the film was"}] * 2)
    for empty_reward, expected in ((None, 0.9), (0.0, 0.0), (-1.0, -1.0)):
        task = GRPOTask()
        task.opts = GRPOOptions(reward="f.py:f", num_generations=2, max_completion_length=4, empty_reward=empty_reward)
        task.tokenizer, task.reward = tok, lambda prompts, completions: [0.9] * len(completions)
        sample = task.sample(model, batch)
        assert sample["texts"] == ["", "", "", ""]
        assert sample["rewards"].tolist() == pytest.approx([expected] * 4)


@pytest.mark.parametrize(("options", "message"), [({"sft_weight": -1.0}, "non-negative"),
                                                  ({"sft_weight": 1.0, "loss_type": "orpo"}, "own likelihood term"),
                                                  ({"sft_weight": 1.0, "loss_type": "simpo"}, "DPO family")])
def test_sft_weight_is_checked(options, message):
    from peftkit.train.tasks.preference import PreferenceOptions

    with pytest.raises(ConfigError, match=message):
        PreferenceOptions(**options)
