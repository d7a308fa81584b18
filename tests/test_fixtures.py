"""Sanity checks for the tiny-model factories in :mod:`tests.models`.

If these fail, every other test's failure is suspect, so they pin the
properties the rest of the suite relies on: offline construction, determinism,
eval/float32 state, the layer names adapters target, and a finite loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tests.models import (
    BERT_NUM_LABELS,
    CONVNET_NUM_CLASSES,
    FAMILIES,
    FIRST_REGULAR_TOKEN,
    MAKE_INPUTS,
    MATRIX_FAMILIES,
    MLP_NUM_CLASSES,
    REMOTE_CODE,
    REMOTE_CODE_AUTO_MAP,
    REMOTE_CODE_LINEAR,
    REMOTE_CODE_NORMS,
    VOCAB_SIZE,
    Family,
    make_convnet_inputs,
    make_mlp_inputs,
    tiny_bert,
    tiny_convnet,
    tiny_llama,
    tiny_mlp,
    tiny_mt5,
    tiny_t5,
    write_remote_code_model,
)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_canonical(model: nn.Module) -> None:
    assert not model.training, "factories must return eval() models"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_environment_is_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_slow_marker_registered(request: pytest.FixtureRequest) -> None:
    assert any(line.startswith("slow:") for line in request.config.getini("markers"))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_deterministic_with_finite_loss(name: str) -> None:
    factory, task_type, make_inputs = FAMILIES[name]
    model = factory()
    _assert_canonical(model)
    _assert_same_state(model, factory())
    assert MAKE_INPUTS[task_type] is make_inputs

    inputs = make_inputs(model)
    assert inputs["input_ids"].shape == (2, 6)
    assert int(inputs["input_ids"].min()) >= FIRST_REGULAR_TOKEN
    assert int(inputs["input_ids"].max()) < VOCAB_SIZE
    assert {"input_ids", "attention_mask", "labels"} <= inputs.keys()
    for key, value in make_inputs(model).items():  # inputs are seeded too
        assert torch.equal(value, inputs[key])

    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.loss)
    # Forward passes are deterministic (eval mode => no dropout).
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, out.logits)


def test_family_fixture_and_seed(family: tuple[str, Family]) -> None:
    name, fam = family
    assert name in FAMILIES
    a, b = fam.factory(), fam.factory(seed=1)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_causal_lm_factory_fixture(causal_lm_factory: Any) -> None:
    model = causal_lm_factory()
    assert model.config.pad_token_id == 0


def test_llama_is_gqa_and_untied() -> None:
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 32
    assert attn.k_proj.out_features == attn.v_proj.out_features == 16  # 2 kv heads * head_dim 8
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)


def test_gpt2_uses_conv1d(gpt2: nn.Module) -> None:
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, Conv1D)
    assert isinstance(gpt2.transformer.h[0].mlp.c_fc, Conv1D)


def test_t5_and_mt5_ffn_layouts() -> None:
    assert hasattr(tiny_t5().encoder.block[0].layer[1].DenseReluDense, "wi")
    ffn = tiny_mt5().encoder.block[0].layer[1].DenseReluDense
    assert hasattr(ffn, "wi_0") and hasattr(ffn, "wi_1")


@pytest.mark.parametrize("head", ["seq_cls", "token_cls", "qa", "base"])
def test_bert_heads(head: str) -> None:
    model = tiny_bert(head)  # type: ignore[arg-type]
    _assert_canonical(model)
    _assert_same_state(model, tiny_bert(head))  # type: ignore[arg-type]
    if head == "base":
        inputs = MAKE_INPUTS["SEQ_CLS"](model)
        inputs.pop("labels")
        with torch.no_grad():
            assert model(**inputs).last_hidden_state.shape == (2, 6, 32)
        return
    task = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS"}[head]
    assert model.config.num_labels == BERT_NUM_LABELS[head]
    with torch.no_grad():
        out = model(**MAKE_INPUTS[task](model))
    assert torch.isfinite(out.loss)


def test_bert_rejects_unknown_head() -> None:
    with pytest.raises(ValueError):
        tiny_bert("nope")  # type: ignore[arg-type]


def test_convnet(convnet: nn.Module) -> None:
    _assert_canonical(convnet)
    _assert_same_state(convnet, tiny_convnet())
    names = dict(convnet.named_modules())
    assert isinstance(names["embed"], nn.Embedding)
    assert isinstance(names["conv2d"], nn.Conv2d)
    assert isinstance(names["conv1d"], nn.Conv1d)
    assert all(isinstance(names[n], nn.Linear) for n in ("fc1", "fc2", "head"))
    inputs = make_convnet_inputs()
    labels = inputs.pop("labels")
    logits = convnet(**inputs)
    assert logits.shape == (2, CONVNET_NUM_CLASSES)
    assert torch.equal(logits, convnet(inputs["pixel_values"], inputs["input_ids"]))
    assert torch.isfinite(F.cross_entropy(logits, labels))


def test_mlp(mlp: nn.Module) -> None:
    _assert_canonical(mlp)
    _assert_same_state(mlp, tiny_mlp())
    assert [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)] == ["lin0", "lin1", "head"]
    inputs = make_mlp_inputs()
    logits = mlp(inputs["x"])
    assert logits.shape == (2, MLP_NUM_CLASSES)
    assert torch.isfinite(F.cross_entropy(logits, inputs["labels"]))


# --------------------------------------------------------------------------- #
# trust_remote_code checkpoint
# --------------------------------------------------------------------------- #
def test_remote_code_dir_contents(remote_code_dir: Path) -> None:
    files = {p.name for p in remote_code_dir.iterdir()}
    assert {
        "config.json",
        "configuration_tinycustom.py",
        "modeling_tinycustom.py",
        "model.safetensors",
    } <= files
    config = AutoConfig.from_pretrained(remote_code_dir, trust_remote_code=True)
    assert config.model_type == "tinycustom"
    assert config.auto_map == REMOTE_CODE_AUTO_MAP


def test_remote_code_loads_and_generates(remote_code_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(remote_code_dir, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    _assert_canonical(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"tok_embeddings", "wqkv", "wo", "w1", "w2", "output"} <= names
    assert model.get_input_embeddings() is model.model.tok_embeddings
    assert model.get_output_embeddings() is model.output

    # Loaded weights are the saved ones (not re-initialised on load).
    saved = load_file(str(remote_code_dir / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)

    inputs = MAKE_INPUTS["CAUSAL_LM"](model)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).loss)
    prompt = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    cached = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    uncached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


def test_remote_code_is_deterministic(tmp_path: Path) -> None:
    a = load_file(str(write_remote_code_model(tmp_path / "a" / "tinycustom") / "model.safetensors"))
    b = load_file(str(write_remote_code_model(tmp_path / "b" / "tinycustom") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_remote_code_matrix_family_loads_the_checkpoints_own_classes_deterministically() -> None:
    factory, task_type, make_inputs = MATRIX_FAMILIES[REMOTE_CODE]
    model = factory()
    assert type(model).__module__.startswith("transformers_modules.")  # the class came from the directory
    _assert_canonical(model)
    _assert_same_state(model, factory())
    assert MAKE_INPUTS[task_type] is make_inputs
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(REMOTE_CODE_LINEAR) | set(REMOTE_CODE_NORMS) <= names


@pytest.mark.parametrize("trust", [False, None])
def test_remote_code_requires_trust(
    remote_code_dir: Path, trust: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With trust_remote_code=None transformers may prompt on a TTY; disable the prompt.
    monkeypatch.setattr("transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE", 0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(remote_code_dir, trust_remote_code=trust)
