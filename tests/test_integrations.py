"""transformers' stock ``Trainer`` with a deltatune model (``deltatune.integrations``): default arguments train,
checkpoints and ``save_model`` hold only the adapter in peft's format, resuming and ``load_best_model_at_end`` restore
the adapter exactly, evaluation computes the loss; plain transformers models and peft models are treated exactly as
before, and all of it works without peft installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune import integrations
from tests.adapter_utils import logits
from tests.models import VOCAB_SIZE, make_causal_lm_inputs, tiny_bert, tiny_llama

pytest.importorskip("accelerate")  # Trainer needs it (deltatune's train extra)
import accelerate.utils  # noqa: E402
import transformers.trainer  # noqa: E402
import transformers.trainer_utils  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "config.json"}
ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int = 16, seq: int = 8, labels: str = "lm") -> list[dict]:
    """A list dataset with a column no forward takes (``text``): Trainer must drop it and keep the model's inputs."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB_SIZE, (n, seq), generator=gen)
    rows = []
    for i in range(n):
        label = ids[i] if labels == "lm" else torch.tensor(i % 3)
        rows.append({"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": label,
                     "text": f"row {i}"})
    return rows


def _args(out: Path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-2, max_steps=4, save_steps=2, logging_steps=1, disable_tqdm=True, seed=0,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def _llama() -> dt.PeftModel:
    return dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))


def _bert() -> dt.PeftModel:
    return dt.get_peft_model(tiny_bert("seq_cls"), dt.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file()}


def _saved_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def _assert_state_equals_file(model: dt.PeftModel, directory: Path) -> None:
    state, saved = model.adapter_state_dict(), _saved_state(directory)
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


# --- deltatune models --------------------------------------------------------------------------------------------

def test_default_arguments_train_and_save_only_the_adapter(tmp_path: Path) -> None:
    model = _llama()
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_rows())
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())  # it trained
    for step in (2, 4):
        files = _files(tmp_path / f"checkpoint-{step}")
        assert ADAPTER_FILES <= files and not FULL_MODEL_FILES & files
    _assert_state_equals_file(model, tmp_path / "checkpoint-4")
    trainer.save_model(str(tmp_path / "final"))
    assert ADAPTER_FILES <= _files(tmp_path / "final") and not FULL_MODEL_FILES & _files(tmp_path / "final")
    inputs = make_causal_lm_inputs(model)
    reloaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_saved_checkpoint_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _llama()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_rows())
    trainer.train()
    inputs = make_causal_lm_inputs(model)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-2")
    assert torch.allclose(logits(theirs, inputs), logits(model, inputs), atol=1e-6)


def test_evaluation_computes_the_loss(tmp_path: Path) -> None:
    model = _llama()
    rows = _rows(n=4)
    metrics = Trainer(model=model, args=_args(tmp_path), eval_dataset=rows).evaluate()
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        expected = model.eval()(**batch).loss
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_resume_restores_adapter_and_modules_to_save_exactly(tmp_path: Path) -> None:
    rows = _rows(labels="cls")
    straight = _bert()
    Trainer(model=straight, args=_args(tmp_path / "a"), train_dataset=rows).train()
    assert any("classifier" in k for k in straight.adapter_state_dict())
    resumed = _bert()
    Trainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=rows).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")
    )
    mine, theirs = resumed.adapter_state_dict(), straight.adapter_state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path: Path) -> None:
    model = _llama()
    # The "best" is the highest eval loss, i.e. the first checkpoint while the loss falls, so it is not the last.
    args = _args(
        tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(n=4))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"
    _assert_state_equals_file(model, best)
    last = _saved_state(tmp_path / "checkpoint-4")
    assert any(not torch.equal(v, last[k]) for k, v in model.adapter_state_dict().items())
    assert model.peft_config["default"].inference_mode is False  # still trainable, as peft leaves it
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_a_gathered_state_dict_is_what_trainer_saves(tmp_path: Path) -> None:
    # FSDP / DeepSpeed ZeRO-3: Trainer gathers the full values (the live parameters are shards) and hands them over,
    # keyed as the wrapped model names them; the adapter file holds those values under peft's keys.
    model = _llama()
    gathered = {k.replace("layers.0.", "layers.0._fsdp_wrapped_module."): v + 1 for k, v in model.state_dict().items()}
    Trainer(model=model, args=_args(tmp_path))._save(str(tmp_path / "x"), state_dict=gathered)
    saved, live = _saved_state(tmp_path / "x"), model.adapter_state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k] + 1) for k in live)
    with pytest.raises(dt.AdapterStateError, match="state_dict lacks"):
        Trainer(model=model, args=_args(tmp_path))._save(str(tmp_path / "y"), state_dict={})
    assert not (tmp_path / "y" / "adapter_model.safetensors").exists()


# --- everything else is untouched ----------------------------------------------------------------------------------

def test_plain_transformers_models_are_treated_as_before(tmp_path: Path) -> None:
    plain = tiny_llama()
    assert not transformers.trainer_utils._is_peft_model(plain)
    assert not accelerate.utils.is_peft_model(plain)
    trainer = Trainer(model=plain, args=_args(tmp_path, max_steps=2), train_dataset=_rows())
    trainer.train()
    files = _files(tmp_path / "checkpoint-2")
    assert "model.safetensors" in files and not ADAPTER_FILES & files


def test_peft_models_are_treated_as_before(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert transformers.trainer_utils._is_peft_model(model) and accelerate.utils.is_peft_model(model)
    Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_rows()).train()
    files = _files(tmp_path / "checkpoint-2")
    assert ADAPTER_FILES <= files and "model.safetensors" not in files


def test_patches_wrap_the_originals_once() -> None:
    patched = (transformers.trainer_utils._is_peft_model, accelerate.utils.is_peft_model, Trainer._save)
    integrations.install()
    assert (transformers.trainer_utils._is_peft_model, accelerate.utils.is_peft_model, Trainer._save) == patched
    for function in patched:
        original = getattr(function, "__deltatune_original__")
        assert not hasattr(original, "__deltatune_original__")
    assert transformers.trainer._is_peft_model is transformers.trainer_utils._is_peft_model


_NO_PEFT_SCRIPT = """
import sys, tempfile
from pathlib import Path
sys.modules["peft"] = None  # as if peft were not installed: find_spec("peft") is None, importing it fails
import torch
from transformers import Trainer, TrainingArguments  # imported before deltatune: patched at import deltatune
import deltatune as dt
from tests.models import VOCAB_SIZE, tiny_llama

def rows():
    ids = torch.randint(3, VOCAB_SIZE, (8, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r, "text": "x"} for r in ids]

model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
out = Path(tempfile.mkdtemp())
args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, per_device_train_batch_size=4, max_steps=2,
                         save_steps=2, disable_tqdm=True, eval_strategy="steps", eval_steps=2,
                         load_best_model_at_end=True)
trainer = Trainer(model=model, args=args, train_dataset=rows(), eval_dataset=rows())
trainer.train()
files = {p.name for p in (out / "checkpoint-2").iterdir()}
assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files, files
assert "eval_loss" in trainer.evaluate()
assert sys.modules["peft"] is None
print("OK")
"""


def test_trainer_works_without_peft_installed() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_PEFT_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
