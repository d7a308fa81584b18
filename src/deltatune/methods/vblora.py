"""VB-LoRA: every LoRA factor of the model assembled from one small trainable bank of vectors.

Li et al., 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks" (NeurIPS 2024,
arXiv:2405.15179): the factors ``A ∈ R^{r×in}`` and ``B ∈ R^{out×r}`` of ``ΔW = B A`` are cut into sub-vectors of
length ``L`` (``vector_length``), and each sub-vector is a mixture of the ``k`` (``topk``) bank vectors its logits
rank highest, weighted by the softmax of those ``k`` logits (the "top-k admixture"). The bank ``(N, L)``
(``num_vectors`` × ``vector_length``) is shared by every adapted layer of one adapter and trains with the logits.

Per layer: ``vblora_logits_A`` ``(r, in/L, N)`` (row ``i`` of ``A`` is its ``in/L`` sub-vectors side by side) and
``vblora_logits_B`` ``(out/L, r, N)`` (column ``j`` of ``B`` is its ``out/L`` sub-vectors stacked), so ``L`` must
divide both dimensions. Init as in peft: bank ``U(-init_vector_bank_bound, init_vector_bank_bound)``, logits
``N(0, init_logits_std²)``: a fresh adapter already changes the model slightly (a bound of 0 starts at the base).

Saved keys, peft's: ``<module>.vblora_logits_A`` / ``vblora_logits_B`` and the bank once, ``base_model.vblora_vector_bank``.
With ``save_only_topk_weights`` the logits are replaced by what the forward reads of them: ``<key>_topk_indices``
(``uint8`` / ``int16`` / ``int32`` / ``int64`` as ``N`` needs) and ``<key>_topk_weights``, the first ``k − 1`` softmax
weights (they sum to one); loading rebuilds logits that give the same factors (``log`` of the weights, ``-inf``
elsewhere), fit for inference and merging but not for further training, which is refused.

Layer types: ``nn.Linear`` and transformers ``Conv1D`` (weight stored ``(in, out)``), as in peft.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LayerConfig, PeftType
from ..errors import AdapterLoadError, AdapterStateError, ConfigError
from ..registry import LayerMethod
from .common import (
    FactoredDelta, adapter_dtype, check_divides, check_dropout, check_scale, check_size, layer_features,
    record_fan_in_fan_out,
)

__all__ = ["VBLoRAConfig"]  # exported from deltatune

# peft's default targets for VB-LoRA (its own table: more modules than LoRA's for several model types)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclass
class VBLoRAConfig(LayerConfig):
    """Configuration of a VB-LoRA adapter (peft's field names). Shared targeting fields: see ``LayerConfig``.

    Attributes:
        r: Rank of each layer's ``B A``.
        num_vectors: ``N``, the number of vectors in the bank.
        vector_length: ``L``, the length of each bank vector; must divide every target's input and output size.
        topk: ``k``, how many bank vectors each sub-vector mixes (the paper's default 2); at most ``num_vectors``.
        save_only_topk_weights: Save only the top-k indices and weights instead of the logits (a far smaller file,
            for inference and merging; training cannot resume from it).
        vblora_dropout: Dropout on the adapter's input during training.
        fan_in_fan_out: Weight stored ``(in, out)``. Set from the target type (``Conv1D``: ``True``, ``Linear``:
            ``False``), as peft does; deltatune reads the layout from the layer type.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"vblora_only"`` (biases of adapted
            layers).
        init_vector_bank_bound: The bank starts ``U(-bound, bound)`` (small, e.g. 0.02; zero gives no gradients
            to the logits).
        init_logits_std: The logits start ``N(0, std²)``.
    """

    peft_type: PeftType = field(default=PeftType.VBLORA, init=False)
    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "num_vectors", "vector_length", "topk"):
            check_size(name, getattr(self, name))
        if self.topk > self.num_vectors:
            raise ConfigError(f"topk={self.topk} exceeds num_vectors={self.num_vectors}; each sub-vector mixes topk "
                              f"distinct bank vectors")
        check_dropout("vblora_dropout", self.vblora_dropout)
        for name in ("init_vector_bank_bound", "init_logits_std"):
            check_scale(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.bias not in ("none", "all", "vblora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'vblora_only', got {self.bias!r}")


class VectorBank(nn.Module):
    """The adapter's trainable bank ``vblora_vector_bank`` ``(N, L)``, held once in the model's shared state (saved
    as ``base_model.vblora_vector_bank``) and read by every layer at call time."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.vblora_vector_bank = nn.Parameter(bank)


def make_bank(config: VBLoRAConfig, bases: Mapping[str, nn.Module], shared: Mapping[str, nn.Module]) -> VectorBank:
    """A new bank for the adapter (each VB-LoRA adapter has its own, as in peft), ``U(-bound, bound)`` from torch's
    global generator, on the targets' device."""
    weight = next(iter(bases.values())).weight
    bank = torch.empty(config.num_vectors, config.vector_length, device=weight.device,
                       dtype=adapter_dtype(weight.dtype))
    if weight.device.type != "meta":  # a dry run only counts sizes
        with torch.no_grad():
            bank.uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)
    return VectorBank(bank)


def _admix(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., N)`` logits -> ``(..., L)`` sub-vectors: the softmax-weighted sum of the ``k`` top-ranked bank rows."""
    top, index = logits.topk(k, dim=-1)  # (..., k)
    return torch.einsum("...k,...kl->...l", top.softmax(dim=-1), bank[index])


def _index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype peft stores top-k indices in for a bank of ``num_vectors``."""
    for dtype, bound in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if num_vectors < bound:
            return dtype
    return torch.int64


_LOGITS = ("vblora_logits_A", "vblora_logits_B")


class VBLoRADelta(FactoredDelta):
    """``Δy = B A x`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)`` assembled from the shared bank at every call."""

    def __init__(self, base_layer: nn.Module, bank: VectorBank, config: VBLoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        length, n = config.vector_length, config.num_vectors
        self.vblora_logits_A = nn.Parameter(torch.zeros(config.r, self.in_features // length, n))
        self.vblora_logits_B = nn.Parameter(torch.zeros(self.out_features // length, config.r, n))
        self.topk, self.save_only_topk = config.topk, config.save_only_topk_weights
        self.dropout = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 else nn.Identity()
        # A plain reference, not a submodule: the bank is saved, trained and moved once, with the shared state.
        object.__setattr__(self, "bank", bank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` ``(r, in)`` and ``B`` ``(out, r)``."""
        if self.training and torch.is_grad_enabled() and bool(torch.isinf(self.vblora_logits_A[0, 0]).any()):
            raise AdapterStateError(
                "this VB-LoRA adapter was loaded from a save_only_topk_weights file, which keeps only the top-k "
                "weights (the other logits are -inf): it serves inference and merging, but cannot be trained further"
            )
        bank = self.bank.vblora_vector_bank.to(self.vblora_logits_A.device)
        r = self.vblora_logits_A.shape[0]
        a = _admix(self.vblora_logits_A, bank, self.topk).reshape(r, -1)  # (r, in/L, L) -> (r, in)
        b = _admix(self.vblora_logits_B, bank, self.topk).transpose(1, 2).reshape(-1, r)  # (out/L, L, r) -> (out, r)
        return a, b

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The logits, or with ``save_only_topk_weights`` peft's ``_topk_indices`` / ``_topk_weights`` pair each."""
        state = super().saved_state_dict()
        if not self.save_only_topk:
            return state
        index_dtype = _index_dtype(self.vblora_logits_A.shape[-1])
        for key in _LOGITS:
            top, index = state.pop(key).topk(self.topk, dim=-1)
            state[f"{key}_topk_indices"] = index.to(index_dtype)
            state[f"{key}_topk_weights"] = top.softmax(dim=-1)[..., :-1].contiguous()
        return state

    def state_from_saved(
        self, saved: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A top-k pair turned back into logits that select the same vectors with the same weights."""
        state = dict(saved)
        for key in _LOGITS:
            if f"{key}_topk_indices" not in state:
                continue
            index = state.pop(f"{key}_topk_indices")
            weights = state.pop(f"{key}_topk_weights", None)
            shape, n = getattr(self, key).shape, getattr(self, key).shape[-1]
            if (weights is None or index.is_floating_point() or tuple(index.shape) != (*shape[:-1], self.topk)
                    or tuple(weights.shape) != (*shape[:-1], self.topk - 1) or not weights.is_floating_point()):
                raise AdapterLoadError(
                    f"{key}_topk_indices / _topk_weights: expected integer indices {[*shape[:-1], self.topk]} and "
                    f"float weights {[*shape[:-1], self.topk - 1]} for this layer (topk={self.topk})"
                )
            index = index.long()
            if bool(((index < 0) | (index >= n)).any()):
                raise AdapterLoadError(f"{key}_topk_indices: an index lies outside the bank of {n} vectors")
            weights = weights.float()
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) \
                    or bool((weights.sum(-1) > 1 + 1e-5).any()):
                raise AdapterLoadError(f"{key}_topk_weights: the first topk - 1 softmax weights must be finite, "
                                       f"non-negative and sum to at most 1")
            last = (1 - weights.sum(-1, keepdim=True)).clamp_min(0)  # rounding may leave it a hair below zero
            weights = torch.cat([weights, last], dim=-1)  # (..., k)
            # as topk writes them: distinct indices, weights in strictly decreasing order (so that the rebuilt logits
            # select the same vectors in the same order)
            if bool((index.sort(-1).values.diff(dim=-1) == 0).any()) or bool((weights.diff(dim=-1) >= 0).any()):
                raise AdapterLoadError(f"{key}_topk_indices / _topk_weights: indices must be distinct and weights "
                                       f"strictly decreasing, as a top-k selection writes them")
            logits = torch.full(shape, float("-inf")).scatter(-1, index, weights.log())
            state[key] = logits
        return state

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.vblora_logits_A.shape[0]}, topk={self.topk}"


def check_target(config: VBLoRAConfig, base_layer: nn.Module, name: str) -> None:
    """Refuse a layer whose sizes ``vector_length`` does not divide.

    Raises:
        TargetError: ``vector_length`` does not divide the layer's input or output size.
    """
    check_divides(name, f"vector_length={config.vector_length}", config.vector_length, base_layer,
                  "each factor is cut into bank-sized sub-vectors")


def make_delta(config: VBLoRAConfig, base_layer: nn.Module, name: str, bank: VectorBank) -> VBLoRADelta:
    """Build the VB-LoRA delta of ``base_layer`` (module ``name``) on the adapter's ``bank``, logits ``N(0, std²)``."""
    delta = VBLoRADelta(base_layer, bank, config)
    delta.to(device=base_layer.weight.device, dtype=bank.vblora_vector_bank.dtype)
    if base_layer.weight.device.type != "meta":
        with torch.no_grad():
            for key in _LOGITS:
                getattr(delta, key).normal_(0.0, config.init_logits_std)
    return delta


METHOD = LayerMethod(
    config_class=VBLoRAConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear, Conv1D),
    default_targets=DEFAULT_TARGETS,
    check_target=check_target,
    resolve_config=record_fan_in_fan_out,
    make_shared=make_bank,
)
