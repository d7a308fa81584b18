"""Small helpers shared by the adapter tests: run a model, snapshot and compare weights, talk about peft's names.

Kept apart from :mod:`tests.models` (which builds models) so that file stays about fixtures only.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.layers import AdapterLayer, adapter_layers
from tests.models import MATRIX_FAMILIES

Batch = dict[str, torch.Tensor]


def family_batch(family: str, model: Any, batch: int = 2, seed: int = 0) -> Batch:
    """Inputs for ``family`` with labels (so the output has a loss as well as logits)."""
    return MATRIX_FAMILIES[family].make_inputs(model, batch=batch, seed=seed)


@torch.no_grad()
def logits(model: nn.Module, inputs: Mapping[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """The logits of one forward pass in eval mode (no dropout, no grad)."""
    was_training = model.training
    model.eval()
    try:
        out = model(**inputs, **kwargs)
    finally:
        model.train(was_training)
    return out if isinstance(out, torch.Tensor) else out.logits


def batch_row(batch: Mapping[str, torch.Tensor], i: int) -> Batch:
    """Row ``i`` of every tensor in ``batch``, keeping the batch dimension."""
    return {k: v[i : i + 1] for k, v in batch.items()}


@contextlib.contextmanager
def only_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Only adapter ``name`` active inside the block (``"__base__"``: adapters disabled). Like ``set_adapter`` it
    leaves ``name`` active afterwards."""
    if name == "__base__":
        with model.disable_adapter():
            yield
        return
    model.set_adapter(name)
    yield


def assert_mixed_batch_equals_each_row_alone(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    names: Sequence[str],
    *,
    rel: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> torch.Tensor:
    """The logits of ``model(**inputs, adapter_names=names)`` equal, row by row, those of the model run on that row
    alone with only that row's adapter active (``"__base__"``: adapters disabled) -- an independent computation, not
    a slice of a whole-batch run. A batch that is a whole multiple of ``len(names)`` gives each name that many
    consecutive rows, as the model does (beam search, ``num_return_sequences``).

    Compared with :func:`assert_close_scaled` (``rel``) when ``rel`` is given, else with
    ``torch.testing.assert_close(rtol, atol)``. Returns the mixed logits, so callers can also assert that the rows for
    different adapters really differ (otherwise the comparison proves nothing)."""
    mixed = logits(model, inputs, adapter_names=list(names))
    rows = len(mixed)
    assert rows % len(names) == 0, f"{rows} rows for {len(names)} names"
    repeat = rows // len(names)
    expected = []
    for i in range(rows):
        with only_adapter(model, names[i // repeat]):
            expected.append(logits(model, batch_row(inputs, i)))
    alone = torch.cat(expected)
    if rel is None:
        torch.testing.assert_close(mixed, alone, rtol=rtol, atol=atol)
    else:
        assert_close_scaled(mixed, alone, rel=rel)
    return mixed


@torch.no_grad()
def assert_mixed_generate_equals_each_row_alone(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, names: Sequence[str], **kwargs: Any
) -> torch.Tensor:
    """``model.generate(..., adapter_names=names, **kwargs)`` gives exactly the tokens of generating each row alone
    with only its adapter active (``"__base__"``: adapters disabled); returns the mixed output."""
    mixed = model.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=list(names), **kwargs)
    rows = []
    for i, name in enumerate(names):
        with only_adapter(model, name):
            rows.append(model.generate(input_ids=input_ids[i : i + 1], attention_mask=attention_mask[i : i + 1],
                                       **kwargs))
    assert torch.equal(mixed, torch.cat(rows))
    return mixed


def assert_merges_from_original_as_peft(
    ours: nn.Module, base_factory: Callable[[], nn.Module], inputs: Mapping[str, torch.Tensor], tmp_path: Path
) -> None:
    """Every adapter of ``ours`` (a deltatune model, ``"default"`` first, nothing merged), active and merged at once,
    each merge reading the weights from before any merge (``Delta.merges_from_original``):

    - the merged model's output equals the unmerged one, and so does peft's model merged the same way from the same
      files (peft as the oracle of the whole merged model);
    - every adapted layer's merged parameters (weight, and bias where the method moves it) equal peft's and clearly
      differ from the original ones (otherwise the comparison proves nothing);
    - unmerging restores the whole state dict bit for bit."""
    import peft

    names = list(ours.peft_config)
    assert names[0] == "default" and len(names) > 1, names
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_factory(), tmp_path)
    for name in names[1:]:
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    before = snapshot(ours)
    layers = list(adapter_layers(ours.get_base_model()))
    assert layers
    originals = {path: layer.base_layer.weight.detach().clone() for path, layer in layers}
    ours.set_adapter(names)
    theirs.base_model.set_adapter(names)
    unmerged = logits(ours, inputs)
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(logits(ours, inputs), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(theirs, inputs), unmerged, rtol=1e-5, atol=1e-5)
    for path, layer in layers:
        merged = layer.base_layer.state_dict()
        expected = theirs.get_base_model().get_submodule(path).base_layer.state_dict()
        assert merged.keys() == expected.keys(), path
        for key, value in merged.items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=f"{path}.{key}")
        assert (merged["weight"] - originals[path]).abs().max() > 1e-3, path
    ours.unmerge_adapter()
    assert_same_state(before, ours)


def train_steps(model: nn.Module, batch: Mapping[str, torch.Tensor], steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on the trainable parameters for ``steps`` steps on one batch; the losses, model back in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """``model``'s state dict has exactly the keys and bit-identical values of ``before`` (NaN equals NaN)."""
    after = model.state_dict()
    assert list(after) == list(before), sorted(set(after) ^ set(before))
    changed = [k for k in before if not _identical(before[k], after[k])]
    assert not changed, f"tensors changed: {changed[:5]}"


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def wrapped_names(model: nn.Module) -> list[str]:
    """Full names (relative to the base model) of the modules wrapped by deltatune adapter layers."""
    return sorted(re.sub(r"^base_model\.model\.", "", n) for n, _ in adapter_layers(model))


def peft_wrapped_names(model: nn.Module) -> list[str]:
    """Full names (relative to the base model) of the modules peft wrapped in LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return sorted(re.sub(r"^base_model\.model\.", "", n) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def trainable_by_peft_name(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """The trainable parameters of a deltatune or a peft model, keyed by name without the adapter's name (deltatune's
    ``.deltas.<adapter>``, peft's ``.<adapter>``), so that the two libraries' parameters line up key for key."""
    infix = f".deltas.{adapter}" if adapter_layer_count(model) else f".{adapter}"
    return {n.replace(infix, ""): p for n, p in model.named_parameters() if p.requires_grad}


def lora_deltas(model: nn.Module, adapter: str = "default") -> list[nn.Module]:
    """The LoRA deltas of ``adapter`` in model order."""
    return [layer.deltas[adapter] for _, layer in adapter_layers(model) if adapter in layer.deltas]


@torch.no_grad()
def perturb_lora(model: nn.Module, adapter: str = "default", seed: int = 0, std: float = 0.2) -> None:
    """Add noise to the factor LoRA initialises to zero (``lora_B``; ``lora_embedding_A`` for embeddings) in every
    layer of ``adapter``, so its delta is clearly non-zero, as after some training (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    for delta in lora_deltas(model, adapter):
        factor = delta.lora_embedding_A if hasattr(delta, "lora_embedding_A") else delta.lora_B.weight
        factor.add_(torch.randn(factor.shape, generator=gen) * std)


def adapter_layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, AdapterLayer) for m in model.modules())


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float32 rounding: the largest difference is at most ``rel`` times the largest magnitude of
    ``expected``. (The tiny models' logits range from ~0.02 for BERT to ~20 for mT5, so one absolute tolerance
    would be either meaningless or flaky.)"""
    assert actual.shape == expected.shape
    diff, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert diff <= rel * scale, f"max difference {diff:.3g} exceeds {rel:g} x max |expected| {scale:.3g}"


def assert_clearly_different(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-2) -> None:
    """The largest difference is more than ``rel`` times the largest magnitude of ``expected``."""
    diff, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert diff > rel * scale, f"max difference {diff:.3g} is within {rel:g} x max |expected| {scale:.3g}"
