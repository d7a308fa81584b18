"""peft 0.21.2's decoder case table (``tests/peft_decoder_table.py``) run through generic checks on tiny causal LMs.

Each check is measured against something computed independently of deltatune: the base model's own logits, a loop
of full forward passes (for cached ``generate``), deltatune's own unmerged output (for merging), or peft building
the same row on the same model (its trainable-parameter count, its saved keys, its outputs on files exchanged both
ways, its merge of two adapters, and whether it refuses what deltatune refuses). peft's skip rules are data
(:func:`tests.peft_decoder_table.skip_reason`); cells where peft cannot be the oracle are listed with the reason in
``PEFT_ORACLE_DIFFERS``.

The default suite runs every row once (rows spread over the models) and LoRA on every model, saving in safetensors;
the full grid (and the pickle format) is slow.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from tests.peft_decoder_table import (
    MISSING_IN_BOTH, MIXED_BATCHES, MODEL_IDS, NEVER_ACTIVE, NO_CONV1D, PEFT_ORACLE_DIFFERS, PROMPT_LEARNING,
    PROMPT_POSITIONS, ROWS, WEIGHTED_COMBINATIONS, WEIGHTED_REFUSED, Row, build, inputs, make_config, skip_reason,
)
from tests.test_peft_table import both_refuse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOL = {"rtol": 1e-5, "atol": 1e-5}
MERGE_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _default_cells() -> set[tuple[str, str]]:
    """(model id, row name) pairs for the default suite: row i on model i (round robin, GPT-2 passed over for the
    methods without Conv1D support), plus LoRA on every model."""
    cells = {(m, "LoRA") for m in MODEL_IDS}
    usable = [m for m in MODEL_IDS if m != "GPT2LMHeadModel"]
    for i, row in enumerate(ROWS):
        models = usable if row.config_name in NO_CONV1D else MODEL_IDS
        cells.add((models[i % len(models)], row.name))
    return cells


_DEFAULT = _default_cells()
CELLS = [pytest.param(m, r, id=f"{m}|{r.name}", marks=() if (m, r.name) in _DEFAULT else (pytest.mark.slow,))
         for r in ROWS for m in MODEL_IDS]


def _skip(check: str, model_id: str, row: Row) -> None:
    if row.name in MISSING_IN_BOTH:
        pytest.skip(MISSING_IN_BOTH[row.name])
    if reason := skip_reason(check, model_id, row):
        pytest.skip(reason)


def oracle_differs(model_id: str, row: Row) -> str | None:
    return PEFT_ORACLE_DIFFERS.get((model_id, row.name))


def get_model(lib: Any, model_id: str, row: Row, randomized: bool = False, seed: int = 0,
              adapter_name: str = "default", checkpointing: bool = False) -> nn.Module:
    """Row ``row`` built by ``lib`` on a fresh ``model_id`` under ``seed``, in eval mode; ``checkpointing``: on a
    base model with gradient checkpointing turned on first (as a user of transformers' Trainer has it)."""
    base = build(model_id)
    if checkpointing:
        base.gradient_checkpointing_enable()
    config = make_config(lib, row, randomized=randomized)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(base, config, adapter_name=adapter_name).eval()


def get_or_refused(model_id: str, row: Row, randomized: bool = False, **kwargs: Any) -> nn.Module:
    """deltatune's model for the cell; where deltatune refuses the cell (a Conv1D target of a method without Conv1D
    support), peft must refuse it too, and the test ends there."""
    try:
        return get_model(dt, model_id, row, randomized=randomized, **kwargs)
    except (TypeError, ValueError, NotImplementedError) as error:
        if oracle_differs(model_id, row):
            pytest.skip(f"deltatune refuses ({error}); {oracle_differs(model_id, row)}")
        with pytest.raises((TypeError, ValueError, NotImplementedError)):
            get_model(peft, model_id, row, randomized=randomized, **kwargs)
        pytest.skip(f"both libraries refuse this cell: {error}")


@torch.no_grad()
def logits(model: nn.Module, unmasked: bool = False, **kwargs: Any) -> torch.Tensor:
    """The last 3 positions' logits (prompt tuning prepends its virtual tokens to the sequence); ``unmasked``: with
    an all-ones attention mask instead of peft's (see PROMPT_POSITIONS)."""
    was = model.training
    model.eval()
    batch = inputs()
    if unmasked:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    try:
        return model(**batch, **kwargs).logits[:, -3:]
    finally:
        model.train(was)


def base_logits(model_id: str) -> torch.Tensor:
    return logits(build(model_id))


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-6)


def perturb(model: nn.Module, seed: int, adapter: str = "") -> None:
    """Deterministic noise (std 0.1) on every trainable tensor (whose name holds ``adapter``), as training would add.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.requires_grad and param.is_floating_point() and adapter in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def random_model(lib: Any, model_id: str, row: Row, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A randomized adapter (identity init off), perturbed where its effect is still below 1e-4 (VB-LoRA's small
    init on some models, an aLoRA adapter that never activates)."""
    if lib is dt:
        model = get_or_refused(model_id, row, randomized=True, seed=seed, **kwargs)
    else:
        model = get_model(peft, model_id, row, randomized=True, seed=seed, **kwargs)
    if not (logits(model) - base_logits(model_id)).abs().max() > 1e-4:
        perturb(model, seed)
    return model


def load(lib: Any, model_id: str, path: Path, **kwargs: Any) -> nn.Module:
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(build(model_id), path, **kwargs).eval()


def two_adapters(model_id: str, row: Row) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """deltatune's randomized ``default`` adapter plus a second one, ``other`` (seed 1, active), and the logits of
    each. A second adapter still within 1e-4 of the base model or the first adapter (VB-LoRA's small init) is
    perturbed as training would move it."""
    model = random_model(dt, model_id, row)
    first = logits(model)
    torch.manual_seed(1)
    model.add_adapter("other", make_config(dt, row, randomized=True))
    model.set_adapter("other")
    if not min((logits(model) - first).abs().max(), (logits(model) - base_logits(model_id)).abs().max()) > 1e-4:
        perturb(model, seed=1, adapter=".other")
    return model, first, logits(model)


def greedy(model: nn.Module, steps: int = 3, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation's new tokens [B, steps] and the scores each was picked from [B, steps, vocab]."""
    with torch.no_grad():
        out = model.generate(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences[:, -steps:], torch.stack(out.scores, dim=1)


def assert_same_greedy(tokens: torch.Tensor, scores: torch.Tensor, expected: torch.Tensor) -> None:
    """Each row of ``tokens`` equals ``expected``'s up to a step where greedy chose between two scores within 1e-4
    of each other (a near-tie that float noise may break either way in random tiny models); after it the rows may
    part."""
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            if tokens[b, t] != expected[b, t]:
                gap = scores[b, t, tokens[b, t]] - scores[b, t, expected[b, t]]
                assert abs(gap) < 1e-4, f"row {b} step {t}: {tokens[b].tolist()} != {expected[b].tolist()}"
                break


def loss_of(model: nn.Module) -> torch.Tensor:
    return model(**inputs(), labels=inputs()["input_ids"]).loss


# --------------------------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("model_id, row", CELLS)
def test_attributes_and_adapter_name(model_id: str, row: Row) -> None:
    """peft's _test_model_attr / _test_adapter_name: the wrapper has save/load, records the adapter under its name and
    trains as many parameters as peft; a fresh adapter is an identity exactly where peft's is."""
    _skip("attributes_parametrized", model_id, row)
    ours = get_or_refused(model_id, row, adapter_name="test-name")
    assert callable(ours.save_pretrained) and callable(ours.from_pretrained)
    assert ours.active_adapter == "test-name" and list(ours.peft_config) == ["test-name"]
    assert ours.peft_config["test-name"].task_type in ("CAUSAL_LM", dt.TaskType.CAUSAL_LM)
    if oracle_differs(model_id, row):
        return
    theirs = get_model(peft, model_id, row, adapter_name="test-name")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    reference = base_logits(model_id)
    if torch.allclose(logits(theirs), reference, **TOL):  # identity at init (VB-LoRA's small random init is not)
        torch.testing.assert_close(logits(ours), reference, **MERGE_TOL)
    else:
        assert differs(logits(ours), reference)


@pytest.mark.parametrize("model_id, row", CELLS)
def test_prepare_for_training_gradients_reach_the_adapter_only(model_id: str, row: Row) -> None:
    """peft's _test_prepare_for_training / _test_training: the input embeddings need no gradient unless prepared
    (prepare_model_for_kbit_training: as in peft, only for a quantized model), and a backward pass gives a gradient to
    every trainable tensor (some nonzero, unless the adapter never activates) and to no frozen one."""
    _skip("prepare_for_training_parametrized", model_id, row)
    model = get_or_refused(model_id, row).train()
    embedded = model.get_input_embeddings()(inputs()["input_ids"])
    if row.kwargs.get("trainable_token_indices") is None:
        assert not embedded.requires_grad
    loss_of(model).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]
    moved = any(p.grad.abs().sum() > 0 for p in trainable.values())
    if oracle_differs(model_id, row):
        assert moved
    else:  # an aLoRA adapter applies from its last invocation token on, which no label of this input follows
        theirs = get_model(peft, model_id, row).train()
        loss_of(theirs).backward()
        assert moved == any(p.grad.abs().sum() > 0 for p in theirs.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    if oracle_differs(model_id, row):
        return
    prepared = [lib.get_peft_model(lib.prepare_model_for_kbit_training(build(model_id)), make_config(lib, row))
                for lib in (dt, peft)]
    ours, theirs = (m.get_input_embeddings()(inputs()["input_ids"]).requires_grad for m in prepared)
    assert ours == theirs


@pytest.mark.parametrize("model_id, row", CELLS)
@pytest.mark.parametrize("safe", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["safetensors", "pickle"])
def test_save_load_round_trip_and_interop(model_id: str, row: Row, safe: bool, tmp_path: Path) -> None:
    """peft's _test_save_pretrained (both formats): a randomized adapter saved and loaded into a fresh base gives the
    same logits; the file holds peft's keys and shapes; the file loads in peft with our logits, and peft's file
    loads in deltatune with peft's (prompt learning: compared without masked tokens, see PROMPT_POSITIONS)."""
    _skip("save_pretrained", model_id, row)
    model = random_model(dt, model_id, row)
    expected = logits(model)
    model.save_pretrained(tmp_path / "ours", safe_serialization=safe)
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert (tmp_path / "ours/adapter_config.json").is_file() and (tmp_path / "ours" / weights).is_file()
    torch.testing.assert_close(logits(load(dt, model_id, tmp_path / "ours")), expected, **TOL)
    if reason := oracle_differs(model_id, row):
        pytest.skip(reason)

    unmasked = row.config_name in PROMPT_POSITIONS
    torch.testing.assert_close(logits(load(peft, model_id, tmp_path / "ours"), unmasked),
                               logits(model, unmasked), **MERGE_TOL)
    theirs = random_model(peft, model_id, row)
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=safe)
    torch.testing.assert_close(logits(load(dt, model_id, tmp_path / "theirs"), unmasked), logits(theirs, unmasked),
                               **MERGE_TOL)
    if safe:
        ours_file = load_file(tmp_path / "ours" / weights)
        theirs_file = load_file(tmp_path / "theirs" / weights)
        assert {k: tuple(v.shape) for k, v in ours_file.items()} == {k: tuple(v.shape) for k, v in theirs_file.items()}


@pytest.mark.parametrize("model_id, row", CELLS)
def test_save_selected_adapters(model_id: str, row: Row, tmp_path: Path) -> None:
    """peft's _test_save_pretrained_selected_adapters: two adapters saved (the second in its own folder) load back
    with each adapter's logits; ``selected_adapters`` saves only the one named."""
    _skip("save_pretrained_selected_adapters", model_id, row)
    model, first, second = two_adapters(model_id, row)
    model.save_pretrained(tmp_path / "all")
    model.save_pretrained(tmp_path / "selected", selected_adapters=["other"])
    assert (tmp_path / "all/other/adapter_config.json").is_file()
    assert not (tmp_path / "selected/adapter_config.json").exists()
    assert (tmp_path / "selected/other/adapter_config.json").is_file()

    loaded = load(dt, model_id, tmp_path / "all")
    loaded.load_adapter(tmp_path / "all/other", adapter_name="other")
    torch.testing.assert_close(logits(loaded), first, **TOL)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), second, **TOL)
    torch.testing.assert_close(logits(load(dt, model_id, tmp_path / "selected/other")), second, **TOL)


def _merge_applies(row: Row) -> None:
    if row.config_name in PROMPT_LEARNING:
        pytest.skip("prompt learning adds no weights to merge (peft skips it too)")


@pytest.mark.parametrize("model_id, row", CELLS)
def test_merge_layers(model_id: str, row: Row) -> None:
    """peft's _test_merge_layers (identity init off): merging keeps the logits, merge_and_unload leaves a plain
    model with them, unload gives back the base model. Where deltatune refuses to merge, peft must refuse too."""
    _skip("merge_layers", model_id, row)
    _merge_applies(row)
    model = random_model(dt, model_id, row)
    expected, reference = logits(model), base_logits(model_id)
    assert differs(expected, reference) != (row.name in NEVER_ACTIVE)
    theirs = None if oracle_differs(model_id, row) else random_model(peft, model_id, row)
    if theirs is not None and both_refuse(model.merge_adapter, theirs.merge_adapter, "merge_adapter"):
        return
    if theirs is None:
        model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, **MERGE_TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), expected, **MERGE_TOL)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not isinstance(merged, (dt.PeftModel, peft.PeftModel))
    torch.testing.assert_close(logits(merged), expected, **MERGE_TOL)
    torch.testing.assert_close(logits(model.unload()), reference, **TOL)


@pytest.mark.parametrize("model_id, row", CELLS)
def test_merge_layers_multi(model_id: str, row: Row, tmp_path: Path) -> None:
    """peft's _test_merge_layers_multi: two adapters give different logits, switching back restores the first; merging
    one adapter gives its logits; merging both gives the logits of both active unmerged, and peft's merge of the same
    two files."""
    _skip("merge_layers_multi", model_id, row)
    _merge_applies(row)
    model, first, second = two_adapters(model_id, row)
    assert differs(first, second) != (row.name in NEVER_ACTIVE)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), first, **TOL)
    theirs = None if oracle_differs(model_id, row) else random_model(peft, model_id, row)
    if theirs is not None:
        torch.manual_seed(1)  # peft trains one AdaLoRA adapter at a time: the second one is loaded frozen
        theirs.add_adapter("other", make_config(peft, row, randomized=True, inference_mode=True))
        if both_refuse(lambda: copy.deepcopy(model).merge_and_unload(adapter_names=["other"]),
                       lambda: copy.deepcopy(theirs).merge_and_unload(adapter_names=["other"]), "merging an adapter"):
            return
    torch.testing.assert_close(logits(copy.deepcopy(model).merge_and_unload(adapter_names=["other"])), second,
                               **MERGE_TOL)
    torch.testing.assert_close(logits(copy.deepcopy(model).merge_and_unload(adapter_names=["default"])), first,
                               **MERGE_TOL)
    both = logits(copy.deepcopy(model).merge_and_unload(adapter_names=["other", "default"]))
    assert differs(both, first) and differs(both, second)
    model.set_adapter(["default", "other"])
    torch.testing.assert_close(both, logits(model), **MERGE_TOL)  # merged == both active, unmerged
    if theirs is None:
        return
    model.save_pretrained(tmp_path)
    theirs = load(peft, model_id, tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            their_both = logits(theirs.merge_and_unload(adapter_names=["other", "default"]))
        except ValueError as error:  # peft refuses two trainable-token adapters on the same token ids
            assert row.kwargs.get("trainable_token_indices"), error
            return
    torch.testing.assert_close(both, their_both, **MERGE_TOL)


@pytest.mark.parametrize("model_id, row", CELLS)
def test_generate_and_cached_greedy_equals_full_forwards(model_id: str, row: Row) -> None:
    """peft's _test_generate / _test_generate_pos_args: generate takes keyword and positional inputs; greedy
    generation with the KV cache picks, token by token, the argmax of a full forward pass over the sequence so far
    (mask all ones, so positions agree in both)."""
    _skip("generate", model_id, row)
    model = random_model(dt, model_id, row)
    ids = inputs()["input_ids"]
    with torch.no_grad():
        model.generate(**inputs(), max_new_tokens=2, do_sample=False)
        model.generate(ids, max_new_tokens=2, do_sample=False)
        sequence, scores = ids, []
        for _ in range(4):
            step = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
            step[:, 2] = float("-inf")  # min_new_tokens masks the eos id
            scores.append(step)
            sequence = torch.cat([sequence, step.argmax(-1, keepdim=True)], dim=1)
    tokens, _ = greedy(model, steps=4, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert_same_greedy(sequence[:, -4:], torch.stack(scores, dim=1), tokens)


@pytest.mark.parametrize("model_id, row", CELLS)
def test_mixed_adapter_batches(model_id: str, row: Row) -> None:
    """peft's _test_mixed_adapter_batches / _test_generate_with_mixed_adapter_batches: with ``adapter_names`` each
    row gets its adapter's logits (``__base__``: the base model's), and greedy generate with ``adapter_names`` gives
    each row what its adapter alone generates. peft runs this for LoRA only; for another method deltatune either
    passes the same check or refuses ``adapter_names`` with the model unchanged."""
    if row.config_name not in MIXED_BATCHES and row.name not in MISSING_IN_BOTH:
        _skip("disable_adapter", model_id, row)  # peft's other rules still apply
    else:
        _skip("mixed_adapter_batches", model_id, row)
    model, first, second = two_adapters(model_id, row)
    alone = {"default": first, "other": second}
    with model.disable_adapter():
        alone["__base__"] = logits(model)
    try:
        mixed = logits(model, adapter_names=["default", "other"])
    except (TypeError, ValueError, NotImplementedError, dt.AdapterStateError) as error:
        assert row.config_name not in MIXED_BATCHES, error
        torch.testing.assert_close(logits(model), second, **TOL)
        pytest.skip(f"deltatune refuses adapter_names for {row.config_name}: {error}")
    for names in (["default", "other"], ["other", "__base__"]):
        mixed = logits(model, adapter_names=names)
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], alone[name][i], **TOL)

    tokens, scores = greedy(model, **inputs(), adapter_names=["other", "default"])
    for i, name in enumerate(["other", "default"]):
        model.set_adapter(name)
        assert_same_greedy(tokens[i:i + 1], scores[i:i + 1], greedy(model, **inputs())[0][i:i + 1])


@pytest.mark.parametrize("model_id, row", CELLS)
def test_weighted_combination_of_adapters(model_id: str, row: Row, tmp_path: Path) -> None:
    """peft's _test_weighted_combination_of_adapters: ``add_weighted_adapter`` of two adapters, for each combination
    type peft has for the method, gives the logits of peft's combination of the same two files (where deltatune
    refuses a combination, peft must refuse it too; WEIGHTED_REFUSED: deltatune's refusals by name)."""
    _skip("weighted_combination_of_adapters", model_id, row)
    if row.config_name not in WEIGHTED_COMBINATIONS:
        pytest.skip("peft's add_weighted_adapter combines LoRA and IA3 adapters only")
    model, _, _ = two_adapters(model_id, row)
    if refused := WEIGHTED_REFUSED.get(row.name) or WEIGHTED_REFUSED.get(row.config_name):
        before = logits(model)
        with pytest.raises(dt.ConfigError):
            model.add_weighted_adapter(["default", "other"], [0.5, 0.7], "mix")
        assert list(model.peft_config) == ["default", "other"]
        torch.testing.assert_close(logits(model), before, **TOL)
        pytest.skip(refused)
    model.save_pretrained(tmp_path)
    theirs = load(peft, model_id, tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    for combination in WEIGHTED_COMBINATIONS[row.config_name]:
        kwargs = {} if combination is None else {"combination_type": combination}
        args = (["default", "other"], [0.5, 0.7], f"mix_{combination}")
        if both_refuse(lambda: model.add_weighted_adapter(*args, **kwargs),
                       lambda: theirs.add_weighted_adapter(*args, **kwargs), f"add_weighted_adapter {kwargs}"):
            continue
        theirs.add_weighted_adapter(*args, **kwargs)
        model.set_adapter(args[2])
        theirs.set_adapter(args[2])
        torch.testing.assert_close(logits(model), logits(theirs), **MERGE_TOL)


@pytest.mark.parametrize("model_id, row", CELLS)
def test_disabled_adapter_is_the_base_model(model_id: str, row: Row) -> None:
    """peft's _test_disable_adapter: a randomized adapter changes the logits, disabled it gives the base model's, and
    they come back on leaving the context."""
    _skip("disable_adapter", model_id, row)
    model = random_model(dt, model_id, row)
    adapted, reference = logits(model), base_logits(model_id)
    assert differs(adapted, reference)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), reference, **TOL)
    torch.testing.assert_close(logits(model), adapted, **TOL)


@pytest.mark.parametrize("model_id, row", CELLS)
def test_delete_adapter(model_id: str, row: Row) -> None:
    """peft's _test_delete_adapter / _test_delete_inactive_adapter: deleting the active adapter makes the first
    remaining one active (peft's rule), deleting an inactive one keeps the active one; either way its config and
    every tensor of it go, and the remaining adapter's logits are as they were."""
    _skip("delete_adapter", model_id, row)
    for active in ("other", "default"):
        model, first, _ = two_adapters(model_id, row)
        model.set_adapter(active)
        model.delete_adapter("other")
        assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
        assert not [n for n in model.state_dict() if ".other." in n or n.endswith(".other")]
        torch.testing.assert_close(logits(model), first, **TOL)


@pytest.mark.parametrize("model_id, row", CELLS)
def test_passing_inputs_embeds(model_id: str, row: Row) -> None:
    """peft's _test_passing_input_embeds_works: ``inputs_embeds`` (the model's input embeddings of the ids) gives
    the logits the ids give, in a forward pass and in greedy generate. An aLoRA adapter finds its invocation in
    ``input_ids``: from embeddings alone it stays off, as in peft (EMBEDS_WITHOUT_INVOCATION)."""
    _skip("passing_input_embeds_works", model_id, row)
    model = random_model(dt, model_id, row)
    batch = inputs()
    off = "alora_invocation_tokens" in row.kwargs
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        by_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, -3:]
        torch.testing.assert_close(by_embeds, base_logits(model_id) if off else logits(model), **TOL)
        if off:
            return
    tokens, scores = greedy(model, inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    assert_same_greedy(tokens, scores, greedy(model, **batch)[0])


@pytest.mark.parametrize("model_id, row", CELLS)
def test_training_with_gradient_checkpointing(model_id: str, row: Row) -> None:
    """peft's _test_training_gradient_checkpointing: with the base model's gradient checkpointing on, a training step
    gives the adapter the same gradients as without it (same seed, so the same dropout masks)."""
    _skip("training_decoders_gradient_checkpointing", model_id, row)
    grads = []
    for checkpointing in (False, True):
        model = get_or_refused(model_id, row, randomized=True, checkpointing=checkpointing)
        assert model.get_base_model().is_gradient_checkpointing == checkpointing
        model.train()
        torch.manual_seed(5)
        loss_of(model).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, **MERGE_TOL)
