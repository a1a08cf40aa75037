"""The LoRA paper's parameter count: r=8 on query and value of RoBERTa-base gives 294,912
trainable parameters (Hu et al., 2021, Table 2: 0.3M)."""

from __future__ import annotations

import torch

from peftkit import LoraConfig, get_peft_model


def test_roberta_base_query_value_r8_has_294912_trainable_parameters() -> None:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig()  # the defaults are RoBERTa-base: hidden 768, 12 layers
    assert (config.hidden_size, config.num_hidden_layers) == (768, 12)
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = RobertaModel(config)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    # 12 layers x 2 matrices x r x (768 in + 768 out)
    assert trainable == 12 * 2 * 8 * (768 + 768) == 294_912
    assert total == sum(p.numel() for p in model.parameters())
    assert {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad} == {"query", "value"}
