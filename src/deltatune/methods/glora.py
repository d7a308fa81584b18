"""GLoRA: one generalised prompt that scales, shifts and re-biases a frozen linear layer.

Chavan et al., 2023, "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning" (arXiv:2306.07967), §3
(eq. 4-5): the weight and the bias each get a multiplicative and an additive correction, and the bias a term
coupled to the weight:

    W' = W0 + W0 ⊙ A + B            b' = b0 + b0 ⊙ D + E + W0 C

``A``, ``B`` ``(out, in)``, ``C`` ``(in, 1)``, ``D``, ``E`` ``(out,)``; each is parameterised independently
(``config_A_B``, ``config_C``, ``config_D_E``) as a rank-``r`` product ``Xd Xu`` (``"lora"``), a column broadcast
along the row (``"vector"``: ``(out, 1)`` for A/B, ``(in, 1)`` for C, ``(out,)`` for D/E), one scalar
(``"constant"``) or nothing (``"none"``). On a layer without a bias, ``C``, ``D`` and ``E`` are absent (as in peft).
Init: ``Xu`` Kaiming-uniform (``a = √5``) and everything else zero, so the adapter starts as the base layer;
``init_weights=False`` draws every factor (Kaiming-uniform; scalars ``N(0, 0.02²)``), for tests.

Because ``W0 ⊙ A`` reads the base weight, several merged GLoRA adapters each use the weight from before any merge
(``Delta.merges_from_original``), which is what the unmerged forward computes; unmerge restores that weight.

Saved keys, peft's: ``<module>.glora_{A,B,C}.Xd`` / ``.Xu`` (lora), ``.X`` (vector, constant), and for an absent
part peft's zero placeholder ``<module>.glora_<P>.zeros`` (written here from shapes, not kept in memory; a file whose
placeholder is not zero is refused). Layer type: ``nn.Linear``, as in peft.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerConfig, PeftType
from ..errors import AdapterLoadError, ConfigError
from ..layers import Delta
from ..registry import LayerMethod
from .common import check_size, place_delta

__all__ = ["GloraConfig"]  # exported from deltatune

_A_B = ("lora", "vector", "constant", "none")
_C = ("lora", "vector", "none")
_D_E = ("vector", "constant", "none")


@dataclass
class GloraConfig(LayerConfig):
    """Configuration of a GLoRA adapter (peft's field names). Shared targeting fields: ``target_modules`` and
    ``modules_to_save`` (see ``LayerConfig``); peft's ``GloraConfig`` has no other.

    Attributes:
        r: Rank of every part parameterised as ``"lora"``.
        bias: Which biases train and are saved: ``"none"``, ``"all"`` or ``"glora_only"`` (biases of adapted layers).
        config_A_B: Form of ``A`` and ``B`` (the weight's scale and shift): ``"lora"``, ``"vector"``, ``"constant"``
            or ``"none"``.
        config_C: Form of ``C`` (the bias term coupled to the weight, ``W0 C``): ``"lora"``, ``"vector"`` or
            ``"none"``.
        config_D_E: Form of ``D`` and ``E`` (the bias's scale and shift): ``"vector"``, ``"constant"`` or ``"none"``.
        init_weights: ``True``: the base layer at init. ``False``: random factors, for tests.
    """

    peft_type: PeftType = field(default=PeftType.GLORA, init=False)
    _not_in_peft: ClassVar[tuple[str, ...]] = ("exclude_modules", "layers_to_transform", "layers_pattern")
    r: int = 8
    bias: str = "none"
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size("r", self.r)
        if self.bias not in ("none", "all", "glora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'glora_only', got {self.bias!r}")
        for name, allowed in (("config_A_B", _A_B), ("config_C", _C), ("config_D_E", _D_E)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (the base layer) or False (random), got "
                              f"{self.init_weights!r}")


class _Part(nn.Module):
    """One of A..E: ``Xd Xu`` (``"lora"``), a broadcast column or vector ``X`` (``"vector"``), a scalar ``X``
    (``"constant"``), or absent (``"none"``: :meth:`value` is ``None``, peft's zero placeholder of ``shape`` is what
    a file holds)."""

    def __init__(self, kind: str, shape: tuple[int, ...], r: int) -> None:
        super().__init__()
        self.kind, self.shape = kind, shape
        if kind == "lora":  # shape (rows, cols): Xd (rows, r), Xu (r, cols)
            self.Xd = nn.Parameter(torch.zeros(shape[0], r))
            self.Xu = nn.Parameter(torch.zeros(r, shape[1]))
        elif kind == "vector":  # (rows, 1) for a matrix part, (out,) for D / E
            self.X = nn.Parameter(torch.zeros(shape[0], 1) if len(shape) == 2 else torch.zeros(shape))
        elif kind == "constant":
            self.X = nn.Parameter(torch.zeros(1))

    def value(self) -> torch.Tensor | None:
        """The part, broadcastable to ``shape``; ``None`` when absent."""
        if self.kind == "lora":
            return self.Xd @ self.Xu
        if self.kind in ("vector", "constant"):
            return self.X if self.kind == "vector" else self.X[0]
        return None

    def init(self, random: bool) -> None:
        if self.kind == "lora":
            nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
            if random:
                nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))
        elif random and self.kind == "vector":
            nn.init.kaiming_uniform_(self.X if self.X.dim() == 2 else self.X.unsqueeze(0), a=math.sqrt(5))
        elif random and self.kind == "constant":
            nn.init.normal_(self.X, std=0.02)


class GloraDelta(Delta):
    """``Δy = x (W0 ⊙ A + B)ᵀ + b0 ⊙ D + E + W0 C`` (the bias terms only on a layer with a bias)."""

    merges_from_original = True

    def __init__(self, in_features: int, out_features: int, config: GloraConfig, has_bias: bool) -> None:
        super().__init__()
        r, out, inp = config.r, out_features, in_features
        self.glora_A = _Part(config.config_A_B, (out, inp), r)
        self.glora_B = _Part(config.config_A_B, (out, inp), r)
        self.glora_C = _Part(config.config_C if has_bias else "none", (inp, 1), r)
        self.glora_D = _Part(config.config_D_E if has_bias else "none", (out,), r)
        self.glora_E = _Part(config.config_D_E if has_bias else "none", (out,), r)

    def _parts(self) -> tuple[_Part, ...]:
        return self.glora_A, self.glora_B, self.glora_C, self.glora_D, self.glora_E

    def updates(self, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(ΔW (out, in), Δb (out,))`` from the unmerged ``weight`` and ``bias``; ``None`` for no change."""
        a, b, c, d, e = (part.value() for part in self._parts())
        w0 = weight.to(_dtype(self, weight))
        dw = None if a is None else w0 * a
        if b is not None:
            dw = b.expand_as(w0) if dw is None else dw + b
        if bias is None:
            return dw, None
        db = None
        for term in (None if d is None else bias.to(w0.dtype) * d, e, None if c is None else (w0 @ c).squeeze(-1)):
            if term is not None:
                db = term.expand(bias.shape) if db is None else db + term
        return dw, db

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        dw, db = self.updates(base_layer.weight, base_layer.bias)
        if dw is None and db is None:
            return base_out
        if dw is None:
            return base_out + db.to(base_out.dtype)
        return base_out + F.linear(x.to(dw.dtype), dw, db).to(base_out.dtype)

    def merged_params(self, params: dict[str, torch.Tensor], base_layer: nn.Module,
                      original: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        assert original is not None  # the layer passes it (merges_from_original)
        dw, db = self.updates(original["weight"], original.get("bias"))
        merged = {}
        if dw is not None:
            merged["weight"] = params["weight"] + dw.to(params["weight"].dtype)
        if db is not None and "bias" in params:
            merged["bias"] = params["bias"] + db.to(params["bias"].dtype)
        return merged

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters as peft names them, plus peft's zero placeholder for each absent part."""
        state = super().saved_state_dict()
        for name, part in zip("ABCDE", self._parts()):
            if part.kind == "none":
                state[f"glora_{name}.zeros"] = torch.zeros(part.shape, dtype=_dtype(self, None))
        return state

    def state_from_saved(self, saved: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
        """The file's tensors without the placeholders, which must be zero (peft would add a non-zero one)."""
        state = {}
        absent = {f"glora_{name}.zeros": tuple(part.shape) for name, part in zip("ABCDE", self._parts())
                  if part.kind == "none"}
        for key, value in saved.items():
            if key.endswith(".zeros"):
                if key in absent and tuple(value.shape) != absent[key]:
                    raise AdapterLoadError(f"{key} has shape {tuple(value.shape)} but this layer's absent part is "
                                           f"{absent[key]}; the file is corrupt or was saved for another model")
                if value.is_floating_point() and bool(value.ne(0).any()):
                    raise AdapterLoadError(f"{key} is GLoRA's placeholder for an absent part but is not zero; the "
                                           f"file is corrupt or was edited")
                continue
            state[key] = value
        return state


def _dtype(delta: GloraDelta, weight: torch.Tensor | None) -> torch.dtype:
    """The adapter's dtype (that of its first parameter), else ``weight``'s, else float32."""
    param = next(delta.parameters(), None)
    if param is not None:
        return param.dtype
    return weight.dtype if weight is not None else torch.float32


def make_delta(config: GloraConfig, base_layer: nn.Module, name: str) -> GloraDelta:
    """Build and initialise the GLoRA delta of ``base_layer`` (module ``name``)."""
    delta = GloraDelta(base_layer.in_features, base_layer.out_features, config, base_layer.bias is not None)

    def init(delta: GloraDelta) -> None:
        for part in delta._parts():
            part.init(random=not config.init_weights)

    return place_delta(delta, base_layer.weight, init)


METHOD = LayerMethod(
    config_class=GloraConfig,
    make_delta=make_delta,
    layer_types=(nn.Linear,),
)
