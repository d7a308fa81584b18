"""Frozen random tensors drawn from a seed and shared by every layer of one adapter (VeRA's and PVeRA's projection
pair, RandLoRA's random bases), held once in the model's shared state (``LayerMethod.make_shared``).

The pieces every such method needs, written once: the holder (buffers named as peft saves them, persistent, i.e.
saved as ``base_model.<name>``, only with ``save_projection``), the rule that the model's adapters of one method agree
on the seed and on ``save_projection`` (peft refuses mixed ones), the largest input / output size among the targets
(the tensors are drawn once, big enough for all of them), and the draw itself: on a CPU generator seeded with the
key, as peft draws, then moved to the targets' device (a dry run on the meta device only allocates shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from .common import adapter_dtype, layer_features


class SeededTensors(nn.Module):
    """One adapter's frozen seed-derived tensors, as buffers under peft's names; saved only with
    ``save_projection`` (else regenerated from ``prng_key`` on load)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prng_key: int, save_projection: bool) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=save_projection)
        self.prng_key, self.save_projection = prng_key, save_projection

    def check_agrees(self, method: str, config: object, *settings: tuple[str, object, object]) -> None:
        """Refuse a new adapter whose ``config`` differs from this holder's in ``projection_prng_key`` or
        ``save_projection``, or in the extra ``(field, its value, this holder's value)`` ``settings``.

        Raises:
            ConfigError: naming the first differing field.
        """
        seed = [("projection_prng_key", config.projection_prng_key, self.prng_key),
                ("save_projection", config.save_projection, self.save_projection)]
        for what, ours, theirs in (*settings, *seed):
            if ours != theirs:
                raise ConfigError(
                    f"{what}={ours!r} differs from the model's other {method} adapters ({what}={theirs!r}); {method} "
                    f"adapters of one model draw their random tensors alike (as in peft), so they must agree on it"
                )


def existing(shared: Mapping[str, nn.Module], kind: type[SeededTensors]) -> SeededTensors | None:
    """The shared tensors of the model's first adapter whose holder is a ``kind``, if any."""
    return next((s for s in shared.values() if type(s) is kind), None)


def max_features(bases: Mapping[str, nn.Module]) -> tuple[int, int]:
    """The largest ``(in, out)`` among the targets (Linear or Conv1D), each taken separately."""
    dims = [layer_features(base) for base in bases.values()]
    return max(d[0] for d in dims), max(d[1] for d in dims)


def draw(
    bases: Mapping[str, nn.Module], shapes: Mapping[str, tuple[int, ...]], prng_key: int,
    sample: Callable[[torch.Generator], Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``sample(generator)`` with a CPU generator seeded with ``prng_key``, moved to the targets' device in the
    adapter's dtype; on the meta device (a dry run that counts sizes) empty tensors of ``shapes`` instead."""
    weight = next(iter(bases.values())).weight
    dtype = adapter_dtype(weight.dtype)
    if weight.device.type == "meta":
        return {name: torch.empty(shape, device="meta", dtype=dtype) for name, shape in shapes.items()}
    tensors = sample(torch.Generator(device="cpu").manual_seed(prng_key))
    return {name: t.to(weight.device, dtype) for name, t in tensors.items()}
