"""A word-level tokenizer (with end-of-text and padding tokens and a chat template) and a
tiny Llama over it, built in memory: preference and GRPO tests need both, and no download."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a film movie was is it this great good lovely superb fine wonderful awful bad dull poor boring plot "
         "acting story and but very not i liked hated user assistant : review").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def word_tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def tiny_word_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=37, max_position_embeddings=64,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=1))


def tiny_word_bert_classifier(vocab: int, num_labels: int = 1, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
                                                    pad_token_id=0))


def save_model_dir(root: Path, name: str, model, tokenizer) -> Path:
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def perturb(model, scale: float = 0.05, seed: int = 1, trainable_only: bool = False) -> None:
    """Moves every weight (or every trainable one) a little, so a policy differs from its reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if trainable_only and not p.requires_grad:
                continue
            p.add_(torch.randn(p.shape, generator=gen) * scale)
