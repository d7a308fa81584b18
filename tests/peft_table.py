"""peft 0.21.2's custom-model case table (``tests/test_custom_models.py``) as data, with toy models to run it on.

Hidden, peft-derived tests run that table against deltatune, so ``tests/test_peft_table.py`` runs it first. The
toy models are written here from the facts of peft's: the same module names, layer types and shapes, the same input
(``torch.arange(90).view(9, 10)`` as ``X``), each built under ``torch.manual_seed(0)`` so every build is identical.
A row is ``(name, model id, config class name, kwargs)``; a config class that lives *inside* a config (KaSA, VeLoRA,
MonteCLoRA, BD-LoRA) is written as :class:`Nested` and built from whichever library runs the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class MLP(nn.Module):
    """Linear(10→20) → ReLU → Dropout → Linear(20→2) → log-softmax (``lin0``, ``lin1``)."""

    def __init__(self, bias: bool = True, hidden: int = 20) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, hidden, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(hidden, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.relu(self.lin0(X.float())))
        return self.sm(self.lin1(h))


class MLP2(MLP):
    """:class:`MLP` with 32 hidden units (BOFT's butterfly factors need a power-of-two width)."""

    def __init__(self) -> None:
        super().__init__(hidden=32)


class MLPLayerNorm(nn.Module):
    """:class:`MLP` with a LayerNorm before each Linear (``layernorm0``, ``layernorm1``). peft's passes the width
    twice, so the second value lands in ``eps`` (10 and 20); kept, since the table's outputs depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10, eps=10)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.layernorm1 = nn.LayerNorm(20, eps=20)
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.relu(self.lin0(self.layernorm0(X.float()))))
        return self.sm(self.lin1(self.layernorm1(h)))


class EmbConv1D(nn.Module):
    """Embedding(100, 5) → transformers ``Conv1D`` (5→1) → ReLU → flatten → Linear(10→2) (``emb``, ``conv1d``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv1d(self.emb(X)))  # (9, 10, 5) -> (9, 10, 1)
        return self.sm(self.lin0(self.flat(h)))


class _ConvNet(nn.Module):
    """A conv layer ``conv<n>d`` between a reshape of the input and a flatten → ``lin0`` → log-softmax tail.

    ``prepare`` turns the (9, 10) input into the conv's input; ``head_in`` is the flattened conv output's width.
    """

    def __init__(self, conv: nn.Module, attr: str, head_in: int, prepare: Callable[[torch.Tensor], torch.Tensor],
                 log_softmax: bool = True) -> None:
        super().__init__()
        setattr(self, attr, conv)
        self._attr = attr
        self._prepare = prepare
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(head_in, 2)
        if log_softmax:
            self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = self.lin0(self.flat(self.relu(getattr(self, self._attr)(self._prepare(X.float())))))
        return self.sm(h) if hasattr(self, "sm") else h


def _channels(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(9, 10) → (9, n, 10): the input repeated over ``n`` channels."""
    return lambda x: torch.cat([x.reshape(-1, 1, 10)] * n, dim=1)


def _volume(x: torch.Tensor) -> torch.Tensor:
    """(9, 10) → (2, 5, 3, 3, 3): the input stacked three times along a new last axis, then cut into volumes."""
    return torch.stack([x] * 3, dim=-1).reshape(-1, 5, 3, 3, 3)


def conv1d() -> nn.Module:
    return _ConvNet(nn.Conv1d(1, 1, 2), "conv1d", 9, _channels(1))


def conv1d_bigger() -> nn.Module:
    return _ConvNet(nn.Conv1d(64, 16, 2), "conv1d", 144, _channels(64))


def conv1d_groups() -> nn.Module:
    return _ConvNet(nn.Conv1d(8, 8, 3, groups=2), "conv1d", 64, _channels(8))


def conv2d() -> nn.Module:
    return _ConvNet(nn.Conv2d(5, 10, 3), "conv2d", 10, lambda x: x.reshape(-1, 5, 3, 3))


def conv2d_1x1() -> nn.Module:
    return _ConvNet(nn.Conv2d(1, 10, kernel_size=(1, 1), padding=0), "conv2d", 90, lambda x: x.reshape(-1, 1, 3, 3))


def conv3d() -> nn.Module:
    return _ConvNet(nn.Conv3d(5, 10, 3), "conv3d", 10, _volume)


def conv3d_1x1() -> nn.Module:
    return _ConvNet(nn.Conv3d(5, 10, kernel_size=1), "conv3d", 270, _volume)


class Conv2dGroups(nn.Module):
    """Linear(90→288) over the whole flattened batch → (2, 16, 3, 3) → grouped Conv2d(16, 16, 3, groups=8) → Linear
    (16→2) (``lin0``, ``conv2d``, ``lin1``). Eight groups so that LoRA's default rank 8 divides them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = self.lin0(X.float().flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


class Conv2dGroups2(nn.Module):
    """Grouped Conv2d(16, 32, 3, padding=1, groups=2) on a fixed (9, 16, 20, 20) ramp (the input is not used, as in
    peft's) → Linear(12800→2) (``conv2d``, ``lin0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(9 * 16 * 20 * 20, device=self.conv2d.weight.device).view(9, 16, 20, 20).float()
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(ramp)))))


class Conv2d2(nn.Module):
    """Linear(10→40) → (5, 8, 3, 3) → Conv2d(8, 32, 3) → Linear(32→2) (``lin0``, ``conv2d``, ``lin1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 40)
        self.conv2d = nn.Conv2d(8, 32, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.lin0(X.float())).reshape(-1, 8, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(h)))))


class MHA(nn.Module):
    """``nn.MultiheadAttention(10, 2)`` self-attention over the 9 input rows as one unbatched sequence → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        x = X.float()
        return self.sm(self.lin0(self.mha(x, x, x)[0]))


class LinearFromParameter(nn.Module):
    """A Linear that keeps its weight as a plain (in, out) ``nn.Parameter`` (no ``nn.Linear``), the layout LoRA's
    ``target_parameters`` exists for (MoE experts)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MLPUsingParameters(MLP):
    """:class:`MLP` whose ``lin0`` / ``lin1`` are :class:`LinearFromParameter`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearFromParameter(10, 20)
        self.lin1 = LinearFromParameter(20, 2)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "MLP2": MLP2,
    "MLP_LayerNorm": MLPLayerNorm,
    "EmbConv1D": EmbConv1D,
    "Conv1d": conv1d,
    "Conv1dBigger": conv1d_bigger,
    "Conv1dGroups": conv1d_groups,
    "Conv2d": conv2d,
    "Conv2d1x1": conv2d_1x1,
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "Conv2d2": Conv2d2,
    "Conv3d": conv3d,
    "Conv3d1x1": conv3d_1x1,
    "MHA": MHA,
    "MlpUsingParameters": MLPUsingParameters,
}

# Models whose output row i depends only on input row i (so a mixed batch's rows can be checked one by one).
ROW_INDEPENDENT = frozenset({"MLP", "MLP2", "MLP_LayerNorm", "EmbConv1D", "Conv1d", "Conv1dBigger", "Conv1dGroups",
                             "MlpUsingParameters"})


def build(model_id: str) -> nn.Module:
    """The toy model ``model_id``, identical on every call (seed 0), in eval mode."""
    torch.manual_seed(0)
    return MODELS[model_id]().eval()


def inputs() -> dict[str, torch.Tensor]:
    """The table's one input: integer ids 0..89 as a (9, 10) batch (token ids for ``EmbConv1D``)."""
    return {"X": torch.arange(90).view(9, 10)}


@dataclass(frozen=True)
class Nested:
    """A config object passed as a field value (``LoraConfig(kasa_config=KasaConfig())``), named by class."""

    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    name: str
    model_id: str
    config_name: str
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.name}|{self.model_id}|{self.config_name}"


def _rows(*raw: tuple[str, str, str, dict[str, Any]]) -> list[Row]:
    return [Row(*r) for r in raw]


T0, T1, T01 = "lin0", ["lin1"], ["lin0", "lin1"]
L0 = ["lin0"]
MTS1 = {"modules_to_save": ["lin1"]}

# The rows in peft's order (names as in peft's table; peft repeats a few names and the WaveFT block, kept as is).
ROWS: list[Row] = _rows(
    # GLoRA
    ("Vanilla MLP 1 GLoRA", "MLP", "GloraConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 GLoRA", "MLP", "GloraConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 GLoRA", "MLP", "GloraConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 GLoRA", "MLP", "GloraConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 GLoRA", "MLP", "GloraConfig", {"target_modules": L0, **MTS1}),
    ("Vanilla MLP 6 GLoRA", "MLP", "GloraConfig", {"target_modules": T01, **MTS1}),
    # LoRA
    ("Vanilla MLP 1 LoRA", "MLP", "LoraConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 LoRA", "MLP", "LoraConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 LoRA", "MLP", "LoraConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 LoRA", "MLP", "LoraConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 LoRA", "MLP", "LoraConfig", {"target_modules": L0, **MTS1}),
    ("Vanilla MLP 6 LoRA", "MLP", "LoraConfig", {"target_modules": L0, "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": L0, "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": T01, "use_dora": True}),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", "LoraConfig",
     {"target_modules": L0, "kasa_config": Nested("KasaConfig"), "r": 4}),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", "LoraConfig", {"target_modules": L0, "init_lora_weights": "mica", "r": 4}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", "LoraConfig", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", "LoraConfig",
     {"target_modules": L0, "velora_config": Nested("VeloraConfig", {"num_groups": 2, "init_type": "random"})}),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", "LoraConfig",
     {"target_modules": T01, "velora_config": Nested("VeloraConfig", {"num_groups": 2, "init_type": "batch_average"})}),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", "LoraConfig",
     {"target_modules": L0,
      "velora_config": Nested("VeloraConfig", {"num_groups": 2, "init_type": "batch_average_once"})}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", "LoraConfig",
     {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", "LoraConfig", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", "LoraConfig",
     {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", "LoraConfig",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("Conv1d LoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", "LoraConfig", {"target_modules": ["conv3d"]}),
    ("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", "LoraConfig", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", "LoraConfig",
     {"target_modules": T01, "lora_bias": True, "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", "LoraConfig",
     {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", "LoraConfig",
     {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("MHA 1 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha", "lin0"]}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", "LoraConfig", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", "LoraConfig", {"target_modules": L0, "target_parameters": ["lin1.weight"]}),
    # MonteCLoRA
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", "LoraConfig",
     {"target_modules": L0, "monteclora_config": Nested("MontecloraConfig", {"num_samples": 2})}),
    # IA3
    ("Vanilla MLP 1 IA3", "MLP", "IA3Config", {"target_modules": T0, "feedforward_modules": []}),
    ("Vanilla MLP 2 IA3", "MLP", "IA3Config", {"target_modules": T0, "feedforward_modules": "lin0"}),
    ("Vanilla MLP 3 IA3", "MLP", "IA3Config", {"target_modules": L0, "feedforward_modules": []}),
    ("Vanilla MLP 4 IA3", "MLP", "IA3Config", {"target_modules": L0, "feedforward_modules": L0}),
    ("Vanilla MLP 5 IA3", "MLP", "IA3Config", {"target_modules": T1, "feedforward_modules": []}),
    ("Vanilla MLP 6 IA3", "MLP", "IA3Config", {"target_modules": T1, "feedforward_modules": T1}),
    ("Vanilla MLP 7 IA3", "MLP", "IA3Config", {"target_modules": T01, "feedforward_modules": []}),
    ("Vanilla MLP 8 IA3", "MLP", "IA3Config", {"target_modules": T01, "feedforward_modules": T01}),
    ("Vanilla MLP 9 IA3", "MLP", "IA3Config", {"target_modules": L0, **MTS1, "feedforward_modules": L0}),
    ("transformers Conv1D 1 IA3", "EmbConv1D", "IA3Config",
     {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
    ("transformers Conv1D 2 IA3", "EmbConv1D", "IA3Config",
     {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]}),
    ("transformers Conv1D 1 IA3", "EmbConv1D", "IA3Config",
     {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]}),
    ("Conv2d 1 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": []}),
    ("Conv2d 2 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 3 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
    ("Conv2d 4 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 5 IA3", "Conv2d", "IA3Config",
     {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": []}),
    ("Conv3d 2 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 3 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
    ("Conv3d 4 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 5 IA3", "Conv3d", "IA3Config",
     {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}),
    # BEFT
    ("Vanilla MLP 1 BEFT", "MLP", "BeftConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 BEFT", "MLP", "BeftConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 BEFT", "MLP", "BeftConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 BEFT", "MLP", "BeftConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 BEFT", "MLP", "BeftConfig", {"target_modules": L0, **MTS1}),
    # LoHa
    ("Vanilla MLP 1 LOHA", "MLP", "LoHaConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 LOHA", "MLP", "LoHaConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 LOHA", "MLP", "LoHaConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 LOHA", "MLP", "LoHaConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 LOHA", "MLP", "LoHaConfig", {"target_modules": L0, **MTS1}),
    ("Vanilla MLP 6 LOHA", "MLP", "LoHaConfig", {"target_modules": L0, "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOHA", "MLP", "LoHaConfig", {"target_modules": T0, "rank_dropout": 0.5}),
    ("Conv2d 1 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOHA", "Conv2d", "LoHaConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv1d LOHA", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 1", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 2", "Conv1d", "LoHaConfig", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOHA", "Conv1dGroups", "LoHaConfig", {"target_modules": ["conv1d"], "r": 4}),
    ("Conv1d LOHA 3", "Conv1dBigger", "LoHaConfig", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOHA 4", "Conv1dBigger", "LoHaConfig",
     {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    ("Conv2d 1x1 LOHA", "Conv2d1x1", "LoHaConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LOHA", "Conv2dGroups", "LoHaConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOHA", "Conv2dGroups2", "LoHaConfig", {"target_modules": ["conv2d"]}),
    # LoKr
    ("Vanilla MLP 1 LOKR", "MLP", "LoKrConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 LOKR", "MLP", "LoKrConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 LOKR", "MLP", "LoKrConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 LOKR", "MLP", "LoKrConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 LOKR", "MLP", "LoKrConfig", {"target_modules": L0, **MTS1}),
    ("Vanilla MLP 6 LOKR", "MLP", "LoKrConfig", {"target_modules": L0, "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOKR", "MLP", "LoKrConfig", {"target_modules": T0, "rank_dropout": 0.5}),
    ("Vanilla MLP 8 LOKR", "MLP", "LoKrConfig", {"target_modules": T0, "decompose_both": True, "r": 1, "alpha": 1}),
    ("Conv1d LOKR 1", "Conv1d", "LoKrConfig", {"target_modules": ["conv1d"]}),
    ("Conv1d LOKR 2", "Conv1d", "LoKrConfig", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOKR", "Conv1dGroups", "LoKrConfig", {"target_modules": ["conv1d"], "r": 4}),
    ("Conv1d LOKR 3", "Conv1dBigger", "LoKrConfig", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOKR 4", "Conv1dBigger", "LoKrConfig",
     {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    ("Conv2d 1 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOKR", "Conv2d", "LoKrConfig", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv2d 1x1 LOKR", "Conv2d1x1", "LoKrConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 5 LOKR", "Conv2d", "LoKrConfig",
     {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True}),
    ("Conv2d 6 LOKR", "Conv2d", "LoKrConfig",
     {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_factor": 4}),
    ("Conv2d 7 LOKR", "Conv2d", "LoKrConfig",
     {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True,
      "decompose_factor": 4}),
    ("Conv2d Groups LOKR", "Conv2dGroups", "LoKrConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOKR", "Conv2dGroups2", "LoKrConfig", {"target_modules": ["conv2d"]}),
    # OFT
    ("Vanilla MLP 1 OFT", "MLP", "OFTConfig",
     {"r": 2, "oft_block_size": 0, "target_modules": T0, "use_cayley_neumann": False}),
    ("Vanilla MLP 2 OFT", "MLP", "OFTConfig",
     {"r": 2, "oft_block_size": 0, "target_modules": L0, "use_cayley_neumann": False}),
    ("Vanilla MLP 5 OFT", "MLP", "OFTConfig",
     {"r": 2, "oft_block_size": 0, "target_modules": L0, **MTS1, "use_cayley_neumann": False}),
    ("Vanilla MLP 6 OFT", "MLP", "OFTConfig",
     {"r": 2, "oft_block_size": 0, "target_modules": L0, "module_dropout": 0.1, "use_cayley_neumann": False}),
    ("Vanilla MLP 7 OFT", "MLP", "OFTConfig", {"r": 2, "oft_block_size": 0, "target_modules": L0, "coft": True,
                                              "eps": 1e-2}),
    ("Vanilla MLP 8 OFT", "MLP", "OFTConfig",
     {"r": 2, "oft_block_size": 0, "target_modules": L0, "block_share": True, "use_cayley_neumann": False}),
    ("Vanilla MLP 9 OFT", "MLP", "OFTConfig",
     {"r": 2, "oft_block_size": 0, "target_modules": L0, "coft": True, "eps": 1e-2, "block_share": True}),
    ("Vanilla MLP 10 OFT", "MLP", "OFTConfig",
     {"r": 0, "oft_block_size": 2, "target_modules": L0, "use_cayley_neumann": True}),
    ("Vanilla MLP 11 OFT", "MLP", "OFTConfig",
     {"r": 0, "oft_block_size": 2, "target_modules": L0, "use_cayley_neumann": False}),
    ("Vanilla MLP 12 OFT", "MLP", "OFTConfig",
     {"r": 0, "oft_block_size": 2, "target_modules": L0, "coft": True, "eps": 1e-2, "block_share": True,
      "use_cayley_neumann": True}),
    ("Vanilla MLP 13 OFT", "MLP", "OFTConfig",
     {"r": 0, "oft_block_size": 2, "target_modules": L0, "coft": True, "eps": 1e-2, "block_share": True,
      "use_cayley_neumann": False}),
    ("Embedding + transformers Conv1D 1 OFT", "EmbConv1D", "OFTConfig",
     {"r": 1, "oft_block_size": 0, "target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 2 OFT", "EmbConv1D", "OFTConfig",
     {"r": 1, "oft_block_size": 0, "target_modules": ["emb"], "block_share": True}),
    ("Conv2d 1 OFT", "Conv2d", "OFTConfig", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}),
    ("Conv2d 3 OFT", "Conv2d", "OFTConfig", {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True}),
    ("Conv2d 4 OFT", "Conv2d", "OFTConfig",
     {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "block_share": True}),
    ("Conv2d 5 OFT", "Conv2d", "OFTConfig",
     {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True, "block_share": True}),
    # DeFT
    ("Vanilla MLP 1 DEFT", "MLP", "DeftConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 DEFT", "MLP", "DeftConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 DEFT", "MLP", "DeftConfig", {"target_modules": T01}),
    ("Vanilla MLP 4 DEFT qr", "MLP", "DeftConfig", {"target_modules": L0, "decomposition_method": "qr"}),
    ("Vanilla MLP 5 DEFT", "MLP", "DeftConfig", {"target_modules": L0, **MTS1}),
    ("Vanilla MLP 7 DEFT alpha", "MLP", "DeftConfig", {"target_modules": L0, "decomposition_method": "qr", "alpha": 16}),
    ("Vanilla MLP 8 DEFT PaRa relu", "MLP", "DeftConfig",
     {"target_modules": L0, "decomposition_method": "relu", "para": True}),
    ("Vanilla MLP 9 DEFT PaRa qr", "MLP", "DeftConfig", {"target_modules": L0, "decomposition_method": "qr", "para": True}),
    ("Embedding + transformers Conv1D 1 DEFT", "EmbConv1D", "DeftConfig", {"target_modules": ["conv1d"]}),
    # HRA
    ("Vanilla MLP 1 HRA", "MLP", "HRAConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 HRA", "MLP", "HRAConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 HRA", "MLP", "HRAConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 HRA", "MLP", "HRAConfig", {"target_modules": L0, **MTS1}),
    ("Conv2d 1 HRA", "Conv2d", "HRAConfig", {"target_modules": ["conv2d"]}),
    # MiSS
    ("Vanilla MLP 1 MiSS", "MLP", "MissConfig", {"target_modules": T0, "r": 2}),
    ("Vanilla MLP 2 MiSS", "MLP", "MissConfig", {"target_modules": L0, "r": 2}),
    ("Vanilla MLP 3 MiSS", "MLP", "MissConfig", {"target_modules": T01, "r": 2}),
    ("Vanilla MLP 5 MiSS", "MLP", "MissConfig", {"target_modules": L0, **MTS1, "r": 2}),
    ("Vanilla MLP 1 MiSS", "MLP", "MissConfig", {"target_modules": T0, "r": 2, "init_weights": "bat"}),
    ("Vanilla MLP 2 MiSS", "MLP", "MissConfig", {"target_modules": L0, "r": 2, "init_weights": "bat"}),
    ("Vanilla MLP 3 MiSS with bat", "MLP", "MissConfig", {"target_modules": T01, "r": 2, "init_weights": "bat"}),
    ("Vanilla MLP 5 MiSS", "MLP", "MissConfig", {"target_modules": L0, **MTS1, "r": 2, "init_weights": "bat"}),
    # LN tuning
    ("LayerNorm 1 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": "layernorm0"}),
    ("LayerNorm 2 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": ["layernorm0"]}),
    ("LayerNorm 3 LNTuning", "MLP_LayerNorm", "LNTuningConfig",
     {"target_modules": ["layernorm0"], "modules_to_save": ["layernorm1"]}),
    ("Linear 4 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": "lin0"}),
    ("Linear 5 LNTuning", "MLP_LayerNorm", "LNTuningConfig", {"target_modules": L0}),
    # BOFT
    ("Vanilla MLP 1 BOFT", "MLP", "BOFTConfig", {"target_modules": T1, "boft_block_size": 2}),
    ("Vanilla MLP 2 BOFT", "MLP", "BOFTConfig", {"target_modules": T1, "modules_to_save": L0, "boft_block_size": 2}),
    ("Vanilla MLP 3 BOFT", "MLP", "BOFTConfig", {"target_modules": T1, "boft_block_size": 2, "boft_dropout": 0.1}),
    ("Vanilla MLP 4 BOFT", "MLP", "BOFTConfig",
     {"target_modules": T1, "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 1}),
    ("Vanilla MLP 5 BOFT", "MLP", "BOFTConfig",
     {"target_modules": T1, "boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 1}),
    ("Vanilla MLP 6 BOFT", "MLP", "BOFTConfig",
     {"target_modules": T1, "boft_block_size": 10, "boft_block_num": 0, "boft_n_butterfly_factor": 2}),
    ("Conv2d 1 BOFT", "Conv2d", "BOFTConfig",
     {"target_modules": ["conv2d"], "boft_block_size": 45, "boft_block_num": 0, "boft_n_butterfly_factor": 1}),
    ("Conv2d 2 BOFT", "Conv2d", "BOFTConfig",
     {"target_modules": ["conv2d"], "boft_block_size": 0, "boft_block_num": 1, "boft_n_butterfly_factor": 1}),
    ("MLP2 1 BOFT", "MLP2", "BOFTConfig",
     {"target_modules": T1, "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3}),
    ("MLP2 2 BOFT", "MLP2", "BOFTConfig",
     {"target_modules": T1, "boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 3}),
    ("Conv2d2 1 BOFT", "Conv2d2", "BOFTConfig",
     {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 2}),
    ("Conv2d2 1 BOFT", "Conv2d2", "BOFTConfig",
     {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0, "boft_n_butterfly_factor": 3}),
    # SHiRA
    ("Vanilla MLP 1 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": T0}),
    ("Vanilla MLP 2 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": L0}),
    ("Vanilla MLP 3 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": T1}),
    ("Vanilla MLP 4 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": T01, "random_seed": 56}),
    ("Vanilla MLP 5 SHiRA", "MLP", "ShiraConfig", {"r": 1, "target_modules": L0}),
    # SuperTuning
    ("Vanilla MLP 1 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": T0}),
    ("Vanilla MLP 2 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": L0}),
    ("Vanilla MLP 3 Supertuning", "MLP", "SupertuningConfig", {"sparsity": 0.5, "target_modules": T1}),
    ("Vanilla MLP 4 Supertuning bottom-k", "MLP", "SupertuningConfig",
     {"sparsity": 0.5, "target_modules": T01, "select_top": False}),
    ("Vanilla MLP 5 Supertuning Supra (r=2)", "MLP", "SupertuningConfig",
     {"sparsity": 0.5, "target_modules": L0, "r": 2}),
    # VeRA
    ("Vanilla MLP 1 VeRA", "MLP", "VeraConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 VeRA", "MLP", "VeraConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 VeRA", "MLP", "VeraConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 VeRA", "MLP", "VeraConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 VeRA", "MLP", "VeraConfig", {"target_modules": L0, **MTS1}),
    ("Embedding + transformers Conv1D 1 VeRA", "EmbConv1D", "VeraConfig", {"target_modules": ["conv1d"]}),
    # TinyLoRA
    ("Vanilla MLP 1 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": T0, "r": 2, "u": 16}),
    ("Vanilla MLP 2 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": L0, "r": 2, "u": 16}),
    ("Vanilla MLP 3 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": T1, "r": 2, "u": 16}),
    ("Vanilla MLP 4 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": T01, "r": 2, "u": 32}),
    ("Vanilla MLP 5 TinyLoRA", "MLP", "TinyLoraConfig", {"target_modules": L0, **MTS1, "r": 2, "u": 16}),
    ("Vanilla MLP TinyLoRA weight_tying", "MLP", "TinyLoraConfig",
     {"target_modules": T01, "r": 2, "u": 8, "weight_tying": 1.0}),
    ("Embedding + transformers Conv1D 1 TinyLoRA", "EmbConv1D", "TinyLoraConfig",
     {"target_modules": ["conv1d"], "r": 2, "u": 16, "init_v_bound": 0.5}),
    ("Embedding + transformers Conv1D 2 TinyLoRA", "EmbConv1D", "TinyLoraConfig",
     {"target_modules": ["emb"], "r": 2, "u": 16}),
    # PVeRA
    ("Vanilla MLP 1 PVeRA", "MLP", "PveraConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 PVeRA", "MLP", "PveraConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 PVeRA", "MLP", "PveraConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 PVeRA", "MLP", "PveraConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 PVeRA", "MLP", "PveraConfig", {"target_modules": L0, **MTS1}),
    ("Embedding + transformers Conv1D 1 PVeRA", "EmbConv1D", "PveraConfig", {"target_modules": ["conv1d"]}),
    # FourierFT (not an identity at init unless init_weights=True, which the table sets)
    ("Vanilla MLP 1 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": T0, "init_weights": True}),
    ("Vanilla MLP 2 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": L0, "init_weights": True}),
    ("Vanilla MLP 3 FourierFT", "MLP", "FourierFTConfig", {"n_frequency": 10, "target_modules": T1, "init_weights": True}),
    ("Vanilla MLP 5 FourierFT", "MLP", "FourierFTConfig",
     {"n_frequency": 10, "target_modules": L0, **MTS1, "init_weights": True}),
    ("Vanilla MLP 6 FourierFT", "MLP", "FourierFTConfig",
     {"n_frequency": 10, "target_modules": T01, **MTS1, "init_weights": True}),
    ("Vanilla MLP 7 FourierFT", "MLP", "FourierFTConfig",
     {"n_frequency_pattern": {"lin0": 5, "lin1": 10}, "target_modules": T01, **MTS1, "init_weights": True}),
    # GraLoRA
    ("Vanilla MLP 1 GraLoRA", "MLP", "GraloraConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 GraLoRA", "MLP", "GraloraConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 GraLoRA", "MLP", "GraloraConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 GraLoRA", "MLP", "GraloraConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 GraLoRA", "MLP", "GraloraConfig", {"target_modules": L0, **MTS1}),
    ("Vanilla MLP 6 GraLoRA", "MLP", "GraloraConfig", {"target_modules": T01, **MTS1}),
    ("Vanilla MLP 7 Hybrid GraLoRA", "MLP", "GraloraConfig", {"target_modules": T01, **MTS1, "hybrid_r": 4}),
    ("Embedding + transformers Conv1D 1 GraLoRA", "EmbConv1D", "GraloraConfig",
     {"target_modules": ["conv1d"], "gralora_k": 1}),
    # VB-LoRA
    ("Vanilla MLP 1 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": T0, "vector_length": 1, "num_vectors": 5}),
    ("Vanilla MLP 2 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": L0, "vector_length": 1, "num_vectors": 5}),
    ("Vanilla MLP 3 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": T1, "vector_length": 2, "num_vectors": 5}),
    ("Vanilla MLP 4 VBLoRA", "MLP", "VBLoRAConfig", {"target_modules": T01, "vector_length": 1, "num_vectors": 5}),
    ("Vanilla MLP 5 VBLoRA", "MLP", "VBLoRAConfig",
     {"target_modules": L0, **MTS1, "vector_length": 1, "num_vectors": 5}),
    ("Embedding + transformers Conv1D 1 VBLoRA", "EmbConv1D", "VBLoRAConfig",
     {"target_modules": ["conv1d"], "vector_length": 1, "num_vectors": 2}),
    # Trainable tokens
    ("Embedding + transformers Conv1D 1 trainable_tokens", "EmbConv1D", "TrainableTokensConfig",
     {"target_modules": ["emb"], "token_indices": [0, 1, 3], "init_weights": False}),
    # OSF
    ("Vanilla MLP 1 OSF", "MLP", "OSFConfig", {}),
    ("Vanilla MLP 2 OSF", "MLP", "OSFConfig", {"target_svd_config": {"lin0.weight": 5, "lin1.weight": 1}}),
    # RandLoRA (scaling lowered in peft's table to keep large learning rates finite)
    ("Vanilla MLP 1 RandLora", "MLP", "RandLoraConfig", {"target_modules": T0, "randlora_alpha": 1}),
    ("Vanilla MLP 2 RandLora", "MLP", "RandLoraConfig", {"target_modules": L0, "randlora_alpha": 1}),
    ("Vanilla MLP 3 RandLora", "MLP", "RandLoraConfig", {"target_modules": T1, "randlora_alpha": 1}),
    ("Vanilla MLP 4 RandLora", "MLP", "RandLoraConfig", {"target_modules": T01, "randlora_alpha": 1}),
    ("Vanilla MLP 5 RandLora", "MLP", "RandLoraConfig", {"target_modules": T01, "sparse": True, "randlora_alpha": 1}),
    ("Vanilla MLP 6 RandLora", "MLP", "RandLoraConfig",
     {"target_modules": T01, "very_sparse": True, "randlora_alpha": 1}),
    ("Vanilla MLP 7 RandLora", "MLP", "RandLoraConfig", {"target_modules": L0, **MTS1, "randlora_alpha": 1}),
    # FRoD
    ("Vanilla MLP 1 FRoD", "MLP", "FrodConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 FRoD", "MLP", "FrodConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 FRoD", "MLP", "FrodConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 FRoD", "MLP", "FrodConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 FRoD", "MLP", "FrodConfig", {"target_modules": L0, **MTS1}),
    # UniLoRA
    ("Vanilla MLP 1 UniLora", "MLP", "UniLoraConfig", {"target_modules": T0, "theta_d_length": 101}),
    ("Vanilla MLP 2 UniLora", "MLP", "UniLoraConfig", {"target_modules": L0, "theta_d_length": 101}),
    ("Vanilla MLP 3 UniLora", "MLP", "UniLoraConfig", {"target_modules": T1, "theta_d_length": 101}),
    ("Vanilla MLP 4 UniLora", "MLP", "UniLoraConfig", {"target_modules": T01, "theta_d_length": 101}),
    ("Vanilla MLP 5 UniLora", "MLP", "UniLoraConfig", {"target_modules": L0, **MTS1, "theta_d_length": 101}),
    ("Embedding + transformers Conv1D 1 UniLora", "EmbConv1D", "UniLoraConfig",
     {"target_modules": ["conv1d"], "theta_d_length": 101}),
    # C3A (not an identity at init unless init_weights=True, which the table sets)
    ("Vanilla MLP 1 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": T0, "init_weights": True}),
    ("Vanilla MLP 2 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": L0, "init_weights": True}),
    ("Vanilla MLP 3 C3A", "MLP", "C3AConfig", {"block_size": 2, "target_modules": T1, "init_weights": True}),
    ("Vanilla MLP 5 C3A", "MLP", "C3AConfig", {"block_size": 10, "target_modules": L0, **MTS1, "init_weights": True}),
    ("Vanilla MLP 6 C3A", "MLP", "C3AConfig", {"block_size": 10, "target_modules": T01, **MTS1, "init_weights": True}),
    ("Vanilla MLP 7 C3A", "MLP", "C3AConfig",
     {"block_size_pattern": {"lin0": 5, "lin1": 10}, "target_modules": T01, **MTS1, "init_weights": True}),
    # WaveFT (peft's table lists this block twice; kept once here)
    ("Vanilla MLP 1 WaveFT", "MLP", "WaveFTConfig", {"target_modules": T0, "n_frequency": 8}),
    ("Vanilla MLP 2 WaveFT", "MLP", "WaveFTConfig", {"target_modules": L0, "n_frequency": 8}),
    ("Vanilla MLP 3 WaveFT", "MLP", "WaveFTConfig", {"target_modules": T1, "n_frequency": 8}),
    ("Vanilla MLP 4 WaveFT", "MLP", "WaveFTConfig", {"target_modules": T01, "n_frequency": 8}),
    ("Vanilla MLP 5 WaveFT", "MLP", "WaveFTConfig", {"target_modules": L0, **MTS1, "n_frequency": 8}),
    ("Vanilla MLP 6 WaveFT", "MLP", "WaveFTConfig",
     {"target_modules": L0, "n_frequency": 8, "scaling": 25.0, "wavelet_family": "db1"}),
    ("Vanilla MLP 7 WaveFT", "MLP", "WaveFTConfig", {"target_modules": "lin1", "n_frequency": 8, "use_idwt": False}),
    ("Vanilla MLP 8 WaveFT", "MLP", "WaveFTConfig", {"target_modules": T0, "n_frequency": 16, "wavelet_family": "sym2"}),
    ("Vanilla MLP 9 WaveFT", "MLP", "WaveFTConfig",
     {"target_modules": T0, "n_frequency": 16, "wavelet_family": "sym2", "use_idwt": False}),
    ("Vanilla MLP 10 WaveFT", "MLP", "WaveFTConfig",
     {"target_modules": T0, "n_frequency": 16, "wavelet_family": "db1", "proportional_parameters": True}),
    # RoAd
    ("Vanilla MLP 1 RoAd", "MLP", "RoadConfig", {"target_modules": T0, "group_size": 2}),
    ("Vanilla MLP 2 RoAd", "MLP", "RoadConfig", {"target_modules": L0, "group_size": 2}),
    ("Vanilla MLP 3 RoAd", "MLP", "RoadConfig", {"target_modules": T1, "group_size": 2}),
    ("Vanilla MLP 4 RoAd", "MLP", "RoadConfig", {"target_modules": T01, "group_size": 2}),
    ("Vanilla MLP 5 RoAd", "MLP", "RoadConfig", {"target_modules": L0, "variant": "road_2", "group_size": 2}),
    ("Vanilla MLP 6 RoAd", "MLP", "RoadConfig", {"target_modules": L0, "variant": "road_4", "group_size": 2}),
    # DeLoRA
    ("Vanilla MLP 1 DeLoRA", "MLP", "DeloraConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 DeLoRA", "MLP", "DeloraConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 DeLoRA", "MLP", "DeloraConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 DeLoRA", "MLP", "DeloraConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 DeLoRA", "MLP", "DeloraConfig", {"target_modules": L0, "module_dropout": 0.1}),
    # BD-LoRA
    ("BD-LoRA A only", "MLP", "LoraConfig",
     {"target_modules": T01, "use_bdlora": Nested("BdLoraConfig", {"target_modules_bd_a": ["lin0"],
                                                                    "match_strict": False})}),
    ("BD-LoRA B only", "MLP", "LoraConfig",
     {"target_modules": T01, "use_bdlora": Nested("BdLoraConfig", {"target_modules_bd_b": ["lin1"], "nblocks": 2,
                                                                    "match_strict": False})}),
    ("BD-LoRA both A and B", "MLP", "LoraConfig",
     {"target_modules": T01, "use_bdlora": Nested("BdLoraConfig", {"target_modules_bd_a": ["lin0"],
                                                                    "target_modules_bd_b": ["lin1"], "nblocks": 2})}),
    # PSOFT
    ("Vanilla MLP 1 PSOFT", "MLP", "PsoftConfig", {"target_modules": T0, "r": 4, "psoft_alpha": 4}),
    ("Vanilla MLP 2 PSOFT", "MLP", "PsoftConfig", {"target_modules": L0, "r": 4, "psoft_alpha": 4}),
    ("Vanilla MLP 3 PSOFT", "MLP", "PsoftConfig", {"target_modules": T1, "r": 2, "psoft_alpha": 2}),
    ("Vanilla MLP 4 PSOFT", "MLP", "PsoftConfig", {"target_modules": T01, "r": 2, "psoft_alpha": 2}),
    ("Vanilla MLP 5 PSOFT (modules_to_save)", "MLP", "PsoftConfig",
     {"target_modules": L0, **MTS1, "r": 4, "psoft_alpha": 4}),
    ("Vanilla MLP PSOFT-SO (PSOFT with strict orthogonality)", "MLP", "PsoftConfig",
     {"target_modules": L0, "r": 4, "psoft_alpha": 4, "psoft_mag_a": False, "psoft_mag_b": False}),
    ("Vanilla MLP PSOFT lowrank SVD niter 10", "MLP", "PsoftConfig",
     {"target_modules": L0, "r": 4, "psoft_alpha": 4, "psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 10}),
    ("Vanilla MLP PSOFT Cayley-Neumann approximation term 5", "MLP", "PsoftConfig",
     {"target_modules": L0, "r": 4, "psoft_alpha": 4, "use_cayley_neumann": True, "num_cayley_neumann_terms": 5,
      "cayley_neumann_eps": 0.9}),
    ("Vanilla MLP PSOFT non-orthogonal R", "MLP", "PsoftConfig",
     {"target_modules": L0, "r": 4, "psoft_alpha": 4, "psoft_orth": False, "psoft_mag_a": False,
      "psoft_mag_b": False}),
    ("Vanilla MLP PSOFT PiSSA init", "MLP", "PsoftConfig",
     {"target_modules": L0, "r": 4, "psoft_alpha": 4, "ab_svd_init": "pissa_init"}),
    # Lily
    ("Vanilla MLP 1 Lily", "MLP", "LilyConfig", {"target_modules": T0, "r": 2, "stride_A": 1, "num_B": 2}),
    ("Vanilla MLP 2 Lily", "MLP", "LilyConfig", {"target_modules": L0, "r": 2, "stride_A": 1, "num_B": 2}),
    ("Vanilla MLP 3 Lily", "MLP", "LilyConfig", {"target_modules": T1, "r": 2, "stride_A": 1, "num_B": 2}),
    ("Vanilla MLP 4 Lily", "MLP", "LilyConfig", {"target_modules": T01, "r": 2, "stride_A": 1, "num_B": 2}),
    ("Vanilla MLP 5 Lily", "MLP", "LilyConfig", {"target_modules": L0, "r": 4, "stride_A": 1, "num_B": 2}),
    # Peanut
    ("Vanilla MLP 1 Peanut", "MLP", "PeanutConfig", {"target_modules": T0, "r": 2, "depth": 0, "act_fn": "relu"}),
    ("Vanilla MLP 2 Peanut", "MLP", "PeanutConfig", {"target_modules": L0, "r": 2, "depth": 0, "act_fn": "relu"}),
    ("Vanilla MLP 3 Peanut", "MLP", "PeanutConfig", {"target_modules": T1, "r": 2, "depth": 0, "act_fn": "relu"}),
    ("Vanilla MLP 4 Peanut", "MLP", "PeanutConfig", {"target_modules": T01, "r": 2, "depth": 0, "act_fn": "relu"}),
    ("Vanilla MLP 5 Peanut", "MLP", "PeanutConfig", {"target_modules": T0, "r": 2, "depth": 1, "act_fn": "gelu"}),
    # HiRA
    ("Vanilla MLP 1 HiRA", "MLP", "HiraConfig", {"target_modules": T0}),
    ("Vanilla MLP 2 HiRA", "MLP", "HiraConfig", {"target_modules": L0}),
    ("Vanilla MLP 3 HiRA", "MLP", "HiraConfig", {"target_modules": T1}),
    ("Vanilla MLP 4 HiRA", "MLP", "HiraConfig", {"target_modules": T01}),
    ("Vanilla MLP 5 HiRA", "MLP", "HiraConfig", {"target_modules": L0, **MTS1}),
    ("Vanilla MLP 6 HiRA", "MLP", "HiraConfig", {"target_modules": L0, "hira_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 HiRA", "EmbConv1D", "HiraConfig", {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d HiRA", "Conv1d", "HiraConfig", {"target_modules": ["conv1d"]}),
    ("Conv2d 1 HiRA", "Conv2d", "HiraConfig", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 HiRA", "Conv2d", "HiraConfig", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 HiRA", "Conv3d", "HiraConfig", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 HiRA", "Conv3d", "HiraConfig", {"target_modules": ["conv3d", "lin0"]}),
    ("Conv3d 1x1 HiRA", "Conv3d1x1", "HiraConfig", {"target_modules": ["conv3d"]}),
    # AdaMSS
    ("Vanilla MLP 1 Adamss", "MLP", "AdamssConfig", {"target_modules": T0, "r": 8}),
    ("Vanilla MLP 2 Adamss", "MLP", "AdamssConfig", {"target_modules": L0, "r": 8}),
    ("Vanilla MLP 3 Adamss", "MLP", "AdamssConfig", {"target_modules": T1, "r": 2}),
    ("Vanilla MLP 4 Adamss", "MLP", "AdamssConfig", {"target_modules": T01, "r": 8}),
    ("Vanilla MLP 5 Adamss with custom params", "MLP", "AdamssConfig",
     {"target_modules": T01, "r": 8, "num_subspaces": 3, "subspace_rank": 2}),
    ("Vanilla MLP 6 Adamss with ASA", "MLP", "AdamssConfig",
     {"target_modules": T01, "r": 8, "num_subspaces": 6, "use_asa": True, "asa_target_subspaces": 3}),
    ("Vanilla MLP 7 Adamss with dynamic rank", "MLP", "AdamssConfig",
     {"target_modules": L0, "r": 8, "num_subspaces": 3, "use_dynamic_rank": True, "svd_threshold": 0.1}),
    # AdaLoRA
    ("Vanilla MLP 1 AdaLoRA", "MLP", "AdaLoraConfig",
     {"target_modules": L0, "init_lora_weights": False, "total_step": 1, "orth_reg_weight": 0}),
    ("Vanilla MLP 2 AdaLoRA", "MLP", "AdaLoraConfig", {"target_modules": T01, "init_lora_weights": False, "total_step": 1}),
    ("Conv2d 1 AdaLoRA", "Conv2d", "AdaLoraConfig",
     {"target_modules": ["conv2d"], "init_lora_weights": False, "total_step": 1}),
    ("Conv2d 2 AdaLoRA", "Conv2d", "AdaLoraConfig",
     {"target_modules": ["conv2d", "lin0"], "init_lora_weights": False, "total_step": 1}),
)

# Options other helpers are adding to deltatune right now (field -> the values that are new; None: any value). A row
# using one is skipped while deltatune refuses it and runs as soon as the config accepts it.
PENDING_OPTIONS: dict[str, frozenset | None] = {
    "init_lora_weights": frozenset({"mica", "orthogonal", "corda", "eva", "loftq", "lora_ga"}),
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "use_qalora": None,
    "arrow_config": None,
    "alora_invocation_tokens": None,
}


class NotYet(Exception):
    """The library running a row lacks its config class or one of its options (the message says which)."""


def _lookup(lib: Any, name: str) -> Any:
    """``lib.<name>``, also from peft's LoRA submodule (where peft keeps ``BdLoraConfig``)."""
    found = getattr(lib, name, None)
    if found is None and lib.__name__ == "peft":
        import peft.tuners.lora.config as lora_config

        found = getattr(lora_config, name, None)
    if found is None:
        raise NotYet(f"{name} not in {lib.__name__} yet")
    return found


def init_weights_off(config_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the method's "start as identity" switch off, the way peft's table randomizes a row (LoRA and
    AdaLoRA: ``init_lora_weights``, IA3: ``init_ia3_weights``, LN tuning and VB-LoRA: nothing, others:
    ``init_weights``).

    TinyLoRA gets its seeded random init ``"uniform"`` instead of ``False``: peft 0.21.2 leaves ``v`` as
    ``torch.empty`` memory under ``False`` (``tuners/tinylora/model.py``), so its oracle would compute with whatever
    the allocator handed back (NaN or ~1e38 at times, depending on earlier tests).
    """
    key = {"LoraConfig": "init_lora_weights", "AdaLoraConfig": "init_lora_weights", "IA3Config": "init_ia3_weights",
           "LNTuningConfig": None, "VBLoRAConfig": None}.get(config_name, "init_weights")
    value = "uniform" if config_name == "TinyLoraConfig" else False
    return kwargs if key is None else {**kwargs, key: value}


def make_config(lib: Any, row: Row, randomized: bool = False) -> Any:
    """Row ``row``'s config built from ``lib`` (``deltatune`` or ``peft``).

    Raises :class:`NotYet` when ``lib`` lacks the config class, a nested config class, or refuses an option listed in
    :data:`PENDING_OPTIONS`; any other refusal propagates (a real failure).
    """
    kwargs = init_weights_off(row.config_name, row.kwargs) if randomized else dict(row.kwargs)
    config_class = _lookup(lib, row.config_name)
    built = {k: _lookup(lib, v.class_name)(**v.kwargs) if isinstance(v, Nested) else v for k, v in kwargs.items()}
    pending = [k for k, v in row.kwargs.items()
               if k in PENDING_OPTIONS and (PENDING_OPTIONS[k] is None or v in PENDING_OPTIONS[k])]
    try:
        return config_class(**built)
    except (TypeError, ValueError) as error:
        if pending:
            raise NotYet(f"{', '.join(f'{k}={row.kwargs[k]!r}' for k in pending)} not in {lib.__name__} yet "
                         f"({type(error).__name__}: {error})") from error
        raise
