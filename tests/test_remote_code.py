"""Adapters on a ``trust_remote_code`` model (fused ``wqkv``, InternLM2-style names), loaded the way users load them:
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; and ``AutoPeftModelForCausalLM`` refusing
such a base until the caller opts in.

Every layer method's matrix cases run on this model too: it is the ``remote_code`` family of ``tests/test_matrix.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from deltatune import (
    AdapterLayer,
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    RemoteCodeError,
    get_peft_model,
)
from tests.adapter_utils import train_steps
from tests.models import REMOTE_CODE_LINEAR, make_causal_lm_inputs


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.models import write_remote_code_model

    return write_remote_code_model(tmp_path_factory.mktemp("remote") / "tinycustom")


def _base(remote_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(remote_dir, trust_remote_code=True).eval()


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("targets", [list(REMOTE_CODE_LINEAR), "all-linear"], ids=["named", "all-linear"])
def test_lora_lifecycle_on_remote_code_model(remote_dir: Path, tmp_path: Path, targets: Any) -> None:
    base = _base(remote_dir)
    batch = make_causal_lm_inputs(base, batch=2, seq=8)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_logits = _logits(base, batch)

    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=targets, r=4, lora_alpha=8))
    assert isinstance(model, PeftModelForCausalLM)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert adapted == set(REMOTE_CODE_LINEAR)  # all-linear leaves the output head alone
    torch.testing.assert_close(_logits(model, batch), base_logits, rtol=0, atol=0)  # B = 0 at init

    # training moves only the adapter and lowers the loss
    losses = train_steps(model, batch, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    trained = _logits(model, batch)
    assert not torch.allclose(trained, base_logits)

    # save -> load onto a fresh remote-code base gives the same outputs
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(remote_dir), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(loaded, batch), trained, rtol=0, atol=0)

    # generate (KV cache) is deterministic and agrees with generation without the cache
    prompt = batch["input_ids"][:, :4]
    with torch.no_grad():
        cached = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                 do_sample=False, use_cache=True)
        uncached = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                   do_sample=False, use_cache=False)
    assert cached.shape == (2, 9)
    assert torch.equal(cached, uncached)

    # merge matches the unmerged adapter; merge_and_unload returns a plain model
    loaded.merge_adapter()
    torch.testing.assert_close(_logits(loaded, batch), trained, rtol=1e-4, atol=1e-5)
    loaded.unmerge_adapter()
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, batch), trained, rtol=1e-4, atol=1e-5)

    # unload restores the base exactly
    restored = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in restored.modules())
    for key, value in restored.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    torch.testing.assert_close(_logits(restored, batch), base_logits, rtol=0, atol=0)


def _save_adapter_for(remote_dir: Path, tmp_path: Path) -> tuple[Path, dict, torch.Tensor]:
    base = _base(remote_dir)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=list(REMOTE_CODE_LINEAR),
                                            init_lora_weights=False))
    assert model.peft_config["default"].base_model_name_or_path == str(remote_dir)
    batch = make_causal_lm_inputs(base)
    reference = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", batch, reference


@pytest.mark.parametrize("opt_in", [None, False])
def test_auto_peft_model_refuses_remote_code_without_opt_in(
    remote_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opt_in: bool | None
) -> None:
    adapter, _, _ = _save_adapter_for(remote_dir, tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("no model code may be loaded or run before the user opts in")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_run)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", must_not_run)
    monkeypatch.setattr("transformers.dynamic_module_utils.get_class_from_dynamic_module", must_not_run)
    kwargs = {} if opt_in is None else {"trust_remote_code": opt_in}
    with pytest.raises(RemoteCodeError) as info:
        AutoPeftModelForCausalLM.from_pretrained(str(adapter), **kwargs)
    message = str(info.value)
    for part in ("needs custom code", str(remote_dir), "modeling_tinycustom.py", "configuration_tinycustom.py",
                 "arbitrary code", "trust_remote_code=True"):
        assert part in message, part


def test_auto_peft_model_with_opt_in(remote_dir: Path, tmp_path: Path) -> None:
    adapter, batch, reference = _save_adapter_for(remote_dir, tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), trust_remote_code=True)
    assert isinstance(model, PeftModelForCausalLM)
    assert type(model.get_base_model()).__name__ == "TinyCustomForCausalLM"
    torch.testing.assert_close(_logits(model, batch), reference, rtol=0, atol=0)


def test_auto_peft_model_remote_code_from_hub_cache(remote_dir: Path, tmp_path: Path) -> None:
    """The same refusal when the remote-code base sits in a hub cache, naming the repo and revision."""
    from tests.hubcache import directory_files, fake_commit, write_snapshot

    commit = fake_commit("tinycustom")
    write_snapshot(tmp_path / "cache", "org/tinycustom", directory_files(remote_dir), commit=commit)
    adapter, batch, reference = _save_adapter_for(remote_dir, tmp_path)
    data = json.loads((adapter / "adapter_config.json").read_text())
    data.update(base_model_name_or_path="org/tinycustom", revision=commit)
    (adapter / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(RemoteCodeError, match=f"hub repo 'org/tinycustom' at revision '{commit}'"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter), cache_dir=str(tmp_path / "cache"))
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), cache_dir=str(tmp_path / "cache"),
                                                     trust_remote_code=True)
    torch.testing.assert_close(_logits(model, batch), reference, rtol=0, atol=0)


def test_prompt_tuning_on_remote_code_model(remote_dir: Path, tmp_path: Path) -> None:
    from deltatune import PromptTuningConfig

    base = _base(remote_dir)
    batch = make_causal_lm_inputs(base, batch=2, seq=8)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    losses = train_steps(model, batch, steps=10)
    assert losses[-1] < losses[0], losses
    trained = _logits(model, batch)
    assert trained.shape[1] == 4 + batch["input_ids"].shape[1]  # logits cover the virtual tokens too (as in peft)

    model.save_pretrained(tmp_path / "prompt")
    loaded = PeftModel.from_pretrained(_base(remote_dir), str(tmp_path / "prompt"))
    torch.testing.assert_close(_logits(loaded, batch), trained, rtol=0, atol=0)
    prompt = batch["input_ids"][:, :4]
    with torch.no_grad():
        out = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                              do_sample=False)
        again = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                do_sample=False, use_cache=False)
    assert out.shape[-1] == 8 and torch.equal(out, again)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "prompt"), trust_remote_code=True)
    torch.testing.assert_close(_logits(auto, batch), trained, rtol=0, atol=0)

