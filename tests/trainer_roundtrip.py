"""transformers' Trainer with a peftkit model, end to end: run as a script (in a process
that may hide ``peft``) or call :func:`main`. Prints ``TRAINER ROUNDTRIP OK`` when every
check passed; any failed check raises."""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 100, (8,), generator=g), "labels": i % 2}


def _model():
    from models import tiny_bert
    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # SEQ_CLS: the classifier is a modules_to_save copy, trained and saved with the adapter.
    return get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))


def _args(out: str, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(out, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             save_strategy="steps", save_steps=2, disable_tqdm=True, logging_strategy="no", **kw)


def _adapter_state(model) -> dict:
    from peftkit import get_peft_model_state_dict

    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def main() -> None:
    from safetensors.torch import load_file
    from transformers import Trainer

    from peftkit import PeftModel

    root = tempfile.mkdtemp()
    x = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(99))

    # 1. train with gradient checkpointing, evaluation and load_best_model_at_end; save_model.
    model = _model()
    start = _adapter_state(model)
    run = os.path.join(root, "run")
    trainer = Trainer(model=model, train_dataset=_Data(), eval_dataset=_Data(),
                      args=_args(run, max_steps=4, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                                 gradient_checkpointing=True))
    trainer.train()
    trained = _adapter_state(model)
    # Every adapter tensor moved, those inside the checkpointed blocks too (gradients reach them).
    unchanged = [k for k in start if torch.equal(start[k], trained[k])]
    assert not unchanged, unchanged
    assert "base_model.model.classifier.weight" in trained, sorted(trained)
    best = trainer.state.best_model_checkpoint
    assert best is not None
    best_file = load_file(os.path.join(best, "adapter_model.safetensors"))
    assert set(best_file) == set(trained)
    for k in trained:  # load_best_model_at_end put the best checkpoint's adapter in the model
        assert torch.equal(best_file[k], trained[k]), k
    final = os.path.join(root, "final")
    trainer.save_model(final)
    for folder, _, files in os.walk(root):
        assert not {"model.safetensors", "pytorch_model.bin"} & set(files), (folder, files)
    for ckpt in ("checkpoint-2", "checkpoint-4", "final"):
        files = set(os.listdir(os.path.join(run if ckpt != "final" else root, ckpt)))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, (ckpt, files)

    # 2. reload with PeftModel.from_pretrained: the same outputs.
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    from models import tiny_bert

    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(tiny_bert(), final)
    with torch.no_grad():
        got = reloaded(input_ids=x).logits
    assert torch.equal(got, expected), (got - expected).abs().max()

    # 3. resume_from_checkpoint: a fresh model resumed at step 2 ends where an uninterrupted run does.
    straight = _model()
    Trainer(model=straight, train_dataset=_Data(), args=_args(os.path.join(root, "straight"), max_steps=4)).train()
    resumed = _model()  # the same base; other adapter weights, which the checkpoint must replace
    with torch.no_grad():
        for p in resumed.parameters():
            if p.requires_grad:
                p.add_(1.0)
    Trainer(model=resumed, train_dataset=_Data(), args=_args(os.path.join(root, "resumed"), max_steps=4)).train(
        resume_from_checkpoint=os.path.join(root, "straight", "checkpoint-2"))
    a, b = _adapter_state(straight), _adapter_state(resumed)
    for k in a:  # the same steps on the same batches; rounding of a re-run is the only difference allowed
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    print("TRAINER ROUNDTRIP OK", "peft hidden" if sys.modules.get("peft", 0) is None else "peft importable")


if __name__ == "__main__":
    if "--hide-peft" in sys.argv:
        sys.modules["peft"] = None  # `import peft` fails and importlib.util.find_spec("peft") is None
    main()
