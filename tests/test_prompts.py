"""Soft prompts (prompt tuning, prefix tuning, P-tuning) on BERT-, GPT-2-, Llama- and
T5-style tiny models: training on the task's labels, generation, padding, files, PEFT
interop, and a learning test. The invariants (frozen base, save -> load, disabling,
unloading, the refused merge) are in tests/test_invariants.py."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from adapter_checks import INTEROP_REL, assert_rounding_close
from models import VOCAB, build
from peftkit import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    inject_adapter_in_model,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*token_id.*"),
    pytest.mark.filterwarnings("ignore:Position ids are not supported"),  # peft, in the interop test
]

N = 4  # virtual tokens
HIDDEN = 32
TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
METHODS = ("prompt", "prefix", "ptuning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: a second intra-op thread only adds waiting on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config_for(method: str, task: str | None, lib: object = None, **extra: object):
    """The config of ``method`` from peftkit, or from ``lib`` (the peft module)."""
    names = {"prompt": "PromptTuningConfig", "prefix": "PrefixTuningConfig", "ptuning": "PromptEncoderConfig",
             "prefix_plain": "PrefixTuningConfig", "ptuning_lstm": "PromptEncoderConfig"}
    kwargs: dict[str, object] = {"task_type": task, "num_virtual_tokens": N}
    if method == "prefix":
        kwargs.update(prefix_projection=True, encoder_hidden_size=16)
    if method.startswith("ptuning"):
        kwargs["encoder_hidden_size"] = 16
    if method == "ptuning_lstm":
        kwargs["encoder_reparameterization_type"] = "LSTM"
    kwargs.update(extra)
    if lib is None:
        return {"PromptTuningConfig": PromptTuningConfig, "PrefixTuningConfig": PrefixTuningConfig,
                "PromptEncoderConfig": PromptEncoderConfig}[names[method]](**kwargs)
    return getattr(lib, names[method])(**kwargs)


def lively(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose weights are large enough for its generations to vary."""
    model = build(kind, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def batch_for(kind: str, lengths: tuple[int, ...] = (7, 7, 7), seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded inputs (pad id 0) with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(1, VOCAB, (len(lengths), 5), generator=g)
    return out


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def real_positions(out: torch.Tensor, length: int) -> torch.Tensor:
    """Logits of the real tokens (virtual positions of input vectors dropped)."""
    return out[:, -length:] if out.dim() == 3 else out


# -- parameters ---------------------------------------------------------------------------
def test_prompt_tuning_trains_virtual_tokens_times_hidden_size():
    model = get_peft_model(build("gpt2"), config_for("prompt", "CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == N * HIDDEN
    assert total == sum(p.numel() for p in build("gpt2").parameters()) + N * HIDDEN
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["model_adapters.default.tokens.embedding"]


def test_seq2seq_prompt_table_holds_both_submodules_and_prefix_uses_kv_width():
    t5 = get_peft_model(build("t5"), config_for("prompt", "SEQ_2_SEQ_LM"))
    assert t5.get_nb_trainable_parameters()[0] == 2 * N * HIDDEN
    assert t5.peft_config["default"].num_transformer_submodules == 2
    # Llama: 2 heads, 1 key/value head of 16 → prefixes are 16 wide.
    llama = get_peft_model(build("llama"), config_for("prefix_plain", "CAUSAL_LM"))
    cfg = llama.peft_config["default"]
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (16, 1, 2)
    assert llama.get_nb_trainable_parameters()[0] == N * 2 * 2 * 16


@pytest.mark.parametrize("kind", sorted(TASKS))
@pytest.mark.parametrize("method", METHODS)
def test_training_on_the_task_labels_lowers_the_task_loss(kind, method):
    """The task's own loss (labels, train mode, padded batch) trains the prompt. Which
    parameters train and that the base stays frozen: tests/test_invariants.py."""
    torch.manual_seed(0)
    model = get_peft_model(build(kind), config_for(method, TASKS[kind]))
    inputs = batch_for(kind, (7, 5, 6))
    labels = {"bert": torch.tensor([0, 1, 1]), "gpt2": inputs["input_ids"], "llama": inputs["input_ids"],
              "t5": torch.randint(1, VOCAB, (3, 5))}[kind]
    if kind == "t5":
        inputs.pop("decoder_input_ids")
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(4):
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_causal_labels_of_virtual_positions_are_ignored():
    model = get_peft_model(build("gpt2"), config_for("prompt", "CAUSAL_LM")).eval()
    perturb(model)
    inputs = batch_for("gpt2", (6, 6))
    labels = inputs["input_ids"].clone()
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == N + 6
    # Label j is predicted at position N+j-1: virtual positions carry no label of their own,
    # and the last one predicts the first real token (as in Hugging Face PEFT).
    manual = torch.nn.functional.cross_entropy(out.logits[:, N - 1 : -1].reshape(-1, VOCAB), labels.reshape(-1))
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("method", METHODS)
def test_explicit_position_ids_match_the_default(method):
    model = get_peft_model(build("llama"), config_for(method, "CAUSAL_LM")).eval()
    perturb(model)
    inputs = batch_for("llama", (6, 6))
    positions = torch.arange(6).expand(2, 6)
    torch.testing.assert_close(logits(model, {**inputs, "position_ids": positions}), logits(model, inputs))


# -- padding ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TASKS))
@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_matches_single_examples(kind, method):
    model = get_peft_model(lively(kind), config_for(method, TASKS[kind])).eval()
    perturb(model)
    lengths = (7, 4, 6)
    inputs = batch_for(kind, lengths)
    batched = logits(model, inputs)
    for i, length in enumerate(lengths):
        single = {k: v[i : i + 1] for k, v in inputs.items()}
        single["input_ids"] = single["input_ids"][:, :length]
        single["attention_mask"] = single["attention_mask"][:, :length]
        alone = logits(model, single)
        if kind in ("gpt2", "llama"):  # right padding: the first `length` real positions
            got = real_positions(batched[i : i + 1], 7)[:, :length]
            want = real_positions(alone, length)
        else:
            got, want = batched[i : i + 1], alone
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("method", METHODS)
def test_padded_generation_matches_single_examples(kind, method):
    model = get_peft_model(lively(kind), config_for(method, TASKS[kind])).eval()
    perturb(model)
    lengths = (7, 4)
    inputs = batch_for(kind, lengths)
    inputs.pop("decoder_input_ids", None)
    if kind != "t5":  # decoder-only models generate from left-padded prompts
        for key in ("input_ids", "attention_mask"):
            inputs[key] = torch.stack([row.roll(7 - n) for row, n in zip(inputs[key], lengths, strict=True)])
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    new = out[:, 7:] if kind != "t5" else out  # decoder-only models return the prompt first
    for i, length in enumerate(lengths):
        row = inputs["input_ids"][i : i + 1]
        ids = row[:, -length:] if kind != "t5" else row[:, :length]
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                               do_sample=False, pad_token_id=0)
        alone_new = alone[0, length:] if kind != "t5" else alone[0]
        # A row that stops early (EOS) is padded in the batch.
        assert torch.equal(new[i, : alone_new.shape[0]], alone_new)
        assert not new[i, alone_new.shape[0] :].any()


# -- generation ---------------------------------------------------------------------------
def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int, seq2seq: bool) -> torch.Tensor:
    """Greedy decoding through forward() alone, no cache."""
    seq = torch.zeros(ids.shape[0], 1, dtype=torch.long) if seq2seq else ids
    for _ in range(steps):
        kwargs = {"input_ids": ids, "decoder_input_ids": seq} if seq2seq else {"input_ids": seq}
        nxt = logits(model, kwargs)[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("method", METHODS)
def test_generate_follows_the_prompt_and_disabling_gives_the_base(kind, method):
    base = lively(kind)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, config_for(method, TASKS[kind])).eval()
    perturb(model, scale=1.0)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with_prompt = model.generate(input_ids=ids, **kwargs)
    base_out = reference.generate(input_ids=ids, **kwargs)
    with model.disable_adapter():
        disabled = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(disabled, base_out)
    assert with_prompt.shape == base_out.shape
    assert not torch.equal(with_prompt, base_out)
    assert torch.equal(with_prompt, greedy(model, ids, 6, kind == "t5"))  # the cache path agrees with forward
    beams = model.generate(input_ids=ids, num_beams=3, num_return_sequences=2, max_new_tokens=4, pad_token_id=0)
    assert beams.shape[0] == 4
    if kind != "t5":  # length limits count the caller's tokens only
        assert model.generate(input_ids=ids, max_length=8, do_sample=False, pad_token_id=0).shape == (2, 8)


@pytest.mark.parametrize("method", METHODS)
def test_manual_decoding_with_the_returned_cache(method):
    model = get_peft_model(lively("gpt2"), config_for(method, "CAUSAL_LM")).eval()
    perturb(model)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    full = logits(model, {"input_ids": ids})[:, -1]
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), use_cache=True)
        step = model(input_ids=ids[:, 5:], attention_mask=torch.ones(2, 6, dtype=torch.long),
                     past_key_values=first.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_sequence_classification_cannot_generate():
    model = get_peft_model(build("bert"), config_for("prompt", "SEQ_CLS"))
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long))


# -- learning -----------------------------------------------------------------------------
RULES = torch.tensor([[3, 7], [4, 9]])  # after token 3 say 7, after token 4 say 9


def _rule_batch(g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, VOCAB, (size, 8), generator=g)
    at = torch.randint(0, 7, (size,), generator=g)
    rule = torch.randint(0, len(RULES), (size,), generator=g)
    rows = torch.arange(size)
    ids[rows, at], ids[rows, at + 1] = RULES[rule, 0], RULES[rule, 1]
    labels = torch.full_like(ids, -100)
    labels[rows, at + 1] = RULES[rule, 1]
    return ids, labels, at, RULES[rule, 1]


def _rule_accuracy(model: torch.nn.Module) -> float:
    ids, _, at, target = _rule_batch(torch.Generator().manual_seed(123), 256)
    out = logits(model, {"input_ids": ids})[:, -ids.shape[1]:]
    return (out[torch.arange(256), at].argmax(-1) == target).float().mean().item()


def test_prompt_tuning_alone_teaches_a_tiny_gpt2_a_rule():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # At GPT-2's usual init (0.02) nothing in the context moves a random model's output;
    # a larger init stands in for a pretrained model whose attention matters.
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2)
    base = GPT2LMHeadModel(cfg).eval()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    before = _rule_accuracy(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids, labels, _, _ = _rule_batch(g, 32)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _rule_accuracy(model)
    assert before < 0.1, before
    assert after > 0.9, after
    with model.disable_adapter():
        assert _rule_accuracy(model) == before
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())


# -- initialisation -----------------------------------------------------------------------
def test_sample_vocab_init_copies_embedding_rows():
    base = build("gpt2")
    model = get_peft_model(base, config_for("prompt", "CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.model_adapters["default"].tokens.embedding
    vocab = base.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in table)


def test_text_init_uses_the_tokens_of_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "classify": 11, "the": 12, "review": 13}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    base = build("gpt2")
    cfg = config_for("prompt", "CAUSAL_LM", prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the review",
                     tokenizer_name_or_path=str(tmp_path))
    model = get_peft_model(base, cfg)
    table = model.model_adapters["default"].tokens.embedding
    emb = base.get_input_embeddings().weight
    assert torch.equal(table, emb[torch.tensor([11, 12, 13, 11])])  # repeated to fill 4 positions


def test_random_init_has_the_spread_of_the_embeddings():
    torch.manual_seed(0)
    base = build("gpt2")
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=64))
    spread = model.model_adapters["default"].tokens.embedding.std().item()
    assert spread == pytest.approx(base.get_input_embeddings().weight.std().item(), rel=0.2)


def test_zero_init_prefix_starts_at_zero():
    for method in ("prefix", "prefix_plain"):
        model = get_peft_model(build("gpt2"), config_for(method, "CAUSAL_LM", init_weights="zero"))
        assert not model.model_adapters["default"].adapter_state_dict()["prompt_embeddings"].any()


# -- files --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TASKS))
@pytest.mark.parametrize("method", [*METHODS, "ptuning_lstm"])
def test_save_and_load_reproduce_outputs(kind, method, tmp_path):
    model = get_peft_model(build(kind), config_for(method, TASKS[kind])).eval()
    perturb(model)
    inputs = batch_for(kind, (7, 5))
    want = logits(model, inputs)
    model.save_pretrained(tmp_path)
    state = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    kv_width = 16 if kind == "llama" else HIDDEN  # Llama: one key/value head of 16
    width = 2 * 2 * kv_width if method == "prefix" else HIDDEN
    rows = N * (2 if kind == "t5" and method != "prefix" else 1)
    head = {"base_model.classifier.weight", "base_model.classifier.bias"} if kind == "bert" else set()
    assert set(state) == {"prompt_embeddings"} | head
    assert state["prompt_embeddings"].shape == (rows, width)
    loaded = PeftModel.from_pretrained(build(kind), tmp_path)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert torch.equal(logits(loaded, inputs), want)
    # Loaded for more training: any re-parametrisation is folded, the table itself trains.
    trainable = PeftModel.from_pretrained(build(kind), tmp_path, is_trainable=True)
    assert torch.equal(logits(trainable.eval(), inputs), want)
    adapter_params = [n for n, p in trainable.named_parameters() if p.requires_grad and n.startswith("model_adapters")]
    assert adapter_params == ["model_adapters.default.tokens.embedding"]


def test_config_file_has_peft_fields(tmp_path):
    model = get_peft_model(build("gpt2"), config_for("prefix", "CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    with open(tmp_path / "adapter_config.json", encoding="utf-8") as fh:
        data = json.load(fh)
    assert data["peft_type"] == "PREFIX_TUNING"
    assert data["task_type"] == "CAUSAL_LM"
    assert data["inference_mode"] is True
    assert {k: data[k] for k in ("num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                 "num_attention_heads", "num_layers", "prefix_projection", "encoder_hidden_size")} == {
        "num_virtual_tokens": N, "token_dim": 32, "num_transformer_submodules": 1, "num_attention_heads": 2,
        "num_layers": 2, "prefix_projection": True, "encoder_hidden_size": 16}


def test_adapter_for_another_model_is_refused(tmp_path):
    model = get_peft_model(build("gpt2"), config_for("prefix_plain", "CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is 2 but the model has 1; the adapter was made for a different model"):
        PeftModel.from_pretrained(build("llama"), tmp_path)


# -- interop with Hugging Face PEFT ---------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TASKS))
@pytest.mark.parametrize("method", METHODS)
def test_peft_reads_ours_and_we_read_peft(kind, method, tmp_path):
    peft = pytest.importorskip("peft")
    inputs = batch_for(kind, (7, 5))
    ours = get_peft_model(lively(kind), config_for(method, TASKS[kind])).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(lively(kind), tmp_path / "ours").eval()
    try:
        theirs_logits = logits(theirs, inputs)
    except ValueError as exc:  # PEFT's own check, on transformers releases that renamed the cache keyword
        if "does not support past key values" not in str(exc):
            raise
        pytest.skip(f"peft {peft.__version__} cannot run prefix tuning on this transformers release: {exc}")
    assert_rounding_close(theirs_logits, logits(ours, inputs), INTEROP_REL)  # two libraries: within rounding
    if kind != "bert":
        ids = inputs["input_ids"][:1, :5]
        gen = {"input_ids": ids, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        # Greedy decoding computed from PEFT's forward (no cache): whatever PEFT's own
        # generate does with the installed transformers, our generate must match the
        # continuation its reading of our file implies.
        assert torch.equal(ours.generate(**gen), greedy(theirs, ids, 5, seq2seq=kind == "t5"))

    torch.manual_seed(2)
    made = peft.get_peft_model(lively(kind), config_for(method, TASKS[kind], lib=peft)).eval()
    perturb(made, seed=2)
    made.save_pretrained(tmp_path / "peft")
    read = PeftModel.from_pretrained(lively(kind), tmp_path / "peft")
    reread = peft.PeftModel.from_pretrained(lively(kind), tmp_path / "peft").eval()
    assert_rounding_close(logits(read, inputs), logits(reread, inputs), INTEROP_REL)
    torch.testing.assert_close(logits(read, inputs), logits(made, inputs), atol=1e-5, rtol=1e-5)


# -- lifecycle and errors -------------------------------------------------------------------
def test_two_prompt_adapters_switch_and_delete():
    model = get_peft_model(build("gpt2"), config_for("prompt", "CAUSAL_LM"))
    model.add_adapter("other", config_for("prompt", "CAUSAL_LM"))
    perturb(model)  # only "default" is trainable, so only it changes
    inputs = batch_for("gpt2", (6, 6))
    first = logits(model.eval(), inputs)
    model.set_adapter("other")
    assert model.get_nb_trainable_parameters()[0] == N * HIDDEN
    assert not torch.allclose(logits(model, inputs), first)
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="active together"):
        model(**inputs)
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    assert torch.equal(logits(model, inputs), first)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # As in PEFT, the config may be built without it; the adapter cannot.
        (lambda: get_peft_model(build("gpt2"), PromptTuningConfig(task_type="CAUSAL_LM")), "needs num_virtual_tokens"),
        (lambda: PromptTuningConfig(num_virtual_tokens=0), "positive integer"),
        (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
        (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="words"), "one of"),
        (lambda: PromptTuningConfig(num_virtual_tokens=2, task_type="TOKEN_CLS"), "supports task_type"),
        (lambda: PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones"), "init_weights"),
        (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU"), "one of"),
        (lambda: PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=1.5), "encoder_dropout"),
    ],
)
def test_config_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_model_errors():
    with pytest.raises(ValueError, match="encoder–decoder"):
        get_peft_model(build("t5"), config_for("prompt", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="needs an encoder–decoder"):
        get_peft_model(build("gpt2"), config_for("prompt", "SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="get_peft_model"):
        inject_adapter_in_model(config_for("prompt", "CAUSAL_LM"), build("gpt2"))
    checkpointed = build("gpt2")
    checkpointed.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(checkpointed, config_for("prefix", "CAUSAL_LM"))
    model = get_peft_model(build("gpt2"), config_for("prompt", "CAUSAL_LM"))
    with pytest.raises(NotImplementedError, match="per example"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["default", "__base__"])


def test_task_type_is_inferred_and_recorded():
    assert get_peft_model(build("gpt2"), config_for("prompt", None)).peft_config["default"].task_type == "CAUSAL_LM"
    assert get_peft_model(build("bert"), config_for("prompt", None)).peft_config["default"].task_type == "SEQ_CLS"
    assert get_peft_model(build("t5"), config_for("prompt", None)).peft_config["default"].task_type == "SEQ_2_SEQ_LM"


def test_seq2seq_encoder_outputs_computed_with_the_prompt_can_be_reused():
    model = get_peft_model(lively("t5"), config_for("prompt", "SEQ_2_SEQ_LM")).eval()
    perturb(model)
    inputs = batch_for("t5", (7, 5))
    want = logits(model, inputs)
    with torch.no_grad():
        first = model(**inputs)
    reused = {"encoder_outputs": (first.encoder_last_hidden_state,), "attention_mask": inputs["attention_mask"],
              "decoder_input_ids": inputs["decoder_input_ids"]}
    torch.testing.assert_close(logits(model, reused), want)
