"""peft 0.21.2's encoder-decoder and feature-extraction tables (``tests/peft_encdec_table.py``) through deltatune's
generic checks.

Each check is measured against something computed independently of deltatune: the tiny base model's own output,
peft building the same row from the same seed (trainable-parameter count, which base parameters train, saved keys,
outputs on files exchanged both ways, merges), a loop of full forwards for cached ``generate``, each row run alone
for mixed adapter batches, and the same step without checkpointing for gradient checkpointing.

The default suite runs every config row on one model (BART for seq2seq, BERT for feature extraction) through the
core checks and LoRA on every model through all of them; the rest of the grid is marked slow.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.layers import AdapterLayer, adapter_layers
from tests.peft_encdec_table import (
    DELTATUNE_GAPS,
    ROWS,
    SEQ2SEQ_MODELS,
    Row,
    build,
    inputs,
    make_config,
    peft_skip,
)
from tests.test_peft_table import add_noise_to_trainable, both_refuse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = {"rtol": 1e-5, "atol": 1e-5}
MERGE_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _lora_rows(rows: list[Row]) -> set[str]:
    """The first LoRA row on every model."""
    lora: dict[str, str] = {}
    for row in rows:
        if row.config_name == "LoraConfig":
            lora.setdefault(row.model_id, row.id)
    return set(lora.values())


_EVERY_CHECK = _lora_rows(ROWS)
_CORE_CHECKS = {row.id for row in ROWS if row.model_id in ("Bart", "Bert")} | _EVERY_CHECK


def params(core: bool, rows: list[Row] = ROWS) -> list[Any]:
    """``rows`` as parameters. The default suite runs LoRA on every model for every check, and every config row on
    its table's first model (BART, BERT) for the core checks (``core``: round trip and interop, merge, generate,
    disable); the rest is marked slow."""
    default = _CORE_CHECKS if core else _EVERY_CHECK
    return [pytest.param(row, id=row.id, marks=() if row.id in default else (pytest.mark.slow,)) for row in rows]


SEQ2SEQ_ROWS = [row for row in ROWS if row.model_id in SEQ2SEQ_MODELS]
ADAPTER_ROWS = [row for row in ROWS if not row.prompt_learning]


def peft_cannot_run(row: Row) -> str | None:
    """Why peft 0.21.2 cannot run ``row`` at all (None: it can)."""
    if row.config_name == "PrefixTuningConfig" and row.model_id.startswith("Deberta"):
        return ("DeBERTa's forward takes no KV cache: peft 0.21.2 fails in the attention mask (3 vs 13 positions), "
                "deltatune refuses at get_peft_model naming prefix tuning")
    return None


def get_model(lib: Any, row: Row, randomized: bool = False, seed: int = 0, adapter_name: str = "default",
              base: nn.Module | None = None) -> nn.Module:
    """Row ``row`` built by ``lib`` under ``seed``; a row peft cannot run is checked to be refused by deltatune too,
    then skipped."""
    if reason := peft_cannot_run(row):
        with pytest.raises((TypeError, ValueError)):
            dt.get_peft_model(build(row.model_id), make_config(dt, row))
        pytest.skip(reason)
    base = build(row.model_id) if base is None else base
    torch.manual_seed(seed)
    return lib.get_peft_model(base, make_config(lib, row, randomized), adapter_name=adapter_name).eval()


def _tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def out(model: nn.Module, row: Row, **kwargs: Any) -> torch.Tensor:
    """Logits (seq2seq) or last hidden state (feature extraction) on peft's test input, in eval mode."""
    was = model.training
    model.eval()
    try:
        return _tensor(model(**inputs(row.model_id), **kwargs))
    finally:
        model.train(was)


def base_out(row: Row) -> torch.Tensor:
    return out(build(row.model_id), row)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or bool((a - b).abs().max() > 1e-7)


def randomize(model: nn.Module, row: Row, seed: int) -> None:
    """Where the "init off" config still leaves the output at the base's (VB-LoRA, identity-by-construction
    methods), add deterministic noise to every trainable tensor, as training would."""
    if not differs(out(model, row), base_out(row)):
        add_noise_to_trainable(model, seed)


def random_model(lib: Any, row: Row, seed: int = 0) -> nn.Module:
    """Row ``row`` with its "init off" config (and noise where that is still the base model)."""
    model = get_model(lib, row, randomized=True, seed=seed)
    randomize(model, row, seed)
    return model


def add_random_adapter(model: nn.Module, lib: Any, row: Row, name: str, seed: int) -> None:
    """A second randomized adapter ``name`` on ``model``, left active."""
    torch.manual_seed(seed)
    model.add_adapter(name, make_config(lib, row, randomized=True))
    model.set_adapter(name)
    randomize(model, row, seed)


def trained_base_parameters(lib: Any, row: Row) -> set[str]:
    """Names of the base model's own parameters that still train after ``lib`` wraps it (by identity)."""
    base = build(row.model_id)
    names = {id(p): n for n, p in base.named_parameters()}
    model = get_model(lib, row, base=base)
    return {names[id(p)] for p in model.parameters() if id(p) in names and p.requires_grad}


def peft_load(row: Row, path: Path, **kwargs: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(row.model_id), path, **kwargs).eval()


def two_adapters_in_both(row: Row, tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    """deltatune's randomized ``default`` plus ``other`` (seed 1), and peft loading both from deltatune's files."""
    if reason := peft_skip(row, "two_adapters"):
        pytest.skip(reason)
    model = random_model(dt, row)
    add_random_adapter(model, dt, row, "other", seed=1)
    model.save_pretrained(tmp_path)
    theirs = peft_load(row, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_adapter(tmp_path / "other", adapter_name="other")
    return model, theirs


@pytest.mark.parametrize("row", params(core=False))
def test_attributes_and_adapter_name(row: Row) -> None:
    """peft's ``_test_model_attr`` / ``_test_adapter_name``: the wrapped model saves and loads, the adapter is
    registered under the given name (in the config and in the parameter names), and it trains as many parameters
    as peft's."""
    model = get_model(dt, row, adapter_name="test-adapter")
    for attr in ("save_pretrained", "from_pretrained", "push_to_hub", "generate"):
        assert hasattr(model, attr), attr
    assert list(model.peft_config) == ["test-adapter"] and model.active_adapters == ["test-adapter"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and any("test-adapter" in n for n in trainable)
    theirs = get_model(peft, row, adapter_name="test-adapter")
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("row", params(core=False))
def test_prepare_for_training(row: Row) -> None:
    """peft's ``_test_prepare_for_training``: only the adapter trains (the same base parameters as peft's, none
    for most rows), the input embeddings give a gradient exactly where peft's do, and always after
    ``enable_input_require_grads``."""
    assert trained_base_parameters(dt, row) == trained_base_parameters(peft, row)
    model, theirs = get_model(dt, row), get_model(peft, row)
    ids = inputs(row.model_id)["input_ids"]
    # trainable tokens adapt the embedding itself: its output carries a gradient for both libraries
    assert model.get_input_embeddings()(ids).requires_grad == theirs.get_input_embeddings()(ids).requires_grad
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(ids).requires_grad


@pytest.mark.parametrize(("row", "safe"), [
    pytest.param(p.values[0], safe, id=f"{p.id}-{'safetensors' if safe else 'pickle'}",
                 marks=p.marks if safe or p.values[0].id in _EVERY_CHECK else (pytest.mark.slow,))
    for p in params(core=True) for safe in (True, False)])
def test_save_load_round_trip_and_interop(row: Row, safe: bool, tmp_path: Path) -> None:
    """peft's ``_test_save_pretrained``: a randomized adapter saved and loaded into a fresh base gives the same
    outputs; the file holds peft's keys and shapes; peft loads deltatune's file with deltatune's outputs and
    deltatune loads peft's with peft's."""
    model = random_model(dt, row)
    expected = out(model, row)
    assert differs(expected, base_out(row))
    model.save_pretrained(tmp_path / "ours", safe_serialization=safe)
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert (tmp_path / "ours" / weights).is_file() and (tmp_path / "ours/adapter_config.json").is_file()
    torch.manual_seed(54321)
    loaded = dt.PeftModel.from_pretrained(build(row.model_id), tmp_path / "ours")
    torch.testing.assert_close(out(loaded, row), expected, **TOL)
    torch.testing.assert_close(out(peft_load(row, tmp_path / "ours"), row), expected, **MERGE_TOL)

    theirs = random_model(peft, row)
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=safe)
    torch.manual_seed(7)
    ours = dt.PeftModel.from_pretrained(build(row.model_id), tmp_path / "theirs")
    torch.testing.assert_close(out(ours, row), out(theirs, row), **MERGE_TOL)
    if safe:
        mine, peft_keys = load_file(tmp_path / "ours" / weights), load_file(tmp_path / "theirs" / weights)
        assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in peft_keys.items()}


@pytest.mark.parametrize("row", params(core=False))
def test_save_selected_adapters(row: Row, tmp_path: Path) -> None:
    """peft's ``_test_save_pretrained_selected_adapters``: two adapters save to the folder and a sub-folder named
    after the second; ``selected_adapters`` saves only the one asked for; each loads back with its own outputs."""
    model = random_model(dt, row)
    first = out(model, row)
    add_random_adapter(model, dt, row, "other", seed=1)
    second = out(model, row)
    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all/adapter_config.json").is_file() and (tmp_path / "all/other/adapter_config.json").is_file()
    model.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    assert not (tmp_path / "one/adapter_config.json").exists()
    assert (tmp_path / "one/other/adapter_config.json").is_file()

    loaded = dt.PeftModel.from_pretrained(build(row.model_id), tmp_path / "all")
    loaded.load_adapter(tmp_path / "one/other", adapter_name="other")
    torch.testing.assert_close(out(loaded, row), first, **TOL)
    loaded.set_adapter("other")
    torch.testing.assert_close(out(loaded, row), second, **TOL)
    theirs = peft_load(row, tmp_path / "all/other")
    torch.testing.assert_close(out(theirs, row), second, **MERGE_TOL)


@pytest.mark.parametrize("row", params(core=True, rows=ADAPTER_ROWS))
def test_merge_layers_and_unload(row: Row) -> None:
    """peft's ``_test_merge_layers`` / ``_test_unload_adapter`` (init weights off): merged output == unmerged,
    merge_and_unload leaves a plain model with that output, unload gives back the base model."""
    if reason := peft_skip(row, "merge"):
        pytest.skip(reason)
    model, theirs = random_model(dt, row), random_model(peft, row)
    expected, reference = out(model, row), base_out(row)
    if both_refuse(model.merge_adapter, theirs.merge_adapter, "merge_adapter"):
        return
    torch.testing.assert_close(out(model, row), expected, **MERGE_TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(out(model, row), expected, **MERGE_TOL)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(out(model, row), expected, **MERGE_TOL)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(out(merged, row), expected, **MERGE_TOL)
    unloaded = random_model(dt, row).unload()
    assert not any(isinstance(m, AdapterLayer) for m in unloaded.modules())
    torch.testing.assert_close(out(unloaded, row), reference, **TOL)


@pytest.mark.parametrize("row", params(core=False, rows=ADAPTER_ROWS))
def test_merge_two_adapters_like_peft(row: Row, tmp_path: Path) -> None:
    """peft's multi-adapter merge: ``merge_and_unload(adapter_names=[both])`` on deltatune equals peft merging the
    same two adapter files."""
    if reason := peft_skip(row, "merge"):
        pytest.skip(reason)
    model, theirs = two_adapters_in_both(row, tmp_path)
    names = ["default", "other"]
    if both_refuse(lambda: model.merge_adapter(adapter_names=names), lambda: theirs.merge_adapter(adapter_names=names),
                   "merging two adapters"):
        return
    model.unmerge_adapter()
    theirs.merge_adapter(adapter_names=names)
    expected = out(theirs, row)
    merged = model.merge_and_unload(adapter_names=names)
    torch.testing.assert_close(out(merged, row), expected, **MERGE_TOL)


def _greedy_by_full_forwards(model: nn.Module, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding without a cache, EOS suppressed (``min_new_tokens=steps``): each step reruns the whole decoder
    prefix (the reference for ``generate``)."""
    config = model.get_base_model().config
    decoded = torch.full((batch["input_ids"].shape[0], 1), config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**batch, decoder_input_ids=decoded, use_cache=False).logits[:, -1]
            logits[:, config.eos_token_id] = -torch.inf
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    return decoded


@pytest.mark.parametrize("row", params(core=True, rows=SEQ2SEQ_ROWS))
def test_generate_matches_full_forwards(row: Row) -> None:
    """peft's ``_test_generate``: cached greedy ``generate`` with the adapter equals a loop of full forwards, and
    differs from the base model's; positional ``input_ids`` are refused as peft refuses them for seq2seq."""
    model = random_model(dt, row)
    batch = {k: v for k, v in inputs(row.model_id).items() if k != "decoder_input_ids"}
    generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1)
    torch.testing.assert_close(generated, _greedy_by_full_forwards(model, batch, 4), rtol=0, atol=0)
    assert generated.shape == (2, 5)
    theirs = get_model(peft, row)
    both_refuse(lambda: model.generate(batch["input_ids"]), lambda: theirs.generate(batch["input_ids"]),
                "positional generate")


@pytest.mark.parametrize("row", params(core=False, rows=ADAPTER_ROWS))
def test_mixed_adapter_batches(row: Row) -> None:
    """peft's ``_test_mixed_adapter_batches``: ``adapter_names`` gives each row its adapter's output (checked
    against that row run alone with only that adapter); where deltatune refuses, peft refuses too."""
    model, theirs = random_model(dt, row), random_model(peft, row)
    add_random_adapter(model, dt, row, "other", seed=1)
    model.set_adapter("default")
    batch = {k: torch.cat([v, v, v]) for k, v in inputs(row.model_id).items()}
    names = ["default", "other", "__base__"] * 2

    def theirs_mixed() -> Any:
        add_random_adapter(theirs, peft, row, "other", seed=1)  # peft refuses a second trainable AdaLoRA adapter
        theirs.set_adapter("default")
        return theirs(**batch, adapter_names=names)

    if both_refuse(lambda: model(**batch, adapter_names=names), theirs_mixed, "adapter_names"):
        return
    with torch.no_grad():
        mixed = _tensor(model(**batch, adapter_names=names))
        for name in set(names):
            # each adapter's rows as one batch run alone (Lily routes by the batch's mean)
            rows = [i for i, n in enumerate(names) if n == name]
            alone_batch = {k: v[rows] for k, v in batch.items()}
            if name == "__base__":
                with model.disable_adapter():
                    alone = _tensor(model(**alone_batch))
            else:
                model.set_adapter(name)
                alone = _tensor(model(**alone_batch))
            torch.testing.assert_close(mixed[rows], alone, **TOL)
    assert differs(mixed[0], mixed[1]) and differs(mixed[0], mixed[2])


@pytest.mark.parametrize("row", params(core=True))
def test_disabled_adapter_is_the_base_model(row: Row) -> None:
    """peft's ``_test_disable_adapter`` (init weights off): the adapter changes the output, disabled it is the
    base model's, and enabled again it is back."""
    if reason := peft_skip(row, "disable"):
        pytest.skip(reason)
    model = random_model(dt, row)
    adapted, reference = out(model, row), base_out(row)
    assert differs(adapted, reference)
    with model.disable_adapter():
        torch.testing.assert_close(out(model, row), reference, **TOL)
    torch.testing.assert_close(out(model, row), adapted, **TOL)


@pytest.mark.parametrize("row", params(core=False))
def test_delete_adapter(row: Row) -> None:
    """peft's ``_test_delete_adapter`` / ``_test_delete_inactive_adapter``: deleting the active second adapter
    falls back to the first, deleting an inactive one keeps the active one; nothing named after a deleted adapter
    stays in the model and the outputs are the first adapter's."""
    model = random_model(dt, row)
    first = out(model, row)
    for active in ("to_delete", "default"):
        add_random_adapter(model, dt, row, "to_delete", seed=1)
        model.set_adapter(active)
        model.delete_adapter("to_delete")
        assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
        assert not [n for n, _ in model.named_parameters() if "to_delete" in n]
        assert not [n for n, _ in model.named_buffers() if "to_delete" in n]
        torch.testing.assert_close(out(model, row), first, **TOL)


def _grads(model: nn.Module, row: Row, seed: int) -> dict[str, torch.Tensor]:
    """The adapter's gradients of one training-mode step (dropout masks seeded)."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    output = _tensor(model(**inputs(row.model_id)))
    # a fixed random weighting, not the mean: a LayerNorm output's mean over features carries no gradient
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    (output * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("row", params(core=False))
def test_gradient_checkpointing_training(row: Row, reentrant: bool) -> None:
    """peft's ``_test_training_gradient_checkpointing``: with checkpointing on, the adapter gets the same gradients
    as the same step without checkpointing, the frozen base none."""
    if reason := peft_skip(row, "gradient_checkpointing"):
        pytest.skip(reason)
    model = random_model(dt, row)
    expected = _grads(model, row, seed=3)
    assert expected and any(g.abs().sum() > 0 for g in expected.values())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.get_base_model().is_gradient_checkpointing
    got = _grads(model, row, seed=3)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **MERGE_TOL)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("row", params(core=False, rows=[row for row in ADAPTER_ROWS if "bias" in row.kwargs
                                                          or row.config_name in ("AdaLoraConfig", "BOFTConfig")]))
def test_second_adapter_with_bias_like_peft(row: Row) -> None:
    """peft's ``_test_adding_multiple_adapters_with_bias_raises``: with ``bias="all"`` a second adapter that also
    trains biases is refused exactly where peft refuses it, and a refusal leaves the model as it was."""
    config = {**row.kwargs, "bias": "all"}
    ours = dt.get_peft_model(build(row.model_id), getattr(dt, row.config_name)(**config))
    theirs = peft.get_peft_model(build(row.model_id), getattr(peft, row.config_name)(**config))
    before = {n: p.detach().clone() for n, p in ours.state_dict().items()}

    def add(model: nn.Module, lib: Any) -> None:
        model.add_adapter("adapter1", getattr(lib, row.config_name)(**config))

    try:
        add(ours, dt)
    except ValueError:
        with pytest.raises(ValueError):
            add(theirs, peft)
        assert list(ours.peft_config) == ["default"]
        after = ours.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        return
    add(theirs, peft)  # deltatune accepted it: peft must too
    assert list(ours.peft_config) == ["default", "adapter1"]


@pytest.mark.parametrize("row", params(core=False))
def test_from_pretrained_with_config_object(row: Row, tmp_path: Path) -> None:
    """peft's ``_test_from_pretrained_config_construction``: ``from_pretrained(config=...)`` uses the given config
    instead of the saved one (seen in a field the file does not have), in inference mode, with the saved weights.
    peft also asserts that the loaded config *is* the caller's object; deltatune keeps a copy and never modifies
    the caller's config (``tests/test_config_immutability.py``), so only the values are compared."""
    model = random_model(dt, row)
    model.save_pretrained(tmp_path)
    config = make_config(dt, row, randomized=True)
    config.base_model_name_or_path = "given-config-object"
    loaded = dt.PeftModel.from_pretrained(build(row.model_id), tmp_path, config=config)
    assert type(loaded.peft_config["default"]) is type(config)
    assert loaded.peft_config["default"].base_model_name_or_path == "given-config-object"
    assert loaded.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(out(loaded, row), out(model, row), **TOL)


# Deterministic combination types (the DARE ones draw random masks, which the two libraries draw differently).
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")


@pytest.mark.parametrize("row", params(core=False, rows=[row for row in ROWS
                                                          if row.config_name in ("LoraConfig", "IA3Config")]))
def test_weighted_combination_like_peft(row: Row, tmp_path: Path) -> None:
    """peft's ``_test_weighted_combination_of_adapters``: ``add_weighted_adapter`` of two randomized adapters gives
    the outputs peft gives for the same two files, for each deterministic combination type; where deltatune refuses
    a type, peft refuses it too."""
    model, theirs = two_adapters_in_both(row, tmp_path)
    kinds = COMBINATIONS if row.config_name == "LoraConfig" else (None,)
    for kind in kinds:
        extra = {} if kind is None else {"combination_type": kind, "density": 0.5}
        name = f"mix_{kind}"

        def combine(m: nn.Module) -> None:
            m.add_weighted_adapter(["default", "other"], [0.7, -0.4], name, **extra)

        if gap := DELTATUNE_GAPS.get((row.config_name, "weighted_combination")):
            with pytest.raises(dt.ConfigError, match="LoRA adapters only"):
                combine(model)
            pytest.skip(gap)
        if both_refuse(lambda: combine(model), lambda: combine(theirs), f"add_weighted_adapter({kind})"):
            continue
        combine(theirs)
        model.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(out(model, row), out(theirs, row), **MERGE_TOL)


@pytest.mark.parametrize("row", params(core=False))
def test_get_base_model_state_dict(row: Row) -> None:
    """peft's ``get_base_model_state_dict``: the wrapped model gives back the base model's own keys and tensors,
    with no adapter tensor among them, and the same keys as peft's."""
    model = random_model(dt, row)
    state = dt.get_base_model_state_dict(model)
    expected = build(row.model_id).state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert state.keys() == peft.get_base_model_state_dict(get_model(peft, row)).keys()


def _peft_adapted(model: nn.Module) -> list[str]:
    """Names of the modules a peft model wrapped in a tuner layer (a trainable-tokens layer sits one level down, in
    its wrapper's ``token_adapter``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted(n.removeprefix("base_model.model.").removesuffix(".token_adapter") for n, m in model.named_modules()
                  if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer"))


@pytest.mark.parametrize("row", params(core=False, rows=[
    row for row in ADAPTER_ROWS if "layers_to_transform" in getattr(peft, row.config_name).__dataclass_fields__]))
def test_layer_indexing_like_peft(row: Row) -> None:
    """peft's ``_test_training_layer_indexing``: ``layers_to_transform=[0]`` adapts the same modules of the first
    block(s) as peft, with as many trainable parameters."""
    config = {**row.kwargs, "layers_to_transform": [0]}
    ours = dt.get_peft_model(build(row.model_id), getattr(dt, row.config_name)(**config))
    theirs = peft.get_peft_model(build(row.model_id), getattr(peft, row.config_name)(**config))
    adapted = sorted(n.removeprefix("base_model.model.") for n, _ in adapter_layers(ours))
    assert adapted and adapted == _peft_adapted(theirs)
    assert len(adapted) < len(list(adapter_layers(get_model(dt, row))))  # the second block stays as it is
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
