"""Adapters on quantized bases (``deltatune/quant.py``, issue 12): bitsandbytes 4-bit (nf4/fp4, double quant) and
8-bit, torchao int8 weight-only, all on the CPU.

The oracle for gradients is an fp32 model built from the very weights the quantized kernels compute with
(``tests/quant_models.dequantized_reference``); peft is the oracle for files and ``prepare_model_for_kbit_training``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import deltatune as dt
from deltatune import quant

bnb = pytest.importorskip("bitsandbytes")

from tests.quant_models import copy_trainable, dequantized_reference, grad_errors, load  # noqa: E402

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _lora(**kw) -> dt.LoraConfig:
    return dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw)


def _pair(kind: str, config) -> tuple[dt.PeftModel, dt.PeftModel]:
    """The adapter on the quantized model and the same adapter (copied) on its fp32 dequantized reference."""
    quantized = load(kind)
    reference = dequantized_reference(quantized)
    model = dt.get_peft_model(quantized, config)
    ref = dt.get_peft_model(reference, config)
    copy_trainable(model, ref)
    return model, ref


@pytest.mark.parametrize(("kind", "dora"), [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False),
                                             ("torchao", True)])
def test_gradients_equal_fp32_model_of_the_dequantized_weights(kind, dora):
    if kind == "torchao":
        pytest.importorskip("torchao")
    model, ref = _pair(kind, _lora(use_dora=dora))
    errors = grad_errors(model, ref, IDS)
    assert len(errors) == 14 * (3 if dora else 2)
    assert max(errors.values()) < 1e-4, errors
    # the adapter is float32 beside the quantized base (peft's dtype), and the base stayed quantized
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert quant.handler_for(base) is not None


def test_parameter_counts_match_peft():
    ours = dt.get_peft_model(load("nf4"), _lora())
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(load("nf4"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_base_stays_quantized_without_a_dense_copy():
    quantized = load("nf4")
    floats_before = sum(p.numel() for p in quantized.parameters() if p.is_floating_point())
    model = dt.get_peft_model(quantized, _lora())
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters() if p.is_floating_point()) == floats_before + adapter
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.dtype == torch.uint8
    assert not any("_view" in k or k.endswith("quantized.weight") for k in model.state_dict())


def _packed(layer) -> bool:
    return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def _force_avx512bf16(model) -> list:
    """Set the per-layer flag bitsandbytes' Linear4bit.forward reads to decide its CPU inference repack. On a CPU
    with AVX512-BF16 bitsandbytes sets it itself; on one without (this suite's usual machine), forcing it makes the
    same Python repack run, so the trap is exercised either way."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    return layers


def test_cpu_repack_trap_is_undone_and_prevented():
    """The trap (issue 12): an eval-mode forward without grad (from_pretrained returns eval mode) repacks every
    Linear4bit into an inference layout without a backward, and afterwards gradients silently go wrong. deltatune
    restores a repacked layer when an adapter is added and prevents any later repack; LoRA and DoRA gradients then
    equal those of the fp32 model of the dequantized weights, also after another eval forward without grad."""
    quantized = load("nf4")
    with torch.no_grad():
        expected = quantized(input_ids=IDS).logits
    layers = _force_avx512bf16(quantized)
    with torch.no_grad():
        repacked = quantized(input_ids=IDS).logits
    assert all(_packed(layer) for layer in layers)  # the trap has sprung
    if not bnb.functional.has_avx512bf16():  # no kernel for the packed layout here: the outputs are garbage too
        assert not torch.allclose(repacked, expected, atol=0.1)
    with pytest.warns(UserWarning, match="repacked for CPU inference"):
        model = dt.get_peft_model(quantized, _lora(use_dora=True))
    assert not any(_packed(layer) for layer in layers)
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    with torch.no_grad(), model.disable_adapter():  # restored: the base computes what it did before the repack
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0.02, atol=0.02)
    reference = dt.get_peft_model(dequantized_reference(model.get_base_model()), _lora(use_dora=True))
    copy_trainable(model, reference)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)  # would repack again without the guard
    assert not any(_packed(layer) for layer in layers)
    errors = grad_errors(model, reference, IDS)
    assert max(errors.values()) < 1e-4, errors


def test_guard_covers_layers_that_are_not_targets():
    quantized = load("nf4")
    layers = _force_avx512bf16(quantized)
    model = dt.get_peft_model(quantized, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    assert not any(_packed(layer) for layer in layers)  # mlp layers included


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao"])
def test_merge_reports_measured_error_and_unmerges_exactly(kind):
    if kind == "torchao":
        pytest.importorskip("torchao")
    model = dt.get_peft_model(load(kind), _lora())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    handler = layer.quant_handler
    before = handler.current(layer.base_layer)
    dense_before = handler.dequantize(layer.base_layer)
    delta = layer.deltas["default"]
    intended = (dense_before + (delta.lora_B.weight @ delta.lora_A.weight) * delta.scaling).detach()
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
    with pytest.warns(dt.QuantizedMergeWarning, match="lost"):
        model.merge_adapter()
    errors = model.quantized_merge_errors
    assert len(errors) == 14
    achieved = handler.dequantize(layer.base_layer)
    # independent figure: for isotropic inputs the output error ratio is the Frobenius-norm ratio
    frobenius = float((achieved - intended).norm() / (intended - dense_before).norm())
    assert errors["model.layers.0.self_attn.q_proj"] == pytest.approx(frobenius, rel=0.3)
    assert 0 < frobenius < 2
    with torch.no_grad():
        merged = model(input_ids=IDS).logits
    assert not torch.equal(merged, unmerged)
    model.unmerge_adapter()
    after = handler.current(layer.base_layer)
    if kind == "torchao":
        assert torch.equal(after.qdata, before.qdata) and torch.equal(after.scale, before.scale)
    else:
        assert torch.equal(after[0], before[0])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, rtol=0, atol=0)


def test_max_merge_error_refuses_and_changes_nothing():
    model = dt.get_peft_model(load("nf4"), _lora())
    snapshot = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(dt.AdapterStateError, match=r"would lose \d+\.\d% of the adapter's effect.*max_merge_error"):
        model.merge_and_unload(max_merge_error=1e-6)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)
    assert not any(layer.merged_adapters for _, layer in dt.layers.adapter_layers(model))
    with pytest.raises(dt.ConfigError, match="max_merge_error"):
        model.merge_adapter(max_merge_error=-1)
    with pytest.raises(dt.ConfigError, match="quantized_base"):
        model.merge_and_unload(quantized_base="bf16")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_into_dequantized_base_is_exact(kind):
    """Exact with respect to the dequantized weights: the merged model equals the adapter on the fp32 model of the
    dequantized weights (LLM.int8's own forward also quantizes activations, so only nf4 equals its kernel too)."""
    model, ref = _pair(kind, _lora(use_dora=kind == "nf4"))
    model.eval()
    ref.eval()
    with torch.no_grad():
        expected = ref(input_ids=IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", dt.QuantizedMergeWarning)
        merged = model.merge_and_unload(quantized_base="dequantize")
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_keeps_quantized_layers_and_reports():
    model = dt.get_peft_model(load("nf4"), _lora())
    with pytest.warns(dt.QuantizedMergeWarning):
        merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[1].mlp.up_proj, bnb.nn.Linear4bit)
    assert set(merged.quantized_merge_errors) == {
        f"model.layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")
    }


def test_pissa_init_on_quantized_base_is_refused_by_name():
    quantized = load("nf4")
    with pytest.raises(dt.QuantizationError, match=r"init_lora_weights='pissa'.*bitsandbytes 4-bit \(nf4"):
        dt.get_peft_model(quantized, dt.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)  # untouched


def test_unsupported_quantized_layer_names_type_and_fix():
    class QuantLinear(torch.nn.Module):  # a GPTQ-style layer: packed integer weights, no float weight
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(8, 4, dtype=torch.int32))

        def forward(self, x):
            return x

    QuantLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda"
    model = torch.nn.Sequential(QuantLinear(), torch.nn.Linear(4, 4))
    with pytest.raises(dt.QuantizationError, match=r"0: QuantLinear is a GPTQ \(auto-gptq\) quantized layer.*"
                                                   r"pip install 'deltatune\[quant\]'"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["0"]))


def test_quantized_modules_to_save_is_refused():
    quantized = load("nf4")
    with pytest.raises(dt.QuantizationError, match="modules_to_save 'model.layers.0.mlp.up_proj' is a quantized"):
        dt.get_peft_model(quantized, dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["mlp.up_proj"]))
    assert all(not isinstance(m, dt.AdapterLayer) for m in quantized.modules())


def test_torchao_activation_quantization_is_refused():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(dt.QuantizationError, match="Int8Tensor with activation quantization.*Int8WeightOnlyConfig"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("config", [
    dt.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
    dt.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    pytest.param(dt.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False), marks=pytest.mark.slow),
    pytest.param(dt.VeraConfig(r=4, target_modules=["q_proj", "o_proj"], init_weights=False),
                 marks=pytest.mark.slow),
    pytest.param(dt.OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj"], init_weights=False),
                 marks=pytest.mark.slow),
    pytest.param(dt.AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10, init_lora_weights=False),
                 marks=pytest.mark.slow),
    pytest.param(dt.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"], init_weights=False),
                 marks=pytest.mark.slow),
    dt.ShadowConfig(task_type="CAUSAL_LM", r=4, init_weights=False, shadow_dropout=0.0),  # whole blocks, a backbone
], ids=["ia3", "loha", "lokr", "vera", "oft", "adalora", "boft", "shadow"])
def test_other_layer_methods_train_on_the_same_dispatch(config):
    model, ref = _pair("nf4", config)
    errors = grad_errors(model, ref, IDS)
    assert errors and max(errors.values()) < 1e-4, errors


def test_prepare_model_for_kbit_training_matches_peft():
    from peft import prepare_model_for_kbit_training as peft_prepare

    ours = dt.prepare_model_for_kbit_training(load("nf4", torch.bfloat16))
    theirs = peft_prepare(load("nf4", torch.bfloat16))
    assert ours.model.norm.weight.dtype == torch.float32
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    # torch's default (reentrant) passed explicitly, so torch does not warn on every checkpointed layer
    assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": True} for layer in ours.model.layers)
    embeddings = ours.get_input_embeddings()(IDS)
    assert embeddings.requires_grad
    model = dt.get_peft_model(ours, _lora())
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=IDS, labels=IDS).loss.backward()
    assert not [str(w.message) for w in caught if "use_reentrant" in str(w.message)]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # through every checkpointed layer


@pytest.mark.slow
def test_deltatune_imports_without_the_quantization_libraries():
    code = ("import sys; sys.modules['bitsandbytes'] = None; sys.modules['torchao'] = None\n"
            "import torch, deltatune as dt\n"
            "m = dt.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.LoraConfig(target_modules=['0']))\n"
            "print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PeftModel"
