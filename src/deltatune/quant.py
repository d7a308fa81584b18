"""Adapters on quantized base layers (QLoRA, Dettmers et al., 2023, arXiv:2305.14314): one dispatch for every method.

A quantized linear layer (bitsandbytes ``Linear4bit`` nf4/fp4 with or without double quantization, ``Linear8bitLt``;
a torchao int8 weight-only weight) stays quantized in the model. What a method's delta needs from it is only the base
layer's forward (the adapter layer runs the quantized kernel itself) and, for some methods (DoRA's norm, IA3's and
LoRA's merge, LoHa's/LoKr's shapes), the weight as a dense ``(out, in)`` tensor. Each supported quantization is a
:class:`QuantHandler` in :data:`HANDLERS`, the one list every method goes through: it recognises its layers,
dequantizes their weight, and writes a new dense weight back quantized (``store``, for merging). A delta is handed a
:class:`DequantizedLinear` in place of the quantized layer: an ``nn.Linear`` to the method's eyes whose ``weight``
is dequantized when read and never kept, so no full-precision copy of the base lives in memory.

What cannot work refuses by name before the model changes (:func:`check_target`): a layer of a quantization library
deltatune has no handler for (GPTQ / AWQ / HQQ / EETQ / quanto ...), a torchao weight other than int8 weight-only,
and an option that would rewrite the base weight (PiSSA / OLoRA initialisation), which a quantized layer cannot hold
exactly.

bitsandbytes' CPU repack (the gradient trap): on a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode with an
input that does not require grad permanently repacks the layer's weight into an inference layout
(``quant_state.packing_format_for_cpu``) whose matmul has no backward and whose bytes its dequantization misreads.
:func:`guard_model` prevents it on every ``Linear4bit`` of a model that gets an adapter (the per-layer flag
``support_avx512bf16_for_cpu``, the only thing that forward consults, is switched off) and restores a layer that was
already repacked (the 4-bit codes exactly; the block scales as the bfloat16 values the repack rounded them to, which
is what the layer computed with since).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from typing import Any

import torch
from torch import nn

from .errors import AdapterStateError, PeftWarning, QuantizationError

__all__ = [
    "HANDLERS", "QuantizationError", "DequantizedLinear", "QuantHandler", "QuantizedMergeWarning", "check_target", "delta_view",
    "dequantized_copy", "guard_model", "handler_for", "is_quantized", "merge_error", "prepare_model_for_kbit_training", "transformers_config", "weight_bytes", "weight_counts",
]

INSTALL = "pip install 'deltatune[quant]'"


class QuantizedMergeWarning(PeftWarning):
    """A merge into a quantized base: the measured share of the adapter's effect lost to requantization."""


class QuantHandler:
    """One quantization the adapters support. ``recognises`` must not import its library: a layer of a library that
    was never imported cannot exist, and deltatune imports without these optional packages."""

    name: str = ""

    def recognises(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def describe(self, module: nn.Module) -> str:
        """The layer's quantization in words, for messages."""
        return self.name

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`QuantizationError` for a variant of this quantization that the adapters cannot use."""

    def prepare(self, module: nn.Module) -> None:
        """Make ``module`` safe to train through (called for every such layer of a model that gets an adapter)."""

    def dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the weight dequantizes to: the dense weight's dtype before quantization where known."""
        raise NotImplementedError

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """A new dense ``(out, in)`` tensor in :meth:`dtype`: the weight the layer's kernel computes with."""
        raise NotImplementedError

    def quantize(self, module: nn.Module, weight: torch.Tensor) -> Any:
        """``weight`` quantized the way ``module`` is, without touching ``module``; what :meth:`store` writes."""
        raise NotImplementedError

    def dequantize_stored(self, module: nn.Module, stored: Any) -> torch.Tensor:
        """The dense weight a :meth:`quantize` result stands for (what the layer would compute with)."""
        raise NotImplementedError

    def store(self, module: nn.Module, stored: Any) -> None:
        """Make a :meth:`quantize` (or :meth:`current`) result the layer's weight."""
        raise NotImplementedError

    def current(self, module: nn.Module) -> Any:
        """The layer's quantized weight as :meth:`store` takes it (kept by a merge, to unmerge exactly)."""
        raise NotImplementedError

    def nbytes(self, module: nn.Module) -> int:
        """Memory the quantized weight takes (codes and scales)."""
        raise NotImplementedError


def _library_loaded(name: str) -> Any:
    return sys.modules.get(name)


class Bnb4bit(QuantHandler):
    """bitsandbytes ``Linear4bit`` (``BitsAndBytesConfig(load_in_4bit=True)``): nf4 or fp4 codes in blocks with an
    absmax scale each, the scales themselves 8-bit quantized under double quantization (QLoRA §3)."""

    name = "bitsandbytes 4-bit"

    def recognises(self, module: nn.Module) -> bool:
        bnb = _library_loaded("bitsandbytes")
        return bnb is not None and isinstance(module, bnb.nn.Linear4bit)

    def describe(self, module: nn.Module) -> str:
        state = module.weight.quant_state
        if state is None:
            return f"{self.name} (not quantized yet)"
        double = ", double quant" if state.nested or getattr(state, "original_nested", False) else ""
        return f"{self.name} ({state.quant_type}{double}, compute {module.compute_dtype})"

    def check(self, module: nn.Module, path: str) -> None:
        if getattr(module.weight, "quant_state", None) is None:
            raise QuantizationError(
                f"{path}: the bitsandbytes Linear4bit has not been quantized yet (its weights are quantized when the "
                f"module moves to a device); load the model with BitsAndBytesConfig or call .to('cpu'/'cuda') first"
            )

    def prepare(self, module: nn.Module) -> None:
        module.support_avx512bf16_for_cpu = False  # the repack below is then never done again
        state = module.weight.quant_state
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _unpack_cpu_layout(module)
            warnings.warn(
                "a bitsandbytes Linear4bit had been repacked for CPU inference (an eval-mode forward without grad on "
                "an AVX512-BF16 CPU), a layout with no backward; deltatune restored the training layout. The repack "
                "rounded the layer's block scales to bfloat16, so its weights now differ from the loaded ones by that "
                "rounding (relative 2**-8 at most)",
                stacklevel=4,
            )

    def dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.quant_state.dtype

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(module.weight.data, module.weight.quant_state).to(self.dtype(module))

    def quantize(self, module: nn.Module, weight: torch.Tensor) -> Any:
        from bitsandbytes.functional import quantize_4bit

        state = module.weight.quant_state
        return quantize_4bit(
            weight.to(state.dtype).contiguous(), blocksize=state.blocksize, compress_statistics=state.nested,
            quant_type=state.quant_type, quant_storage=module.weight.data.dtype,
        )

    def dequantize_stored(self, module: nn.Module, stored: Any) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        data, state = stored
        return dequantize_4bit(data, state).to(state.dtype)

    def store(self, module: nn.Module, stored: Any) -> None:
        data, state = stored
        module.weight.data = data
        module.weight.quant_state = state
        module.quant_state = state

    def current(self, module: nn.Module) -> Any:
        return module.weight.data, module.weight.quant_state

    def nbytes(self, module: nn.Module) -> int:
        state = module.weight.quant_state
        tensors = [module.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        return sum(t.nbytes for t in tensors)


def _unpack_cpu_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repack of a ``Linear4bit`` in place. The codes are permuted back (lossless,
    bitsandbytes' own inverse); the scales are taken as the repack left them (bfloat16, ``(K / blocksize, N)``) and
    stored flat in float32 without double quantization, so the layer keeps computing with exactly those values
    (bitsandbytes' inverse re-quantizes them, or leaves them transposed when they were not double-quantized)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = module.weight.quant_state
    absmax = state.absmax.T.reshape(-1).float()  # (N * K / blocksize,), row-major blocks as before the repack
    data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    state.absmax, state.nested = absmax, False
    for name in ("state2", "offset"):
        if hasattr(state, name):
            setattr(state, name, None)
    module.weight.data, module.weight.quant_state, module.quant_state = data, state, state


class Bnb8bit(QuantHandler):
    """bitsandbytes ``Linear8bitLt`` (``BitsAndBytesConfig(load_in_8bit=True)``, LLM.int8(), arXiv:2208.07339):
    int8 rows with one absmax scale per output row (``SCB``), ``W = int8 · SCB / 127``."""

    name = "bitsandbytes 8-bit"

    def recognises(self, module: nn.Module) -> bool:
        bnb = _library_loaded("bitsandbytes")
        return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)

    @staticmethod
    def _scale(module: nn.Module) -> torch.Tensor | None:
        """The row scales: on the weight until the first forward, then moved to the layer's ``state``."""
        state_scale = getattr(module.state, "SCB", None)
        return state_scale if state_scale is not None else getattr(module.weight, "SCB", None)

    def check(self, module: nn.Module, path: str) -> None:
        if module.weight.dtype != torch.int8 or self._scale(module) is None:
            raise QuantizationError(
                f"{path}: the bitsandbytes Linear8bitLt holds no int8 weight (has_fp16_weights=True or not moved to a "
                f"device yet); load the model with BitsAndBytesConfig(load_in_8bit=True)"
            )

    def dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float32  # the scales are float32; the pre-quantization dtype is not recorded

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return self.dequantize_stored(module, (module.weight.data, self._scale(module)))

    def quantize(self, module: nn.Module, weight: torch.Tensor) -> Any:
        from bitsandbytes.functional import int8_vectorwise_quant

        data, scale, _ = int8_vectorwise_quant(weight.to(torch.float16 if weight.is_cuda else torch.float32))
        return data, scale

    def dequantize_stored(self, module: nn.Module, stored: Any) -> torch.Tensor:
        data, scale = stored
        return data.float() * (scale.float() / 127).unsqueeze(1)  # (out, in)

    def store(self, module: nn.Module, stored: Any) -> None:
        data, scale = stored
        module.weight.data = data
        holder = module.state if module.state.CB is not None else module.weight
        holder.CB, holder.SCB = data, scale

    def current(self, module: nn.Module) -> Any:
        return module.weight.data, self._scale(module)

    def nbytes(self, module: nn.Module) -> int:
        return module.weight.data.nbytes + self._scale(module).nbytes


class TorchAOInt8(QuantHandler):
    """torchao int8 weight-only (``Int8WeightOnlyConfig``, ``TorchAoConfig``): the weight parameter is an
    ``Int8Tensor`` (symmetric int8 with per-row, per-group or per-tensor scales) that ``F.linear`` dispatches on."""

    name = "torchao int8 weight-only"

    def _tensor_class(self) -> type | None:
        if _library_loaded("torchao") is None:
            return None
        from torchao.quantization import Int8Tensor

        return Int8Tensor

    def recognises(self, module: nn.Module) -> bool:
        if _library_loaded("torchao") is None or not isinstance(module, nn.Linear):
            return False
        from torchao.utils import TorchAOBaseTensor

        return isinstance(module.weight, TorchAOBaseTensor)

    def describe(self, module: nn.Module) -> str:
        return f"torchao {type(module.weight).__name__}"

    def check(self, module: nn.Module, path: str) -> None:
        weight = module.weight
        cls = self._tensor_class()
        if type(weight) is not cls or weight.act_quant_kwargs is not None:
            kind = type(weight).__name__ + (" with activation quantization" if cls is type(weight) else "")
            raise QuantizationError(
                f"{path}: deltatune supports torchao int8 weight-only weights (Int8WeightOnlyConfig); this layer holds "
                f"a torchao {kind}, whose backward and requantization deltatune has not verified. Quantize with "
                f"Int8WeightOnlyConfig, or dequantize the model first (int4 configs need CUDA or the mslk package)"
            )

    def dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().to(self.dtype(module))

    def quantize(self, module: nn.Module, weight: torch.Tensor) -> Any:
        from torchao.quantization import PerGroup, PerRow, PerTensor

        old = module.weight
        block = list(old.block_size)
        if block == list(old.shape):
            granularity = PerTensor()
        elif block == [1, old.shape[1]]:
            granularity = PerRow()
        else:
            granularity = PerGroup(block[1])
        return type(old).from_hp(weight.to(old.dtype), granularity)

    def dequantize_stored(self, module: nn.Module, stored: Any) -> torch.Tensor:
        return stored.dequantize().to(stored.dtype)

    def store(self, module: nn.Module, stored: Any) -> None:
        module.weight = nn.Parameter(stored, requires_grad=False)

    def current(self, module: nn.Module) -> Any:
        return module.weight.data

    def nbytes(self, module: nn.Module) -> int:
        weight = module.weight
        return sum(t.nbytes for t in (weight.qdata, weight.scale, weight.zero_point) if t is not None)


# The one list every method's adapters go through (order matters only if a layer could match two).
HANDLERS: list[QuantHandler] = [Bnb4bit(), Bnb8bit(), TorchAOInt8()]

# Quantization libraries without a handler, recognised by where their layer classes live, so that they are refused
# by name instead of being mistaken for something else (or, not being nn.Linear, reported as "cannot adapt").
_UNSUPPORTED_LIBRARIES = {
    "auto_gptq": "GPTQ (auto-gptq)", "gptqmodel": "GPTQ (gptqmodel)", "awq": "AWQ (autoawq)", "hqq": "HQQ",
    "eetq": "EETQ", "optimum.quanto": "quanto", "aqlm": "AQLM", "vptq": "VPTQ", "compressed_tensors": "compressed-tensors",
    "fp_quant": "FP-Quant", "spqr_quant": "SpQR", "higgs": "HIGGS",
}


def handler_for(module: nn.Module) -> QuantHandler | None:
    """The handler of a quantized layer, ``None`` for an ordinary one."""
    for handler in HANDLERS:
        if handler.recognises(module):
            return handler
    return None


def is_quantized(module: nn.Module) -> bool:
    return handler_for(module) is not None


def _foreign_quantization(module: nn.Module) -> str | None:
    """The name of an unsupported quantization ``module`` belongs to, or ``None``."""
    owner = type(module).__module__
    for prefix, name in _UNSUPPORTED_LIBRARIES.items():
        if owner == prefix or owner.startswith(prefix + "."):
            return name
    if hasattr(module, "qweight") and not isinstance(getattr(module, "weight", None), torch.Tensor):
        return "packed-integer (GPTQ/AWQ-style)"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and handler_for(module) is None:
        if not (weight.is_floating_point() or weight.is_complex()):
            return f"{weight.dtype} weight"
        if type(weight) not in (torch.Tensor, nn.Parameter) and type(weight).__module__.startswith("torchao"):
            return f"torchao {type(weight).__name__}"
    return None


def check_target(module: nn.Module, path: str, method: str, rewrites_base: str | None) -> None:
    """Refuse, naming the layer and the fix, a target the adapters cannot work on: a quantization without a handler,
    an unsupported variant of a handled one, or (``rewrites_base``: the option that would, e.g.
    ``"init_lora_weights='pissa'"``) an option that rewrites a quantized base weight."""
    foreign = _foreign_quantization(module)
    if foreign is not None:
        raise QuantizationError(
            f"{path}: {type(module).__name__} is a {foreign} quantized layer, which deltatune cannot put {method} on "
            f"(supported: bitsandbytes Linear4bit / Linear8bitLt and torchao int8 weight-only, {INSTALL}); load the "
            f"base model unquantized or with BitsAndBytesConfig / TorchAoConfig(Int8WeightOnlyConfig())"
        )
    handler = handler_for(module)
    if handler is None:
        return
    handler.check(module, path)
    if rewrites_base is not None:
        raise QuantizationError(
            f"{path}: {rewrites_base} rewrites the base weight with its residual, which a {handler.describe(module)} "
            f"layer cannot hold exactly; use the default init on a quantized base, or initialise on the unquantized "
            f"model and quantize afterwards"
        )


class DequantizedLinear(nn.Linear):
    """What a delta sees of a quantized linear layer: an ``nn.Linear`` whose ``weight`` is the dequantized ``(out,
    in)`` weight, computed on every read and never stored (so a method that needs it, DoRA's norm, pays one
    dequantization per use, and nothing is kept), whose ``bias`` is the layer's, and whose forward is the quantized
    layer's own kernel. It owns no parameters and is not registered as a submodule anywhere."""

    def __init__(self, layer: nn.Module, handler: QuantHandler) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "quantized", layer)
        object.__setattr__(self, "handler", handler)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.handler.dequantize(self.quantized)

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.quantized.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)

    def extra_repr(self) -> str:
        return f"{self.handler.describe(self.quantized)}, in={self.in_features}, out={self.out_features}"


def delta_view(module: nn.Module) -> nn.Module:
    """``module`` itself, or its :class:`DequantizedLinear` view when it is quantized: what deltas are built from
    and called with."""
    handler = handler_for(module)
    return module if handler is None else DequantizedLinear(module, handler)


def guard_model(model: nn.Module) -> None:
    """Make every quantized layer of ``model`` safe to train through (:meth:`QuantHandler.prepare`; bitsandbytes'
    CPU repack, see the module docstring), whether or not it is an adapter's target: a repacked layer anywhere breaks
    the gradients of every adapter below it."""
    for module in model.modules():
        handler = handler_for(module)
        if handler is not None:
            handler.prepare(module)


def merge_error(before: torch.Tensor, intended: torch.Tensor, achieved: torch.Tensor, probes: int = 64) -> float:
    """How much of a merge's effect requantization lost, measured on the layer's outputs: ``‖(W_q − W_m) x‖ /
    ‖(W_m − W_0) x‖`` over ``probes`` fixed standard-normal inputs ``x``, with ``W_0`` the dequantized weight before
    the merge, ``W_m`` the exact merged weight and ``W_q`` what the layer holds after requantizing it. 0 is a perfect
    merge; 1 means the error is as large as the adapter's whole effect. A merge with no effect scores 0 if
    requantization also changed nothing, else infinity."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(before.shape[1], probes, generator=generator).to(device=before.device, dtype=torch.float32)
    effect = torch.linalg.norm((intended.float() - before.float()) @ x)
    miss = torch.linalg.norm((achieved.float() - intended.float()) @ x)
    if effect == 0:
        return 0.0 if miss == 0 else float("inf")
    return float(miss / effect)


# transformers' ``quantization_method`` values for which peft leaves parameter dtypes alone (their kernels own them)
_KEEP_DTYPES = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None, auto_clear_cache: bool = True,
) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` for a transformers model loaded quantized: freeze every parameter;
    cast float16/bfloat16 parameters that are not 4-bit weights to float32 (layer norms, embeddings, the LM head:
    small, and unstable in half precision), except for kernels that own their dtypes (GPTQ, AQLM, EETQ, HQQ,
    torchao); then, for a quantized model with ``use_gradient_checkpointing``, make the input embeddings' output
    require grad (needed by reentrant checkpointing, the default unless ``gradient_checkpointing_kwargs`` sets
    ``use_reentrant=False``) and enable gradient checkpointing with ``gradient_checkpointing_kwargs``. That default,
    torch's, is passed explicitly (peft leaves it unset), so torch does not warn on every checkpointed call.
    ``auto_clear_cache`` empties the accelerator's cache after the casts. Returns ``model`` (changed in place).

    Beyond peft: every quantized layer is made safe to train through (:func:`guard_model`, the bitsandbytes CPU
    repack), which also covers training without an adapter method of deltatune's on top.
    """
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    quantized = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                     or method in _KEEP_DTYPES or getattr(model, "hqq_quantized", False))
    kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
    for param in model.parameters():
        param.requires_grad_(False)
    if method not in _KEEP_DTYPES and not getattr(model, "hqq_quantized", False):
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    guard_model(model)
    if quantized and use_gradient_checkpointing:
        if kwargs["use_reentrant"]:
            model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def weight_counts(model: nn.Module) -> dict[int, int]:
    """``id(weight) -> in · out`` for every quantized weight of ``model``: how many weights it stands for (a 4-bit
    parameter holds two per byte), as parameter counts report them (peft's ``get_nb_trainable_parameters``)."""
    return {id(m.weight): m.in_features * m.out_features for m in model.modules() if handler_for(m) is not None}


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes, dense bytes)``: the memory the parameters and buffers of ``model`` take, and what they would take
    with every quantized weight dense in its dequantized dtype (the saving ``deltatune train --quantize`` reports)."""
    quantized = {}
    for module in model.modules():
        handler = handler_for(module)
        if handler is not None:
            quantized[id(module.weight)] = (handler.nbytes(module), module.in_features * module.out_features
                                            * handler.dtype(module).itemsize)
    actual = dense = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        small, full = quantized.get(id(tensor), (tensor.nbytes, tensor.nbytes))
        actual, dense = actual + small, dense + full
    return actual, dense


# ``deltatune train --quantize`` choices
CLI_QUANTIZATIONS = ("nf4", "int8", "torchao-int8")


def transformers_config(kind: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The transformers ``quantization_config`` for a ``--quantize`` choice: ``nf4`` (bitsandbytes NF4 with double
    quantization, the QLoRA recipe, §3), ``int8`` (bitsandbytes LLM.int8), ``torchao-int8`` (torchao int8
    weight-only). Raises :class:`QuantizationError` naming what to install when the library is missing."""
    if kind not in CLI_QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {kind!r}; choose one of {', '.join(CLI_QUANTIZATIONS)}")
    library = "torchao" if kind.startswith("torchao") else "bitsandbytes"
    if importlib.util.find_spec(library) is None:
        raise QuantizationError(f"--quantize {kind} needs {library}, which is not installed: {INSTALL}")
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def dequantized_copy(module: nn.Module, weight: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` (default: the layer's dequantized weight) and a copy of the bias,
    in the handler's dtype: what a merge into a dequantized base leaves."""
    handler = handler_for(module)
    if handler is None:
        raise AdapterStateError(f"{type(module).__name__} is not a quantized layer")
    dense = handler.dequantize(module) if weight is None else weight.to(handler.dtype(module))
    bias = module.bias
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(dense.detach().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dense.dtype).clone(), requires_grad=bias.requires_grad)
    return linear.train(module.training)
