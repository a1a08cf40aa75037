"""Tiny models built from config (2 layers, hidden 32) and small plain modules."""

from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB = 100


def tiny_bert(num_labels: int = 2) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=37, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=37, num_labels=3)
    return ViTForImageClassification(cfg).eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lin0 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).mean(1)
        return self.head(self.relu(self.lin1(self.relu(self.lin0(h)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = self.conv1d(h.flatten(2))
        return self.head(h.mean(-1))


class Experts(nn.Module):
    """A mixture-of-experts block's stacked weights, as bare parameters: ``gate_up_proj``
    (experts, dim, 2·hidden) and ``down_proj`` (experts, hidden, dim), every token through
    every expert, averaged. ``transposed``: stored (experts, out, in), marked ``is_transposed``."""

    def __init__(self, dim: int, hidden: int, experts: int = 2, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        gate_up, down = (experts, dim, 2 * hidden), (experts, hidden, dim)
        if transposed:
            gate_up, down = (experts, 2 * hidden, dim), (experts, dim, hidden)
        self.gate_up_proj = nn.Parameter(torch.randn(gate_up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(down) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up_proj, self.down_proj
        if self.is_transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        gate, up = torch.einsum("bsd,edf->ebsf", x, gate_up).chunk(2, dim=-1)
        return torch.einsum("ebsh,ehd->bsd", torch.nn.functional.silu(gate) * up, down) / gate_up.shape[0]


class Zoo(nn.Module):
    """The layer types LoRA adapts beyond linear ones: a depth-wise and a grouped convolution,
    an ``nn.MultiheadAttention`` over the feature map's positions, two expert blocks (bare
    parameters, one stored transposed), and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.gconv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.experts = Experts(8, 6)
        self.experts_t = Experts(8, 6, transposed=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gconv(torch.relu(self.dwconv(x)))
        s = h.flatten(2).transpose(1, 2)
        s = s + self.attn(s, s, s, need_weights=False)[0]
        s = s + self.experts(s) + self.experts_t(s)
        return self.head(s.mean(1))


def inputs_for(kind: str, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind in ("bert", "gpt2", "llama"):
        ids = torch.randint(1, VOCAB, (batch, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        return {"input_ids": torch.randint(1, VOCAB, (batch, 7), generator=g),
                "decoder_input_ids": torch.randint(1, VOCAB, (batch, 5), generator=g)}
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if kind == "mlp":
        return {"x": torch.randint(0, VOCAB, (batch, 5), generator=g)}
    if kind == "cnn":
        return {"x": torch.randn(batch, 3, 8, 8, generator=g)}
    if kind == "zoo":
        return {"x": torch.randn(batch, 4, 5, 5, generator=g)}
    raise KeyError(kind)


BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "vit": tiny_vit, "mlp": MLP, "cnn": CNN,
            "zoo": Zoo}


_BUILT: dict[tuple[str, int], nn.Module] = {}


def build(kind: str, seed: int = 0) -> nn.Module:
    """A fresh model of ``kind`` with the weights that ``seed`` gives (built once, then
    copied: building transformers models is the slow part of many tests)."""
    torch.manual_seed(seed)
    if (kind, seed) not in _BUILT:
        _BUILT[kind, seed] = BUILDERS[kind]().eval()
    return copy.deepcopy(_BUILT[kind, seed])


def output_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits


CHAT_WORDS = ("the a an and or but is are was were be to of in on at for with from by it this that "
              "he she they we you i me my your our his her their good bad great terrible film movie "
              "story actor plot fun boring love hate like very not no yes what who how why when where "
              "say hello hi thanks please answer question tell about one two three four five six seven "
              "eight nine ten red green blue cat dog bird sun moon day night happy sad big small new old").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_chat_tokenizer():
    """A word-level tokenizer over ``CHAT_WORDS`` with a chat template; ids 0-6 are special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(CHAT_WORDS)) + list(".,!?"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_chat_model(path, arch: str = "llama", seed: int = 0, positions: int = 128, hidden: int = 32):
    """Writes a tiny causal LM (2 layers, hidden 32) and its chat tokenizer to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = tiny_chat_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=37,
                                             max_position_embeddings=positions, **common))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=2, n_head=2, n_positions=positions, **common))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
