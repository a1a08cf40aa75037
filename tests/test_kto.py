"""KTO: ``kto_loss`` and its gradients equal TRL's ``KTOTrainer`` on the same tiny model and
batch (TRL as a test-only peer), with the same mismatched rows for the KL reference point;
the ``kto`` task of ``peftkit train`` raises the desirable completions' rewards against the
undesirable ones (LoRA, full fine-tuning, precomputed reference log-probabilities), reports
bad records by line before training, and names the fix for a batch too small for the KL term."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from peftkit.alignment import completion_logps, kto_loss
from peftkit.train import ConfigError, build_config, run_training
from pref_helpers import perturb, save_model_dir, tiny_word_llama, word_tokenizer

TOL = 1e-5
GOOD, BAD = ["great", "lovely", "superb", "good"], ["awful", "dull", "bad", "poor"]
EXAMPLES = [
    {"prompt": "the film was", "completion": " great and lovely", "label": True},
    {"prompt": "i liked the", "completion": " plot but not the story", "label": False},
    {"prompt": "this movie is", "completion": " very good", "label": True},
    {"prompt": "the story", "completion": " is poor", "label": False},
    {"prompt": "the acting", "completion": " was dull and boring", "label": False},
    {"prompt": "it was", "completion": " superb", "label": True},
]


# -- the loss equals TRL's -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_kto(tmp_path_factory):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import KTOConfig, KTOTrainer

    tok = word_tokenizer()
    policy = tiny_word_llama(len(tok))
    ref = copy.deepcopy(policy)
    perturb(policy)
    args = KTOConfig(output_dir=str(tmp_path_factory.mktemp("kto") / "unused"), per_device_train_batch_size=len(EXAMPLES),
                     report_to=[], use_cpu=True, bf16=False)  # bf16 would fix accelerate's state for the runs below
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(EXAMPLES),
                         processing_class=tok)
    trainer.model.train()  # TRL logs training metrics under "train"
    batch = next(iter(trainer.get_train_dataloader()))
    return SimpleNamespace(trainer=trainer, batch=batch, policy=trainer.model, ref=trainer.ref_model)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(("loss_type", "beta", "desirable_weight", "undesirable_weight"),
                         [("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.33, 0.8), ("apo_zero_unpaired", 0.2, 1.0, 1.5)])
def test_kto_loss_and_gradients_equal_trl(trl_kto, loss_type, beta, desirable_weight, undesirable_weight):
    tr, b, policy = trl_kto.trainer, trl_kto.batch, trl_kto.policy
    tr.loss_type, tr.beta, tr.desirable_weight, tr.undesirable_weight = loss_type, beta, desirable_weight, undesirable_weight
    policy.zero_grad()
    theirs = tr.compute_loss(policy, dict(b))
    theirs.backward()
    their_grads = _grads(policy)
    policy.zero_grad()
    logps, _ = completion_logps(policy, b["input_ids"], b["attention_mask"], b["completion_mask"])
    with torch.no_grad():
        kl_logps, _ = completion_logps(policy, b["KL_input_ids"], b["KL_attention_mask"], b["KL_completion_mask"])
        ref_logps, _ = completion_logps(trl_kto.ref, b["input_ids"], b["attention_mask"], b["completion_mask"])
        ref_kl, _ = completion_logps(trl_kto.ref, b["KL_input_ids"], b["KL_attention_mask"], b["KL_completion_mask"])
    losses, rewards, kl = kto_loss(logps, ref_logps, b["label"], kl_logps, ref_kl, beta=beta, desirable_weight=desirable_weight,
                                   undesirable_weight=undesirable_weight, loss_type=loss_type)
    ours = losses.mean()
    ours.backward()
    assert abs(ours.item() - theirs.item()) < TOL and ours.item() != 0.0
    ours_grads = _grads(policy)
    assert len(ours_grads) == len(their_grads) and ours_grads
    for x, y in zip(ours_grads, their_grads, strict=True):
        torch.testing.assert_close(x, y, atol=TOL, rtol=1e-4)
    logged = tr._metrics["train"]
    desirable = b["label"].bool()
    assert abs(logged["rewards/chosen"][-1] - float(rewards[desirable].mean())) < TOL
    assert abs(logged["rewards/rejected"][-1] - float(rewards[~desirable].mean())) < TOL
    assert abs(logged["logps/chosen"][-1] - logps[desirable].mean().item()) < 1e-4
    if loss_type == "kto":
        assert abs(logged["kl"][-1] - float(kl)) < TOL and float(kl) > 0  # the policy moved: the estimate is not clamped


def test_collator_makes_trls_mismatched_rows_and_kl_is_clamped(trl_kto):
    from peftkit.train.tasks.kto import UnpairedCollator

    rows = trl_kto.trainer.train_dataset
    items = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"], "desirable": r["label"]} for r in rows]
    ours = UnpairedCollator(pad_id=0, max_length=64, kl=True)(items)
    b = trl_kto.batch
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], b[key]) and torch.equal(ours[f"kl_{key}"], b[f"KL_{key}"])
    # a policy that, on average, likes the mismatched pairs less than the reference does: z = 0, not negative
    z = torch.zeros(3)
    _, _, kl = kto_loss(z, z, torch.tensor([True, False, True]), torch.tensor([-3.0, 1.0, -1.0]), z)
    assert float(kl) == 0.0
    with pytest.raises(ValueError, match="kl_logps"):
        kto_loss(z, z, torch.tensor([True, False, True]))


# -- the kto task of peftkit train -------------------------------------------------------------------
def _examples(n: int, offset: int = 0) -> list[dict]:
    """Two in three desirable (a positive word), the others undesirable (a negative word)."""
    return [{"prompt": f"the {'film' if i % 2 else 'movie'} was", "completion": f" {(GOOD if i % 3 else BAD)[i % 4]}",
             "label": bool(i % 3)} for i in range(offset, offset + n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("kto-task")
    tok = word_tokenizer(chat=True)
    return {"root": root, "tok": tok, "llama": save_model_dir(root, "llama", tiny_word_llama(len(tok)), tok),
            "train": _jsonl(root / "train.jsonl", _examples(36)), "val": _jsonl(root / "val.jsonl", _examples(12, offset=1))}


def _raw(ws, task, out, method=None, steps=6, **train):
    return {"task": task, "model": {"name": str(ws["llama"]), "max_length": 32},
            "data": {"train": str(ws["train"]), "validation": str(ws["val"])},
            "method": method or {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-2, "eval_every": 3, "log_every": 2, "threads": 1, **train},
            "output_dir": str(ws["root"] / out)}


def _rows(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "loss" not in r]


TRL_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"}


def test_kto_with_lora_from_the_command_line_raises_the_desirable_rewards(ws, capsys):
    from peftkit.cli import main

    path = ws["root"] / "kto.yaml"
    path.write_text(yaml.safe_dump(_raw(ws, {"name": "kto", "desirable_weight": 0.5}, "kto")))
    assert main(["train", str(path)]) == 0
    assert "rewards/margins" in capsys.readouterr().out  # the progress line
    out = ws["root"] / "kto"
    train, evals = _rows(out)
    assert train and all(TRL_KEYS <= set(r) for r in train)
    assert evals and all(TRL_KEYS | {"eval_loss"} <= set(r) for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["metric_before"], summary["metric_after"]
    assert summary["metric"] == "eval_loss" and before["rewards/margins"] == 0.0 and before["kl"] == 0.0  # policy == reference
    assert after["rewards/margins"] > 0.005 and after["rewards/chosen"] > 0 > after["rewards/rejected"]
    assert after["logps/chosen"] > before["logps/chosen"] + 0.05  # desirable completions became likelier
    assert after["eval_loss"] < before["eval_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["eval", str(out), "--data", str(ws["val"])]) == 0  # the finished run, on the same examples
    shown = json.loads(capsys.readouterr().out)
    assert shown["examples"] == 12 and abs(shown["rewards/margins"] - after["rewards/margins"]) < 1e-5
    assert main(["predict", str(out), "--input", str(ws["val"]), "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12 and all(line.startswith(("the film was\t", "the movie was\t")) for line in lines)


def test_full_fine_tuning_keeps_a_frozen_reference_and_precomputed_logps_need_no_reference(ws, monkeypatch):
    from peftkit import PeftModel
    from peftkit.train.plugins import get_task

    with pytest.warns(UserWarning, match=r"24 desirable .* 12 undesirable.* is 2.00; the KTO paper advises 1 to 4/3"):
        summary = run_training(build_config(_raw(ws, "kto", "full", method={"name": "full"}, steps=4, lr=1e-3)),
                               overwrite=True, quiet=True)
    task = get_task("kto")
    assert task.reference is not None and not any(p.requires_grad for p in task.reference.parameters())
    untouched = tiny_word_llama(len(ws["tok"])).state_dict()
    assert all(torch.equal(value, untouched[key]) for key, value in task.reference.state_dict().items())
    assert summary["metric_after"]["rewards/margins"] > 0
    calls = []
    original = PeftModel.disable_adapter
    monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: calls.append(1) or original(self))
    cached = run_training(build_config(_raw(ws, {"name": "kto", "precompute_ref_logps": True, "desirable_weight": 0.5},
                                            "cached", steps=4)), overwrite=True, quiet=True)
    assert not calls and task.reference is None  # no reference forward, no copy
    assert cached["metric_after"]["rewards/margins"] > 0 and cached["metric_after"]["kl"] > 0


def test_bad_records_are_reported_by_line_before_anything_trains(ws):
    rows = _examples(8)
    rows[1] = {"prompt": "the film", "label": True}                      # line 2: no completion
    rows[2] = {**rows[2], "completion": "  "}                            # line 3: empty completion
    rows[4] = {**rows[4], "label": "maybe"}                              # line 5: not a boolean
    rows[6] = {**rows[6], "label": 2}                                    # line 7: not a boolean
    bad = _jsonl(ws["root"] / "bad.jsonl", rows)
    raw = _raw(ws, "kto", "bad")
    raw["data"] = {"train": str(bad)}
    with pytest.raises(ConfigError) as err:
        run_training(build_config(raw), quiet=True)
    text = str(err.value)
    assert "4 bad" in text and f"{bad}:2: no completion" in text and f"{bad}:3: empty completion" in text
    assert f"{bad}:5: label 'maybe' is not a boolean" in text and f"{bad}:7: label 2 is not a boolean" in text
    csv = ws["root"] / "labels.csv"  # CSV labels are text; line numbers count the header
    csv.write_text("prompt,completion,label\nthe film was, great,true\nthe movie was, awful,0\nthe film was, dull,no\n")
    raw["data"] = {"train": str(csv)}
    with pytest.raises(ConfigError, match=rf"{csv}:4: label 'no' is not a boolean"):
        run_training(build_config(raw), quiet=True)
    one_sided = _jsonl(ws["root"] / "good.jsonl", [r for r in _examples(9) if r["label"]])
    raw["data"] = {"train": str(one_sided)}
    with pytest.raises(ConfigError, match="all 6 training records are desirable.*add undesirable"):
        run_training(build_config(raw), quiet=True)
    long = _jsonl(ws["root"] / "long.jsonl", [*_examples(3), {"prompt": " ".join(["the film"] * 20), "completion": " good",
                                                              "label": 1}])
    raw["data"] = {"train": str(long)}
    with pytest.raises(ConfigError, match=rf"{long}:4: the prompt takes all 32 tokens.*no room"):
        run_training(build_config(raw), quiet=True)
    assert not (ws["root"] / "bad").exists()


def test_config_errors_name_the_fix(ws):
    with pytest.raises(ConfigError, match=r"loss_type must be one of \['kto', 'apo_zero_unpaired'\].*task: preference"):
        build_config(_raw(ws, {"name": "kto", "loss_type": "sigmoid"}, "x"))
    with pytest.raises(ConfigError, match="train.batch_size .* at least 2.*apo_zero_unpaired"):
        run_training(build_config(_raw(ws, "kto", "one", batch_size=1)), quiet=True)


def test_chat_records_score_only_the_assistants_completion(ws):
    from peftkit.train.tasks.kto import UnpairedCollator, UnpairedData, UnpairedEncoder

    tok = ws["tok"]
    encode = UnpairedEncoder(tok, UnpairedData(), 64, None)
    item = encode({"prompt": [{"role": "user", "content": "review the film"}],
                   "completion": [{"role": "assistant", "content": "great"}], "label": 1})
    assert item["prompt_ids"] == tok("user : review the film assistant :", add_special_tokens=False)["input_ids"]
    assert item["desirable"] is True
    other = encode({"prompt": "the movie was", "completion": " awful", "label": "false"})
    batch = UnpairedCollator(0, 64, kl=True)([item, other])
    scored = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert tok.decode(scored) == "great <eos>"
    mismatched = batch["kl_input_ids"][0][batch["kl_completion_mask"][0].bool()].tolist()
    assert tok.decode(mismatched) == "awful <eos>" and batch["desirable"].tolist() == [True, False]
