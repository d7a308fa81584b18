"""The adapter knows its base: ``save_pretrained`` records a fingerprint of the base model in the safetensors metadata,
loading onto another base warns (or, with ``strict_base=True``, refuses and changes nothing), a dtype change of the
same base matches, peft still reads the file, and adapters without a fingerprint load as before."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import deltatune as dt
from deltatune.cli import main
from deltatune.fingerprint import METADATA_KEY
from tests.adapter_utils import assert_same_state, snapshot
from tests.models import VOCAB_SIZE, make_causal_lm_inputs, tiny_llama

WEIGHTS = "adapter_model.safetensors"


def _saved(tmp_path: Path, **config) -> Path:
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights=False, **config))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _mismatch_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, dt.BaseModelMismatchWarning)]


def test_the_fingerprint_is_in_the_metadata_and_peft_still_loads_the_file(tmp_path: Path) -> None:
    import peft

    directory = _saved(tmp_path)
    with safe_open(directory / WEIGHTS, "pt") as fh:
        fingerprint = json.loads(fh.metadata()[METADATA_KEY])
    assert fingerprint["architecture"] == "LlamaForCausalLM" and fingerprint["model_type"] == "llama"
    assert fingerprint["vocab_size"] == VOCAB_SIZE
    assert sorted(fingerprint["weights"]) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    assert fingerprint["weights"]["model.layers.0.self_attn.q_proj"]["shape"] == [32, 32]
    assert len(json.dumps(fingerprint)) < 1000  # compact: 16 bfloat16 values per weight
    ours = dt.PeftModel.from_pretrained(tiny_llama(), directory).eval()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), directory).eval()
    batch = make_causal_lm_inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_same_base_in_any_dtype_loads_silently(tmp_path: Path, dtype: torch.dtype) -> None:
    directory = _saved(tmp_path)
    assert _mismatch_warnings(lambda: dt.PeftModel.from_pretrained(tiny_llama().to(dtype), directory)) == []


def test_another_base_with_the_same_shapes_warns_what_differs_and_how_to_silence_it(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    messages = _mismatch_warnings(lambda: dt.PeftModel.from_pretrained(tiny_llama(seed=1), directory))
    assert len(messages) == 1
    assert "4 of 4 targeted weights hold other values" in messages[0] and str(directory) in messages[0]
    assert "strict_base=True" in messages[0] and "category=deltatune.BaseModelMismatchWarning" in messages[0]


def test_a_resized_vocabulary_warns(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    base = tiny_llama()
    base.resize_token_embeddings(VOCAB_SIZE + 8, mean_resizing=False)
    messages = _mismatch_warnings(lambda: dt.PeftModel.from_pretrained(base, directory))
    assert len(messages) == 1 and f"vocab_size {VOCAB_SIZE} when saved, {VOCAB_SIZE + 8} now" in messages[0]


def test_strict_base_refuses_and_leaves_the_base_untouched(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    base = tiny_llama(seed=1)
    before = snapshot(base)
    with pytest.raises(dt.AdapterLoadError, match="saved with a different base model.*hold other values"):
        dt.PeftModel.from_pretrained(base, directory, strict_base=True)
    assert_same_state(before, base)
    assert not any(isinstance(m, dt.AdapterLayer) for m in base.modules())
    dt.PeftModel.from_pretrained(tiny_llama(), directory, strict_base=True)  # the right base loads


def test_strict_load_adapter_refuses_and_keeps_the_existing_adapters(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    model = dt.get_peft_model(tiny_llama(seed=1), dt.LoraConfig(r=2, target_modules=["o_proj"],
                                                                 init_lora_weights=False))
    model.save_pretrained(tmp_path / "own")
    model = dt.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "own").eval()
    batch = make_causal_lm_inputs(model)
    with torch.no_grad():
        expected = model(**batch).logits
    with pytest.raises(dt.AdapterLoadError, match="different base model"):
        model.load_adapter(directory, "wrong", strict_base=True)
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)


def test_the_auto_classes_pass_strict_base_to_the_adapter(tmp_path: Path) -> None:
    from deltatune.auto import _ADAPTER_ONLY

    assert "strict_base" in _ADAPTER_ONLY  # not handed to the base model's from_pretrained


def test_an_adapter_saved_by_peft_has_no_fingerprint_and_loads_as_before(tmp_path: Path) -> None:
    import peft

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    assert _mismatch_warnings(lambda: dt.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "peft")) == []
    dt.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "peft", strict_base=True)


def test_inspect_shows_the_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import peft

    directory = _saved(tmp_path)
    assert main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "fingerprint:     LlamaForCausalLM (llama, vocabulary 128); 4 targeted base weights, 4 sampled" in out
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    assert "fingerprint:     none (saved by peft" in capsys.readouterr().out
