"""TRL's ``SFTTrainer`` and ``DPOTrainer`` with a deltatune model (``deltatune.integrations``): they train the adapter
through the base model's backbone, take the reference model from the adapter (as TRL does for peft) and save only
adapters; the same without peft installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from tests.adapter_utils import logits
from tests.models import VOCAB_SIZE, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
ROOT = Path(__file__).resolve().parents[1]


def _tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: ``w<i>`` is token ``i``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB_SIZE)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def _model(**kwargs) -> dt.PeftModel:
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", **kwargs))


def _args(config_cls, out: Path, **kwargs):
    # bf16 off: TRL turns it on by default, and accelerate then leaves the model's forward under bf16 autocast after
    # training (for peft models too), which would blur the exact comparisons below.
    return config_cls(
        output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=4, max_steps=2, save_steps=2,
        learning_rate=1e-2, disable_tqdm=True, bf16=False, **kwargs,
    )


def _text_dataset():
    return datasets.Dataset.from_dict(
        {"text": [" ".join(f"w{4 + (i * 7 + j) % (VOCAB_SIZE - 4)}" for j in range(10)) for i in range(8)]}
    )


def _preference_dataset():
    return datasets.Dataset.from_dict(
        {"prompt": ["w5 w6 w7"] * 8, "chosen": [" w8 w9"] * 8, "rejected": [" w10 w11"] * 8}
    )


def _only_adapters(directory: Path) -> None:
    names = {p.name for p in directory.iterdir()}
    assert ADAPTER_FILES <= names and "model.safetensors" not in names, names


def test_sft_trains_and_saves_only_the_adapter(tmp_path: Path) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer = trl.SFTTrainer(
        model=model, args=_args(trl.SFTConfig, tmp_path), train_dataset=_text_dataset(), processing_class=_tokenizer()
    )
    trainer.train()
    assert all(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items() if "lora_B" in k)
    _only_adapters(tmp_path / "checkpoint-2")
    trainer.save_model(str(tmp_path / "final"))
    _only_adapters(tmp_path / "final")
    reloaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_sft_on_the_fast_path_trains_exactly_as_without_it(tmp_path: Path) -> None:
    # TRL's own fused LM head (fused_lm_head=True) needs the labels; the fast path must let it through, and with a
    # float32 base the two runs are the same computation.
    runs = []
    for fast in (False, True):
        model = _model()
        if fast:
            model.enable_fast_training(compute_dtype=None)
        trainer = trl.SFTTrainer(
            model=model, args=_args(trl.SFTConfig, tmp_path / str(fast), logging_steps=1),
            train_dataset=_text_dataset(), processing_class=_tokenizer(),
        )
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], model.adapter_state_dict()))
    (slow_losses, slow_state), (fast_losses, fast_state) = runs
    assert len(fast_losses) == 2 and fast_losses == pytest.approx(slow_losses, rel=1e-5)
    for key, value in slow_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-4, atol=1e-6)


def test_sft_refuses_an_adapter_on_the_lm_head(tmp_path: Path) -> None:
    # TRL's fused head reads lm_head.weight directly, so an adapter there would never train: TRL refuses it, as for peft.
    with pytest.raises(ValueError, match="lm_head"):
        trl.SFTTrainer(
            model=_model(target_modules=["q_proj", "lm_head"]), args=_args(trl.SFTConfig, tmp_path),
            train_dataset=_text_dataset(), processing_class=_tokenizer(),
        )


def test_dpo_reference_is_the_untrained_adapter_and_only_adapters_are_saved(tmp_path: Path) -> None:
    model = _model()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])}
    with model.disable_adapter():
        base = logits(model, inputs)
    trainer = trl.DPOTrainer(
        model=model, args=_args(trl.DPOConfig, tmp_path), train_dataset=_preference_dataset(),
        processing_class=_tokenizer(),
    )
    assert trainer.ref_model is None  # the reference is the model's own frozen copy of the adapter, as with peft
    trainer.train()
    assert not torch.allclose(logits(model, inputs), base)  # the policy trained
    model.set_adapter("ref")
    assert torch.allclose(logits(model, inputs), base, atol=1e-6)  # the reference still computes as the base
    model.set_adapter("default")
    _only_adapters(tmp_path / "checkpoint-2")
    trainer.save_model(str(tmp_path / "final"))
    _only_adapters(tmp_path / "final")


_NO_PEFT_SCRIPT = """
import sys, tempfile
from pathlib import Path
sys.modules["peft"] = None  # as if peft were not installed
import deltatune as dt
import trl  # imported after deltatune: patched by the import hook
from tests.test_trl import _args, _model, _only_adapters, _preference_dataset, _text_dataset, _tokenizer

out = Path(tempfile.mkdtemp())
sft = trl.SFTTrainer(model=_model(), args=_args(trl.SFTConfig, out / "sft"), train_dataset=_text_dataset(),
                     processing_class=_tokenizer())
sft.train()
_only_adapters(out / "sft" / "checkpoint-2")
dpo = trl.DPOTrainer(model=_model(), args=_args(trl.DPOConfig, out / "dpo"), train_dataset=_preference_dataset(),
                     processing_class=_tokenizer())
dpo.train()
_only_adapters(out / "dpo" / "checkpoint-2")
assert sys.modules["peft"] is None
print("OK")
"""


def test_sft_and_dpo_work_without_peft_installed() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-c", _NO_PEFT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
