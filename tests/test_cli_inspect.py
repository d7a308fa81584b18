"""``deltatune inspect``: reports an adapter from its JSON and safetensors header only — no model, no code, no
unpickling."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from deltatune import LoraConfig, get_peft_model
from deltatune.cli import main
from tests.models import tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16,
                        base_model_name_or_path="org/base-model", revision="abc123")
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("second", LoraConfig(target_modules=["o_proj"], r=2, use_rslora=True, use_dora=True))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_report(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, str(adapter))
    assert code == 0, err
    size = (adapter / "adapter_model.safetensors").stat().st_size
    # q_proj: A (4x32) + B (32x4); v_proj: A (4x32) + B (16x4) (GQA: 2 kv heads x 8); 2 layers.
    params = 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    expected = {
        "method:": "LORA",
        "task:": "CAUSAL_LM",
        "base model:": "org/base-model (revision abc123)",
        "target modules:": "q_proj, v_proj",
        "modules to save:": "-",
        "rank:": "4 (alpha 16, scaling 4)",
        "weights:": f"adapter_model.safetensors: 8 tensors, {params:,} parameters (F32), {size / 1024:.1f} KiB",
        "deltatune:": "can load this adapter",
        "other adapters:": "second",
    }
    lines = {line.split(":", 1)[0] + ":": line.split(":", 1)[1].strip() for line in out.splitlines()}
    for key, value in expected.items():
        assert lines[key] == value, (key, out)


def test_subfolder_rslora_dora(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, str(adapter), "--subfolder", "second")
    assert code == 0
    assert "[subfolder second]" in out
    assert f"2 (alpha 8, scaling {8 / 2**0.5:g}, rsLoRA), DoRA" in out
    assert "task:            -" in out


def test_json(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, str(adapter), "--json")
    report = json.loads(out)
    assert code == 0
    assert report["method"] == "LORA" and report["r"] == 4 and report["lora_alpha"] == 16
    assert report["weights"]["tensors"] == 8 and report["weights"]["dtypes"] == {"F32": 8}
    assert report["weights"]["file_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert report["loadable"] is True and report["other_adapters"] == ["second"]


def test_loads_no_model_and_runs_no_code(adapter: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch, remote_code_dir: Path) -> None:
    """Even when the base model is a remote-code model, inspect reads nothing but the adapter's two files."""
    data = json.loads((adapter / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = str(remote_code_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(data))

    def boom(*args, **kwargs):
        raise AssertionError("inspect must not load models, tensors or code")

    for name in ("AutoModel", "AutoModelForCausalLM", "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", boom)
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr("safetensors.torch.load_file", boom)
    monkeypatch.setattr("transformers.dynamic_module_utils.get_class_from_dynamic_module", boom)
    code, out, err = _run(capsys, str(adapter))
    assert code == 0, err
    assert str(remote_code_dir) in out


_RAN: list[str] = []


def _side_effect() -> dict:
    _RAN.append("unpickled")
    return {}


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_pickle_only_adapter_is_not_unpickled(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    (adapter / "adapter_model.safetensors").unlink()
    buffer = io.BytesIO()
    torch.save({"x": _Evil()}, buffer)
    (adapter / "adapter_model.bin").write_bytes(buffer.getvalue())
    _RAN.clear()
    code, out, _ = _run(capsys, str(adapter))
    assert code == 0
    assert "adapter_model.bin (pickle)" in out and "weights not inspected" in out
    assert not _RAN


def test_no_weights(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    (adapter / "adapter_model.safetensors").unlink()
    code, out, _ = _run(capsys, str(adapter))
    assert code == 0 and "none found" in out


def test_prompt_learning_adapter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tmp_path.joinpath("adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8, "token_dim": 32,
         "base_model_name_or_path": "org/base"}))
    save_file({"prompt_embeddings": torch.zeros(8, 32)}, str(tmp_path / "adapter_model.safetensors"))
    code, out, _ = _run(capsys, str(tmp_path))
    assert code == 0
    assert "PROMPT_TUNING" in out and "virtual tokens:  8" in out and "256 parameters" in out
    assert "rank:" not in out


def test_other_methods_show_their_non_default_settings_instead_of_a_lora_rank(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    from deltatune import AdaLoraConfig

    get_peft_model(tiny_llama(), AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, total_step=20)).save_pretrained(tmp_path)
    code, out, _ = _run(capsys, str(tmp_path))
    assert code == 0
    assert "rank:" not in out  # AdaLoRA ignores r: a LoRA rank line would mislead
    settings = next(line for line in out.splitlines() if line.startswith("settings:"))
    assert "init_r=6" in settings and "total_step=20" in settings and "target_r" not in settings  # default


def test_unsupported_method_is_reported_not_fatal(adapter: Path, capsys: pytest.CaptureFixture) -> None:
    data = json.loads((adapter / "adapter_config.json").read_text())
    data["peft_type"] = "SOMETHING_NEW"
    (adapter / "adapter_config.json").write_text(json.dumps(data))
    code, out, _ = _run(capsys, str(adapter))
    assert code == 0
    assert "method:          SOMETHING_NEW" in out and "cannot load:" in out and "not supported" in out


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        (lambda a: (a / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda a: (a / "adapter_config.json").write_text("{"), "adapter_config.json: not a readable JSON"),
        (lambda a: (a / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}"),
         "adapter_model.safetensors: corrupt safetensors header"),
        (lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x01"), "truncated safetensors"),
    ],
)
def test_errors_exit_2_naming_the_file(adapter: Path, capsys: pytest.CaptureFixture, breakage, match: str) -> None:
    breakage(adapter)
    code, out, err = _run(capsys, str(adapter))
    assert code == 2 and out == ""
    assert err.startswith("deltatune inspect: error:") and match in err


def test_missing_location(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, str(tmp_path / "nope"))
    assert code == 2 and "nope" in err


def test_subprocess_python_m_deltatune(adapter: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run([sys.executable, "-m", "deltatune", "inspect", str(adapter)], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "method:          LORA" in result.stdout and "q_proj, v_proj" in result.stdout
