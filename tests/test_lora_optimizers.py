"""LoRA+ (``deltatune.optimizers.create_loraplus_optimizer``): peft's parameter groups and learning rates."""

from __future__ import annotations

import peft
import peft.optimizers
import pytest
import torch

import deltatune as dt
from deltatune.optimizers import create_loraplus_optimizer
from tests.models import tiny_bert

CONFIG = dict(task_type="SEQ_CLS", target_modules=["query", "value", "word_embeddings"], use_dora=True,
              bias="lora_only", modules_to_save=["classifier", "bert.embeddings.LayerNorm"])


def _groups(optimizer: torch.optim.Optimizer) -> list[tuple[float, float, int, int]]:
    """Per group: (lr, weight decay, number of tensors, number of elements)."""
    return [(g["lr"], g["weight_decay"], len(g["params"]), sum(p.numel() for p in g["params"]))
            for g in optimizer.param_groups]


def test_groups_and_learning_rates_equal_peft_s() -> None:
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-5)
    ours = create_loraplus_optimizer(dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(**CONFIG)),
                                     torch.optim.AdamW, **kwargs)
    theirs = peft.optimizers.create_loraplus_optimizer(
        peft.get_peft_model(tiny_bert("seq_cls"), peft.LoraConfig(**CONFIG)), torch.optim.AdamW, **kwargs
    )
    assert _groups(ours) == _groups(theirs)
    lrs = [g[0] for g in _groups(ours)]
    assert lrs == [1e-3, 1e-5, 16e-3, 16e-3] and all(g[2] for g in _groups(ours))


@pytest.mark.parametrize("bad", [dict(lr=0.0, loraplus_lr_ratio=16), dict(lr=1e-3, loraplus_lr_ratio=-1)])
def test_non_positive_rates_are_refused(bad) -> None:
    model = dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="must be a positive number"):
        create_loraplus_optimizer(model, torch.optim.AdamW, **bad)
