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


# --- LoRA-FA -------------------------------------------------------------------------------------------------------

FA_CONFIG = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                 rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False)


def test_lorafa_steps_equal_peft_s(tmp_path, monkeypatch) -> None:
    """Step by step against peft's optimizer, with its projection in float32 (peft autocasts it to bfloat16 where
    available, which only rounds it)."""
    import peft.optimizers.lorafa

    from tests.models import make_causal_lm_inputs, tiny_llama

    monkeypatch.setattr(peft.optimizers.lorafa, "is_bf16_available", lambda: False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**FA_CONFIG))
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    kwargs = dict(r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    optimizers = [dt.optimizers.create_lorafa_optimizer(ours, **kwargs),
                  peft.optimizers.create_lorafa_optimizer(theirs, **kwargs)]
    batch = make_causal_lm_inputs(ours)
    frozen_a = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_A" in n}
    assert frozen_a and not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_B" in n}
    for _ in range(4):
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        mine = {n.replace(".deltas.default", ""): p for n, p in ours.named_parameters() if "lora_B" in n}
        peft_b = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if "lora_B" in n}
        assert mine.keys() == peft_b.keys()
        for name, value in mine.items():
            torch.testing.assert_close(value, peft_b[name], rtol=0, atol=1e-6, msg=name)
    assert all((start[n] - p).abs().max() > 1e-3 for n, p in ours.named_parameters() if "lora_B" in n)
    assert all(torch.equal(frozen_a[n], p) for n, p in ours.named_parameters() if "lora_A" in n)


def test_lorafa_projection_is_the_full_gradient_on_a_s_row_space() -> None:
    """LoRA-FA's projected B gradient makes ``s·g_B'·A`` the full fine-tuning gradient ``g`` projected onto the row
    space of A: ``g Aᵀ (A Aᵀ)⁻¹ A`` (arXiv:2308.03303's closest update to ``g`` with A fixed)."""
    from deltatune.optimizers import LoraFAOptimizer

    torch.manual_seed(0)
    a, g, s = torch.randn(3, 7), torch.randn(5, 7), 2.5
    g_b = s * g @ a.T  # LoRA's gradient of B for an update s·B·A
    expected = g @ a.T @ torch.linalg.inv(a @ a.T) @ a
    torch.testing.assert_close(s * LoraFAOptimizer.project(g_b, a, s) @ a, expected, rtol=1e-4, atol=1e-5)


def test_lorafa_refuses_a_rank_that_is_not_the_adapters() -> None:
    from tests.models import tiny_llama

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="r=8.*has r=4"):
        dt.optimizers.create_lorafa_optimizer(model, r=8, lora_alpha=8, lr=1e-3)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)  # unchanged
