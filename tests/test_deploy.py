"""``deltatune.deploy``: whether vLLM loads an adapter, from its files alone (``deltatune inspect --check vllm``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.cli import main
from deltatune.deploy import check_vllm
from tests.models import tiny_convnet, tiny_llama

_LLAMA = ["q_proj", "v_proj"]


def _save(tmp_path: Path, config: dt.PeftConfig, model=None, **save) -> Path:
    model = dt.get_peft_model(model if model is not None else tiny_llama(), config)
    model.save_pretrained(tmp_path / "a", **save)
    return tmp_path / "a"


@pytest.mark.parametrize("config", [
    dt.LoraConfig(target_modules=_LLAMA),
    dt.LoraConfig(target_modules=_LLAMA, use_rslora=True, r=16),
    dt.LoraConfig(target_modules=_LLAMA, rank_pattern={"q_proj": 32}, alpha_pattern={"v_proj": 4}),
])
def test_plain_lora_loads(config: dt.LoraConfig, tmp_path: Path) -> None:
    verdict = check_vllm(_save(tmp_path, config))
    assert verdict.loads and verdict.problems == []
    assert verdict.max_lora_rank == (32 if config.rank_pattern else 16 if config.r == 16 else 8)


@pytest.mark.parametrize("config, reason", [
    (dt.LoraConfig(target_modules=_LLAMA, use_dora=True), "DoRA"),
    (dt.LoraConfig(target_modules=_LLAMA, bias="all"), "bias='all'"),
    (dt.LoraConfig(target_modules=_LLAMA, modules_to_save=["lm_head"]), "modules_to_save ['lm_head']"),
    (dt.LoraConfig(target_modules=_LLAMA, init_lora_weights="pissa"), "path_initial_model_for_weight_conversion"),
    (dt.LoraConfig(target_modules=_LLAMA, init_lora_weights="olora"), "olora"),
    (dt.LoraConfig(target_modules=_LLAMA, r=1024), "largest --max-lora-rank"),
    (dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "IA3 is not LoRA"),
    (dt.LoraConfig(target_modules=_LLAMA, use_qalora=True, qalora_group_size=8), "QALoRA's pooled input"),
    (dt.LoraConfig(target_modules=_LLAMA, r=4, kasa_config=dt.KasaConfig()), "KaSA's truncated base weight"),
])
def test_refusals_name_the_reason(config: dt.PeftConfig, reason: str, tmp_path: Path) -> None:
    verdict = check_vllm(_save(tmp_path, config))
    assert not verdict.loads
    assert any(reason in p for p in verdict.problems), verdict.problems


@pytest.mark.parametrize("config, mergeable", [
    (dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), True),
    (dt.ShadowConfig(task_type="CAUSAL_LM", r=4), False),
    (dt.BottleneckConfig(target_modules=["o_proj"], bottleneck_size=4), False),
], ids=["ia3", "shadow", "bottleneck"])
def test_the_advice_for_another_method_follows_whether_it_can_merge(config, mergeable, tmp_path: Path) -> None:
    (problem,) = check_vllm(_save(tmp_path, config)).problems
    assert ("deltatune merge" in problem) is mergeable
    assert ("can neither be merged nor converted" in problem) is not mergeable


def test_server_rank_limit(tmp_path: Path) -> None:
    path = _save(tmp_path, dt.LoraConfig(target_modules=_LLAMA, r=32))
    assert check_vllm(path, max_lora_rank=64).loads
    verdict = check_vllm(path, max_lora_rank=16)
    assert not verdict.loads and "--max-lora-rank 32" in verdict.problems[0]


def test_conv_targets_are_refused(tmp_path: Path) -> None:
    verdict = check_vllm(_save(tmp_path, dt.LoraConfig(target_modules=["conv2d"]), model=tiny_convnet()))
    assert not verdict.loads and "convolution" in verdict.problems[0]


def test_converted_pissa_adapter_loads(tmp_path: Path) -> None:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=_LLAMA, init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "init")
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert check_vllm(tmp_path / "plain").loads


def test_inspect_check_vllm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _save(tmp_path / "g", dt.LoraConfig(target_modules=_LLAMA))
    assert main(["inspect", str(good), "--check", "vllm"]) == 0
    assert "vllm:" in capsys.readouterr().out
    bad = _save(tmp_path / "b", dt.LoraConfig(target_modules=_LLAMA, use_dora=True))
    assert main(["inspect", str(bad), "--check", "vllm", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["vllm"]["loads"] is False and "DoRA" in report["vllm"]["problems"][0]
    assert main(["inspect", str(good)]) == 0
    assert "\nvllm:" not in capsys.readouterr().out  # only when asked


# --- deltatune export --to vllm -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    from tests.train_utils import write_llama

    return write_llama(tmp_path_factory.mktemp("export") / "llama")


def _adapter(llama_dir: str, tmp_path: Path, config: dt.PeftConfig) -> tuple[Path, dt.PeftModel]:
    from transformers import AutoModelForCausalLM

    from tests.adapter_utils import perturb_lora

    model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), config)
    if isinstance(config, dt.LoraConfig):
        perturb_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model.eval()


def test_export_copies_an_adapter_vllm_loads(llama_dir: str, tmp_path: Path, capsys) -> None:
    adapter, _ = _adapter(llama_dir, tmp_path, dt.LoraConfig(task_type="CAUSAL_LM", target_modules=_LLAMA))
    assert main(["export", str(adapter), "--to", "vllm", "--out", str(tmp_path / "out")]) == 0
    assert "as is" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (adapter / name).read_bytes()


def test_export_merges_what_vllm_refuses_and_reports_the_difference(llama_dir: str, tmp_path: Path, capsys) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    adapter, model = _adapter(
        llama_dir, tmp_path, dt.LoraConfig(task_type="CAUSAL_LM", target_modules=_LLAMA, use_dora=True)
    )
    assert main(["export", str(adapter), "--to", "vllm", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "DoRA" in out and "merged model" in out and "largest logit difference" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_export_of_a_prompt_adapter_is_refused_and_writes_nothing(llama_dir: str, tmp_path: Path, capsys) -> None:
    adapter, _ = _adapter(llama_dir, tmp_path, dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert main(["export", str(adapter), "--to", "vllm", "--out", str(tmp_path / "out")]) == 2
    assert "prompt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind


@pytest.mark.parametrize("init, reason", [
    ("loftq", "LoftQ-quantized base"), ("lora_ga", "path_initial_model_for_weight_conversion"),
    ("corda", "path_initial_model_for_weight_conversion"),
])
def test_inits_that_rewrote_the_base_are_named(init: str, reason: str) -> None:
    from deltatune.deploy import vllm_verdict

    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "init_lora_weights": init, "target_modules": ["q_proj"]}
    tensors = {"base_model.model.q_proj.lora_A.weight": {"shape": [8, 32]},
               "base_model.model.q_proj.lora_B.weight": {"shape": [32, 8]}}
    verdict = vllm_verdict(config, tensors)
    assert not verdict.loads and any(reason in p for p in verdict.problems), verdict.problems
