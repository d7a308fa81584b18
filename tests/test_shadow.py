"""ShadowPEFT (``ShadowConfig``): a small trainable shadow network rides a frozen decoder's block loop (equation
numbers as in the paper and peft's docstrings).

What is checked, and against what:

- files move both ways with peft 0.21.2 (the oracle) with equal logits, task + auxiliary loss and ``shadow_loss``,
  and both libraries write the same keys (Llama, GPT-2, a narrower shadow backbone with its projection, a deeper
  backbone, a classification model with its copied ``shadow_head``);
- the forward equals the paper's equations written out here (Eq. 2-4 injection, Eq. 5-7 gated update, Eq. 8-9
  auxiliary loss) and run over the base model's own blocks through forward hooks, with the adapter's weights read
  from its saved file (peft's keys) -- no deltatune internals;
- a fresh adapter is the base model; disabled adapters are the base model; only shadow parameters train, and one
  optimizer step moves them exactly as peft's step does; gradient checkpointing changes no gradient;
- cached ``generate()`` equals a loop of full forwards, and beam search / left padding equal peft's generate;
- ``unload_shadow()`` gives the standalone shadow network ``head(projection(backbone(x)))``;
- bad input (``r=0``, gaps between the adapted blocks, an encoder-decoder model, mirror-only overrides of a named
  shadow model, merging) is refused and leaves the model as it was.

Where peft 0.21.2 is no oracle (run as the model under test it fails these): its cached ``generate()`` on
transformers 5.25 (the cache arrives as ``cache=``, which its hook does not read; 5.13 passes), ``layers_to_transform``
with the default targets (ignored), gaps between blocks (not refused), T5 (an ``AttributeError``) and
``merge_and_unload`` (refused only after removing the shadow hooks, which loses the adapter's effect),
``adapter_names`` rows (not refused), loading for inference (its shadow backbone stays trainable) and two active
adapters (a ``TypeError`` about hashing).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import deltatune as dt
from tests.models import make_causal_lm_inputs, make_seq_cls_inputs, tiny_gpt2, tiny_llama, tiny_t5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

Batch = dict[str, torch.Tensor]
#: Errors a refusal may raise (deltatune's own types subclass ValueError); tests match on the message's topic.
REFUSED = (ValueError, TypeError, NotImplementedError)
_SHADOW_KEY = re.compile(r"^base_model\.model\.(?P<block>.+)\.shadow_(?P<part>down|up|update_transform|update_gate)"
                         r"\.default\.(?P<rest>.+)$")


def tiny_llama_cls(seed: int = 0) -> LlamaForSequenceClassification:
    """The tiny Llama (``tests.models.tiny_llama``'s config) with a 3-class ``score`` head."""
    config = copy.deepcopy(tiny_llama().config)
    config.num_labels = 3
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def tiny_gpt2_without_dropout(seed: int = 0) -> nn.Module:
    """The tiny GPT-2 with its dropout off (the mirror backbone copies its config), for comparing training steps."""
    config = copy.deepcopy(tiny_gpt2().config)
    config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    torch.manual_seed(seed)
    return type(tiny_gpt2())(config).eval()


def tiny_llama_3_layers(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(**{**tiny_llama().config.to_dict(), "num_hidden_layers": 3})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@dataclass(frozen=True)
class Case:
    """A base model and ShadowConfig arguments (besides ``task_type``) spelled the same way in both libraries."""

    name: str
    factory: Callable[[], nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    task_type: str = "CAUSAL_LM"

    def config(self, library: Any, **extra: Any) -> Any:
        return library.ShadowConfig(task_type=self.task_type, **{"r": 4, **self.kwargs, **extra})

    def inputs(self, model: nn.Module, **kwargs: Any) -> Batch:
        make = make_seq_cls_inputs if self.task_type == "SEQ_CLS" else make_causal_lm_inputs
        return make(model, **kwargs)


CASES = {
    case.name: case
    for case in [
        Case("llama", tiny_llama),
        Case("gpt2", tiny_gpt2, dict(shadow_alpha=0.3)),
        # a narrower backbone: its own embedding table (the base's is 32 wide) and a 16 -> 32 shadow_projection
        Case("llama-projected", tiny_llama, dict(shadow_hidden_size=16, shadow_intermediate_size=24)),
        Case("llama-deep-backbone", tiny_llama, dict(shadow_num_hidden_layers=2, update_hidden_size=6,
                                                     shadow_alpha=0.5)),
        Case("gpt2-without-dropout", tiny_gpt2_without_dropout, dict(shadow_alpha=0.3)),
        Case("llama-seq-cls", tiny_llama_cls, dict(auxiliary_loss_weight=0.3), task_type="SEQ_CLS"),
    ]
}
#: the cases exchanged with peft and checked against the reference (GPT-2 without dropout only trains)
EXCHANGED = [name for name in CASES if name != "gpt2-without-dropout"]
LLAMA, GPT2 = CASES["llama"], CASES["gpt2"]


# --------------------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def randomize(model: nn.Module, seed: int, std: float = 0.3) -> None:
    """Seeded noise on every trainable tensor (the shadow network, W_up included, and any saved head), as training
    would leave them."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=gen) * std)


def build(library: Any, case: Case, seed: int = 0, **extra: Any) -> nn.Module:
    """``case``'s adapter in ``library``, randomized (``seed``), eval mode."""
    torch.manual_seed(100 + seed)
    model = library.get_peft_model(case.factory(), case.config(library, **extra))
    randomize(model, seed)
    return model.eval()


def saved(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(path)
    return load_file(path / "adapter_model.safetensors")


def load_file_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``model`` saves (its adapter file, read back)."""
    with tempfile.TemporaryDirectory() as tmp:
        return saved(model, Path(tmp))


@torch.no_grad()
def run(model: nn.Module, batch: Batch, **kwargs: Any) -> Any:
    return model(**batch, **kwargs)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def assert_same_outputs(ours: Any, theirs: Any) -> None:
    """Logits, loss (task + weighted auxiliary loss) and the unweighted ``shadow_loss`` agree."""
    close(ours.logits, theirs.logits)
    close(ours.loss, theirs.loss)
    close(ours.shadow_loss, theirs.shadow_loss)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_is(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """``model`` has exactly ``expected``'s modules and tensors (nothing wrapped, nothing changed)."""
    after = model.state_dict()
    assert list(after) == list(expected), sorted(set(after) ^ set(expected))
    assert all(torch.equal(after[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------------------ reference
class Reference:
    """ShadowPEFT's forward written out from the paper over a fresh copy of the base model.

    The adapter's tensors come from its saved file (peft's keys, the public format): per adapted block l the
    injection bottleneck ``W_down`` / ``W_up`` and the two-layer GELU MLPs ``T`` and ``G``; the shadow backbone (the
    base decoder's class with the mirror config); the optional ``shadow_projection`` and ``shadow_head``. Then

    - s0 = P(backbone(x)) (driven by the frozen base embeddings when it has no embedding table of its own);
    - before block l: h <- h + alpha * W_up(W_down(h - s))                         (Eq. 2-4)
    - after block l:  s <- (1 - g) * s + g * t, g = sigmoid(G(h_out)), t = T(h_out) (Eq. 5-7)
    - loss = task loss + lambda * CE(head(s0), labels)                            (Eq. 8-9)
    """

    def __init__(self, case: Case, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        self.case, self.config = case, config
        self.base = case.factory()
        # a classifier trained as modules_to_save is saved under its own name
        own = {k.removeprefix("base_model.model."): v for k, v in tensors.items()
               if k.startswith("base_model.model.") and ".shadow_" not in k}
        missing, unexpected = self.base.load_state_dict(own, strict=False)
        assert not unexpected and len(missing) == len(self.base.state_dict()) - len(own)
        self.blocks: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for key, value in tensors.items():
            if m := _SHADOW_KEY.match(key):
                self.blocks.setdefault(m["block"], {}).setdefault(m["part"], {})[m["rest"]] = value
        # the backbone reads the frozen base embeddings where it is as wide as the base (share_embeddings)
        width = config["shadow_hidden_size"]
        self.shares_embeddings = config["share_embeddings"] and width in (None, self.base.config.hidden_size)
        self.backbone = self._backbone({k.removeprefix("base_model.shadow_backbone.default."): v
                                        for k, v in tensors.items() if ".shadow_backbone.default." in k})
        self.projection = tensors.get("base_model.shadow_projection.default.weight")
        self.head = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if ".shadow_head.default." in k}

    def _decoder(self) -> nn.Module:
        return getattr(self.base, "model", None) or self.base.transformer

    def _backbone(self, state: dict[str, torch.Tensor]) -> nn.Module:
        config = copy.deepcopy(self._decoder().config)
        config.num_hidden_layers = self.config["shadow_num_hidden_layers"] or 1
        for field_name in ("hidden_size", "intermediate_size", "num_attention_heads"):
            if self.config[f"shadow_{field_name}"] is not None:
                setattr(config, field_name, self.config[f"shadow_{field_name}"])
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        backbone = type(self._decoder())(config).eval()
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        # a Llama backbone drops the embedding table it does not use; GPT-2's keeps its unused ``wte``
        assert not unexpected and missing == (["embed_tokens.weight"] if missing else []), (missing, unexpected)
        return backbone

    def initial_state(self, batch: Batch) -> torch.Tensor:
        """s0: the shadow backbone's output, projected to the base width ([B, T, d])."""
        if self.shares_embeddings:
            out = self.backbone(inputs_embeds=self.base.get_input_embeddings()(batch["input_ids"]),
                                attention_mask=batch["attention_mask"])
        else:
            out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s0 = out.last_hidden_state
        return s0 if self.projection is None else s0 @ self.projection.T

    def auxiliary_loss(self, s0: torch.Tensor, batch: Batch) -> torch.Tensor:
        """CE of the shadow path's own prediction: the LM head on s0 (shifted), or shadow_head on the last token."""
        labels = batch["labels"]
        if self.case.task_type == "SEQ_CLS":
            logits = s0[:, -1] @ self.head["weight"].T + self.head.get("bias", 0)
            return F.cross_entropy(logits, labels)
        logits = self.base.get_output_embeddings()(s0)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    @staticmethod
    def _mlp(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.gelu(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        """The base model's output under the shadow path, and the unweighted auxiliary loss."""
        alpha = self.config["shadow_alpha"]
        s0 = self.initial_state(batch)
        state = {"s": s0}

        def inject(params):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                h = h + alpha * ((h - state["s"]) @ params["down"]["weight"].T) @ params["up"]["weight"].T
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            return hook

        def update(params):
            def hook(module, args, kwargs, out):
                h_out = out if isinstance(out, torch.Tensor) else out[0]
                t = self._mlp(h_out, params["update_transform"])
                g = torch.sigmoid(self._mlp(h_out, params["update_gate"]))
                state["s"] = (1 - g) * state["s"] + g * t
            return hook

        handles = []
        for name, params in self.blocks.items():
            block = self.base.get_submodule(name)
            handles.append(block.register_forward_pre_hook(inject(params), with_kwargs=True))
            handles.append(block.register_forward_hook(update(params), with_kwargs=True))
        try:
            out = self.base(**batch, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return out, self.auxiliary_loss(s0, batch)


def reference_for(model: nn.Module, case: Case, path: Path) -> Reference:
    tensors = saved(model, path)
    return Reference(case, tensors, json.loads((path / "adapter_config.json").read_text()))


# --------------------------------------------------------------------------------------------------------- interop
@pytest.mark.parametrize("name", EXCHANGED)
def test_peft_adapter_loads_with_equal_logits_and_losses(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    theirs = build(peft, case, init_weights=False)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(case.factory(), tmp_path)
    assert not [n for n, p in ours.named_parameters() if p.requires_grad]  # loaded for inference, as in peft
    batch = case.inputs(ours)
    expected = run(theirs, batch)
    assert_same_outputs(run(ours, batch), expected)
    assert (expected.logits - run(case.factory(), batch).logits).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("name", EXCHANGED)
def test_our_adapter_loads_in_peft_with_equal_logits_and_losses(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    ours = build(dt, case, seed=1)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(case.factory(), tmp_path)
    batch = case.inputs(ours)
    expected = run(ours, batch)
    assert_same_outputs(run(theirs, batch), expected)
    assert (expected.logits - run(case.factory(), batch).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", EXCHANGED)
def test_both_libraries_write_the_same_keys_shapes_and_config(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    ours = saved(dt.get_peft_model(case.factory(), case.config(dt)), tmp_path / "ours")
    theirs = saved(peft.get_peft_model(case.factory(), case.config(peft)), tmp_path / "theirs")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    our_config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs/adapter_config.json").read_text())
    assert set(our_config) <= set(their_config)
    for config in (our_config, their_config):  # peft writes its target set in any order
        config["target_modules"] = sorted(config["target_modules"])
        config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []))
    ignored = {"auto_mapping", "peft_version"}
    assert {k: v for k, v in our_config.items() if k not in ignored} == {
        k: their_config[k] for k in our_config if k not in ignored}


def test_a_named_adapter_saves_under_the_default_key(tmp_path: Path) -> None:
    # peft writes the literal "default" into the nested container keys whatever the adapter's name
    model = dt.get_peft_model(tiny_llama(), LLAMA.config(dt), adapter_name="mine")
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "mine/adapter_model.safetensors")  # a named adapter saves in its own folder
    assert "base_model.model.model.layers.0.shadow_down.default.weight" in keys
    assert "base_model.shadow_backbone.default.layers.0.self_attn.q_proj.weight" in keys
    assert not [k for k in keys if "mine" in k]


# ------------------------------------------------------------------------------------------------------------ math
@pytest.mark.parametrize("name, extra", [
    *[pytest.param(name, {}, id=name) for name in EXCHANGED],
    pytest.param("llama", dict(layers_to_transform=[1], auxiliary_loss_weight=0.5), id="llama-last-block-only"),
])
def test_forward_equals_the_paper_written_out_over_the_base_blocks(name: str, extra: dict, tmp_path: Path) -> None:
    case = CASES[name]
    model = build(dt, case, **extra)
    reference = reference_for(model, case, tmp_path)
    if extra.get("layers_to_transform"):
        assert list(reference.blocks) == ["model.layers.1"]
    batch = case.inputs(model, seed=3)
    out = run(model, batch)
    expected, aux = reference(batch)
    close(out.logits, expected.logits)
    close(out.shadow_loss, aux)
    close(model.base_model.last_shadow_loss, aux)
    close(out.loss, expected.loss + model.peft_config["default"].auxiliary_loss_weight * aux)


# -------------------------------------------------------------------------------------------------- fresh / disable
@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-projected"])
def test_fresh_adapter_gives_the_base_logits_exactly(name: str) -> None:
    case = CASES[name]
    batch = case.inputs(case.factory())
    expected = run(case.factory(), batch).logits
    torch.manual_seed(0)
    model = dt.get_peft_model(case.factory(), case.config(dt)).eval()
    assert torch.equal(run(model, batch).logits, expected)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_disabled_adapter_is_the_base_model_exactly(name: str) -> None:
    case = CASES[name]
    model = build(dt, case)
    batch = case.inputs(model)
    base = run(case.factory(), batch)
    assert (run(model, batch).logits - base.logits).abs().max() > 1e-3
    with model.disable_adapter():
        out = run(model, batch)
    assert torch.equal(out.logits, base.logits)
    assert torch.equal(out.loss, base.loss)  # no auxiliary loss without the shadow path
    assert (run(model, batch).logits - base.logits).abs().max() > 1e-3  # enabled again


# ---------------------------------------------------------------------------------------------------------- losses
def test_auxiliary_loss_is_the_cross_entropy_of_the_base_head_on_the_shadow_state(tmp_path: Path) -> None:
    model = build(dt, LLAMA, auxiliary_loss_weight=0.25)
    batch = LLAMA.inputs(model, seed=5)
    batch["labels"][0, :3] = -100  # ignored positions stay out of both losses
    reference = reference_for(model, LLAMA, tmp_path)
    s0 = reference.initial_state(batch)
    lm_logits = reference.base.get_output_embeddings()(s0)
    expected = F.cross_entropy(lm_logits[:, :-1].reshape(-1, lm_logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
    out = run(model, batch)
    close(out.shadow_loss, expected)
    task = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    close(out.loss, task + 0.25 * expected)


def test_zero_auxiliary_weight_gives_exactly_the_task_loss() -> None:
    model = build(dt, LLAMA, auxiliary_loss_weight=0.0)
    batch = LLAMA.inputs(model)
    out = run(model, batch)
    logits = out.logits
    task = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task, rtol=1e-6, atol=0)
    unlabeled = run(model, {k: v for k, v in batch.items() if k != "labels"})
    assert unlabeled.loss is None and torch.equal(unlabeled.logits, logits)
    assert model.base_model.last_shadow_loss is None  # no labels, no shadow loss: nothing stale is left


# -------------------------------------------------------------------------------------------------------- training
def _base_parameters(model: nn.Module) -> dict[int, torch.Tensor]:
    """id -> value of every parameter of a base model (taken before it is wrapped, so no adapter names matter)."""
    return {id(p): p.detach().clone() for p in model.parameters()}


@pytest.mark.parametrize("name", ["llama", "gpt2-without-dropout"])
def test_only_shadow_parameters_train_and_a_step_moves_them_as_peft_does(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    start = build(dt, case, shadow_dropout=0.0)
    start.save_pretrained(tmp_path / "start")
    base = case.factory()
    frozen = _base_parameters(base)
    ours = dt.PeftModel.from_pretrained(base, tmp_path / "start", is_trainable=True)
    theirs = peft.PeftModel.from_pretrained(case.factory(), tmp_path / "start", is_trainable=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    batch = case.inputs(ours, seed=2)
    for model in (ours, theirs):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        out = model(**batch)
        assert out.loss.requires_grad and not out.shadow_loss.requires_grad  # shadow_loss: a detached copy to log
        out.loss.backward()
        optimizer.step()
    for param in ours.parameters():
        if id(param) in frozen:
            assert not param.requires_grad and param.grad is None
            assert torch.equal(param, frozen[id(param)])
    after = saved(ours, tmp_path / "ours")
    before = load_file(tmp_path / "start/adapter_model.safetensors")
    expected = saved(theirs, tmp_path / "theirs")
    assert after.keys() == expected.keys()
    for key in after:
        torch.testing.assert_close(after[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    # every block's injection and the backbone learn (the last block's update feeds nothing, in peft as well)
    assert any("layers.0.shadow_update_gate" in k or "h.0.shadow_update_gate" in k for k in moved)
    assert any(".shadow_up." in k for k in moved) and any(".shadow_backbone." in k for k in moved)


@pytest.mark.parametrize("kwargs", [{}, dict(gradient_checkpointing_kwargs={"use_reentrant": False})],
                         ids=["default", "non-reentrant"])
@pytest.mark.parametrize("name", ["llama", "gpt2-without-dropout"])
def test_gradient_checkpointing_gives_the_same_gradients(name: str, kwargs: dict) -> None:
    case = CASES[name]
    model = build(dt, case, shadow_dropout=0.0)
    batch = case.inputs(model, seed=4)

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable(**kwargs)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


# -------------------------------------------------------------------------------------------------------- generate
def _prompt(model: nn.Module, seed: int = 7) -> Batch:
    batch = make_causal_lm_inputs(model, batch=2, seq=5, seed=seed)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _greedy(model: nn.Module, prompt: Batch, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=6, do_sample=False, **kwargs)


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-projected"])
def test_cached_generate_equals_a_loop_of_full_forwards(name: str) -> None:
    case = CASES[name]
    model = build(dt, case)
    prompt = _prompt(model)
    generated = _greedy(model, prompt)
    assert generated.shape == (2, 11)  # no early stop, so every step is compared
    ids = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            next_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, -1]
            ids = torch.cat([ids, next_logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)
    assert not torch.equal(generated, _greedy(case.factory(), prompt))  # the adapter changes what is generated


#: transformers 5.25 (not 5.13) names the forward's KV-cache argument ``cache``, still taking ``past_key_values``
#: (deprecated): both must reach the shadow backbone's past, or a hand-written decoding loop is silently wrong
_TAKES_CACHE = "cache" in inspect.signature(LlamaForCausalLM.forward).parameters


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_a_decoding_loop_passing_the_cache_back_equals_full_forwards(argument: str) -> None:
    if argument == "cache" and not _TAKES_CACHE:
        pytest.skip("this transformers takes the cache as past_key_values only")
    model = build(dt, LLAMA)
    ids = _prompt(model)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(3):
            step = out.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, step], dim=1)
            cache = getattr(out, "cache", None) or out.past_key_values
            out = model(input_ids=step, use_cache=True, **{argument: cache})
            close(out.logits[:, -1], model(input_ids=ids, use_cache=False).logits[:, -1])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_beam_search_and_left_padded_generate_equal_peft(name: str, tmp_path: Path) -> None:
    # peft's generate without the cache is the oracle: with transformers 5 generate hands the cache over as
    # ``cache=``, which peft 0.21.2's shadow hook does not read, so its shadow backbone decodes each new token alone
    case = CASES[name]
    theirs = build(peft, case, seed=2)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(case.factory(), tmp_path)
    prompt = _prompt(ours, seed=8)
    beams = _greedy(ours, prompt, num_beams=2)
    assert torch.equal(beams, _greedy(theirs, prompt, num_beams=2, use_cache=False))
    assert not torch.equal(beams, _greedy(case.factory(), prompt, num_beams=2))
    # two prompts of different lengths, the shorter left-padded
    padded = {k: v.clone() for k, v in prompt.items()}
    padded["input_ids"][1, :2] = 0
    padded["attention_mask"][1, :2] = 0
    expected = _greedy(theirs, padded, use_cache=False)
    assert torch.equal(_greedy(ours, padded), expected)
    assert torch.equal(_greedy(ours, padded, use_cache=False), expected)


# ------------------------------------------------------------------------------------------------------- bad input
def _refused(factory: Callable[[], nn.Module], match: str, **kwargs: Any) -> None:
    """Building the adapter (config or model) raises an error matching ``match`` and leaves the model unchanged."""
    model = factory()
    before = state_of(model)
    with pytest.raises(REFUSED, match=match):
        dt.get_peft_model(model, dt.ShadowConfig(**kwargs))
    assert_state_is(model, before)
    assert all(not name.endswith("base_layer") for name, _ in model.named_modules())


def test_zero_rank_is_refused_and_the_model_kept() -> None:
    _refused(tiny_llama, r"(?i)\br\b|`r`|rank", task_type="CAUSAL_LM", r=0)


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(layers_to_transform=[0, 2]), id="layers_to_transform"),
    pytest.param(dict(target_modules=["model.layers.0", "model.layers.2"]), id="target_modules"),
])
def test_a_gap_between_adapted_blocks_is_refused(kwargs: dict) -> None:
    # the shadow state rides the decoder loop from the first adapted block to the last: the blocks must be adjacent
    _refused(tiny_llama_3_layers, r"(?i)contiguous|consecutive|adjacent|gap", task_type="CAUSAL_LM", r=4, **kwargs)


def test_an_encoder_decoder_model_is_refused() -> None:
    _refused(tiny_t5, r"(?i)decoder|encoder|seq_?2_?seq|t5", task_type="SEQ_2_SEQ_LM", r=4)


@pytest.mark.parametrize("override", ["shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                                      "shadow_intermediate_size"])
def test_mirror_overrides_with_a_named_shadow_model_are_refused(override: str) -> None:
    with pytest.raises(REFUSED, match=override):
        dt.ShadowConfig(task_type="CAUSAL_LM", shadow_model="some/shadow-checkpoint", **{override: 2})


@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_merging_is_refused_and_the_adapter_kept(merge: str) -> None:
    model = build(dt, LLAMA)
    batch = LLAMA.inputs(model)
    expected = run(model, batch)
    with pytest.raises(REFUSED, match=r"(?i)merg"):
        getattr(model, merge)()
    assert_same_outputs(run(model, batch), expected)


# ------------------------------------------------------------------------------------------------ classification
def test_classification_shadow_head_starts_as_a_copy_of_the_score_head(tmp_path: Path) -> None:
    case = CASES["llama-seq-cls"]
    tensors = saved(dt.get_peft_model(case.factory(), case.config(dt)), tmp_path)
    score = case.factory().score.weight
    assert torch.equal(tensors["base_model.shadow_head.default.weight"], score)
    assert torch.equal(tensors["base_model.model.score.weight"], score)  # the trained classifier is saved too


def test_classification_of_a_padded_row_equals_peft(tmp_path: Path) -> None:
    # both heads read the last real token: the base's by pad id, the shadow head's by the attention mask
    case = CASES["llama-seq-cls"]
    theirs = build(peft, case, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(case.factory(), tmp_path)
    batch = case.inputs(ours, seed=4)
    unpadded = run(ours, batch)
    batch["input_ids"][1, -2:] = 0
    batch["attention_mask"][1, -2:] = 0
    expected = run(theirs, batch)
    assert_same_outputs(run(ours, batch), expected)
    assert (expected.logits[1] - unpadded.logits[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- more of the API
def test_inputs_embeds_give_the_same_output_as_input_ids() -> None:
    model = build(dt, LLAMA)
    batch = LLAMA.inputs(model)
    embeds = model.get_base_model().get_input_embeddings()(batch.pop("input_ids")).detach()
    expected = run(model, {**batch, "input_ids": LLAMA.inputs(model)["input_ids"]})
    assert_same_outputs(run(model, {**batch, "inputs_embeds": embeds}), expected)


def test_the_tuner_level_forward_is_the_same_model() -> None:
    # peft users also call model.base_model(...) (the tuner): it runs the shadow path and adds the auxiliary loss too
    model = build(dt, LLAMA)
    batch = LLAMA.inputs(model)
    assert_same_outputs(run(model.base_model, batch), run(model, batch))
    with model.disable_adapter():
        plain = run(model.base_model, batch)
    assert getattr(plain, "shadow_loss", None) is None and model.base_model.last_shadow_loss is None


def test_shadow_dropout_acts_in_training_only() -> None:
    model = build(dt, LLAMA, shadow_dropout=0.5)
    batch = LLAMA.inputs(model)
    evaluated = run(model, batch).logits
    model.train()
    torch.manual_seed(0)
    first = run(model, batch).logits
    torch.manual_seed(1)
    assert (run(model, batch).logits - first).abs().max() > 1e-4  # a fresh mask per call
    assert (first - evaluated).abs().max() > 1e-4
    still = build(dt, LLAMA, shadow_dropout=0.0).train()  # the tiny Llama has no dropout of its own
    close(run(still, batch).logits, run(still.eval(), batch).logits)


def test_two_adapters_switch_and_each_equals_peft_while_a_mixed_batch_is_refused(tmp_path: Path) -> None:
    ours = build(dt, LLAMA)
    ours.add_adapter("deep", LLAMA.config(dt, init_weights=False, shadow_alpha=0.7, shadow_num_hidden_layers=2))
    ours.eval().save_pretrained(tmp_path)  # (the new adapter's dropout may start in training mode, as in peft)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "deep", adapter_name="deep")
    batch = LLAMA.inputs(ours)
    outputs = {}
    for name in ("deep", "default"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        outputs[name] = run(ours, batch)
        assert_same_outputs(outputs[name], run(theirs, batch))
    assert (outputs["deep"].logits - outputs["default"].logits).abs().max() > 1e-3
    with pytest.raises(REFUSED, match=r"(?i)adapter_names|shadow"):
        run(ours, batch, adapter_names=["default", "deep"])
    assert_same_outputs(run(ours, batch), outputs["default"])


# ----------------------------------------------------------------------------------------------------- unload_shadow
@pytest.mark.parametrize("name", ["llama", "llama-projected"])
def test_unloaded_shadow_model_is_the_base_head_on_the_shadow_state(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = build(dt, case)
    batch = case.inputs(model, seed=6)
    composed = run(model, batch)
    reference = reference_for(model, case, tmp_path)
    standalone = model.base_model.unload_shadow()
    out = run(standalone, batch)
    with torch.no_grad():
        close(out.logits, reference.base.get_output_embeddings()(reference.initial_state(batch)))
    close(out.loss, composed.shadow_loss)
    assert_same_outputs(run(model, batch), composed)  # the composed model still works
    # a standalone causal LM: cached greedy decoding equals a loop of its full forwards
    prompt = _prompt(model)
    generated = _greedy(standalone, prompt)
    ids = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(generated.shape[1] - ids.shape[1]):
            next_logits = standalone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            ids = torch.cat([ids, next_logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.shape == (2, 11) and torch.equal(generated, ids)


def test_unload_shadow_shares_modules_unless_copied(tmp_path: Path) -> None:
    model = build(dt, LLAMA)
    batch = LLAMA.inputs(model)
    shared = model.base_model.unload_shadow()
    copied = model.base_model.unload_shadow(copy=True)
    before = run(copied, batch).logits
    close(run(shared, batch).logits, before)
    randomize(model, seed=9)  # "train" the composed model further
    assert torch.equal(run(copied, batch).logits, before)
    assert (run(shared, batch).logits - before).abs().max() > 1e-3
    # the copy is complete: its saved state, the embedding table included, reproduces it in a fresh copy
    copied.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    other = build(dt, LLAMA, seed=5).base_model.unload_shadow(copy=True)
    assert (run(other, batch).logits - before).abs().max() > 1e-3
    other.load_state_dict(state, strict=True)
    close(run(other, batch).logits, before)


def test_peft_attributes_of_the_shadow_network_and_the_unloaded_model() -> None:
    # what peft users reach for: base_model.shadow_backbone / shadow_projection / shadow_head per adapter, and the
    # unloaded model's backbone / shadow_hidden_projection / head
    case = CASES["llama-projected"]
    ours, theirs = build(dt, case), build(peft, case)
    for container in ("shadow_backbone", "shadow_projection"):
        mine, peers = getattr(ours.base_model, container)["default"], getattr(theirs.base_model, container)["default"]
        assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in peers.state_dict().items()}
    standalone = ours.base_model.unload_shadow()
    assert standalone.backbone is ours.base_model.shadow_backbone["default"]
    assert standalone.shadow_hidden_projection is ours.base_model.shadow_projection["default"]
    assert standalone.head is ours.get_base_model().get_output_embeddings()
    classifier = build(dt, CASES["llama-seq-cls"])
    assert torch.equal(classifier.base_model.shadow_head["default"].weight,
                       load_file_of(classifier)["base_model.shadow_head.default.weight"])


def test_two_active_shadow_adapters_are_refused() -> None:
    model = build(dt, LLAMA)
    model.add_adapter("other", LLAMA.config(dt, init_weights=False))
    batch = LLAMA.inputs(model)
    expected = run(model.eval(), batch)
    with pytest.raises(REFUSED, match=r"(?i)one|single|exactly"):
        model.set_adapter(["default", "other"])
    assert_same_outputs(run(model, batch), expected)
