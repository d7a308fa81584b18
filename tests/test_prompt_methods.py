"""Prompt methods (prompt tuning, P-tuning, prefix tuning): the shared plumbing in ``deltatune.prompt``.

The central, un-fakeable check: greedy tokens from ``generate()`` with the KV cache equal the tokens of a hand-written
loop that re-runs the full forward (no cache) at every step, for every method on Llama (GQA), GPT-2 and T5, also for
a left-padded batch. Beam search is checked the same way (its scores are recomputed from full forwards). Interop
tests load peft-saved adapters and the reverse (peft 0.21.2 is the oracle, never imported by deltatune).
"""

from __future__ import annotations

import inspect

import warnings
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune import (
    AdapterLoadError,
    AdapterStateError,
    ConfigError,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from deltatune.prefix import split_prefix
from deltatune.prompt import PromptTable
from tests.models import (
    make_causal_lm_inputs,
    make_qa_inputs,
    make_seq2seq_inputs,
    make_seq_cls_inputs,
    make_token_cls_inputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

T = 3  # virtual tokens everywhere


# --- what the tests run over ----------------------------------------------------------------------------------------

def _config(lib, method: str, task_type: str):
    """The same adapter config from deltatune or peft (``lib`` is either module)."""
    if method == "prompt_tuning":
        return lib.PromptTuningConfig(task_type=task_type, num_virtual_tokens=T)
    if method == "p_tuning":
        return lib.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=T, encoder_hidden_size=16)
    if method == "p_tuning_lstm":
        return lib.PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=T, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
        )
    if method == "prefix_tuning":
        return lib.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=T)
    if method == "prefix_projection":
        return lib.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=16
        )
    raise AssertionError(method)


def _deltatune():
    import deltatune

    return deltatune


METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning"]
ALL_METHODS = [*METHODS, "p_tuning_lstm", "prefix_projection"]


def _lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the tiny model's matrices with a larger scale: with the factories' 0.02 init, GPT-2 and T5 emit one
    token forever and greedy comparisons would prove little. Deterministic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 2.0 / param.shape[-1] ** 0.5)
    return model


GEN_FAMILIES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama": (lambda: _lively(tiny_llama()), "CAUSAL_LM"),
    "gpt2": (lambda: _lively(tiny_gpt2()), "CAUSAL_LM"),
    "t5": (lambda: _lively(tiny_t5(), seed=3), "SEQ_2_SEQ_LM"),
}

ALL_FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, Callable]] = {
    "llama": (tiny_llama, "CAUSAL_LM", make_causal_lm_inputs),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", make_causal_lm_inputs),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", make_seq2seq_inputs),
    "bert_seq_cls": (lambda: tiny_bert("seq_cls"), "SEQ_CLS", make_seq_cls_inputs),
    "bert_token_cls": (lambda: tiny_bert("token_cls"), "TOKEN_CLS", make_token_cls_inputs),
}


def _make(family: str, method: str, seed: int = 1):
    factory, task, make_inputs = ALL_FAMILIES[family]
    torch.manual_seed(seed)
    model = get_peft_model(factory(), _config(_deltatune(), method, task))
    return model, factory, make_inputs(model)


def _gen_inputs(model, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 prompts of 5 tokens; ``padded``: the second is left-padded by 2."""
    ids = make_causal_lm_inputs(model, batch=2, seq=5)["input_ids"]
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def _reference_greedy(model, ids, mask, steps: int, encoder_decoder: bool, positions: bool = False,
                      **call) -> torch.Tensor:
    """Greedy decoding by re-running the full forward, without any cache, at every step."""
    if encoder_decoder:
        start = model.get_base_model().config.decoder_start_token_id
        dec = torch.full((ids.shape[0], 1), start, dtype=torch.long)
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False, **call).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return dec
    for _ in range(steps):
        if positions:
            call["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **call).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], dim=1), torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def _until_eos(row: torch.Tensor, start: int, eos: int) -> list[int]:
    """The generated tokens of ``row`` from ``start`` up to and including the first EOS."""
    out = []
    for token in row[start:].tolist():
        out.append(token)
        if token == eos:
            break
    return out


# --- (a) generation: cached generate() == repeated full forwards ------------------------------------------------------

def _check_cached_equals_loop(model, encoder_decoder: bool, padded: bool, positions: bool = False, **call) -> None:
    """Greedy ``generate()`` with the KV cache equals :func:`_reference_greedy` and differs from the base model;
    ``call``: extra arguments for every forward and ``generate()`` (``task_ids``); ``positions``: the loop passes
    the position ids ``generate()`` derives from the mask (a layer adapter's forward is the model's own, which
    counts left padding as positions)."""
    ids, mask = _gen_inputs(model, padded)
    eos = model.get_base_model().generation_config.eos_token_id
    steps = 8
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **call)
        reference = _reference_greedy(model, ids, mask, steps, encoder_decoder, positions, **call)
        with model.disable_adapter():
            base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **call)
    start = 1 if encoder_decoder else ids.shape[1]
    new_tokens = []
    for row in range(ids.shape[0]):
        got = _until_eos(generated[row], start, eos)
        want = _until_eos(reference[row], start, eos)
        assert got == want[: len(got)] and (len(got) == steps or got[-1] == eos), (row, got, want)
        new_tokens.append(got)
    assert any(len(set(tokens)) > 2 for tokens in new_tokens), f"the tiny model repeats itself: {new_tokens}"
    assert not torch.equal(generated, base), "the prompt had no effect on generation (dropped?)"


@pytest.mark.parametrize("family", sorted(GEN_FAMILIES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_greedy_generate_equals_full_forward_loop(family, method, padded):
    factory, task = GEN_FAMILIES[family]
    torch.manual_seed(0)
    model = get_peft_model(factory(), _config(_deltatune(), method, task))
    _check_cached_equals_loop(model, task == "SEQ_2_SEQ_LM", padded)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_adaption_prompt_cached_generate_equals_full_forward_loop(family, padded):
    """The gated prompt attention sits inside the top layers' attention, outside the cache: the invariant holds."""
    factory, task = GEN_FAMILIES[family]
    torch.manual_seed(0)
    model = get_peft_model(factory(), _deltatune().AdaptionPromptConfig(task_type=task, adapter_len=T,
                                                                        adapter_layers=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(1.0)  # zero-init gates would leave generation at the base model's
    _check_cached_equals_loop(model, False, padded, positions=True)


@pytest.mark.parametrize("family", sorted(GEN_FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_beam_search_scores_equal_full_forward_and_sampling_is_deterministic(family, method):
    factory, task = GEN_FAMILIES[family]
    torch.manual_seed(0)
    model = get_peft_model(factory(), _config(_deltatune(), method, task))
    encoder_decoder = task == "SEQ_2_SEQ_LM"
    ids, mask = _gen_inputs(model, padded=False)
    ids, mask = ids[:1], mask[:1]
    beams = 3
    eos = model.get_base_model().generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams, max_new_tokens=5,
            length_penalty=0.0, return_dict_in_generate=True, output_scores=True,
        )
        seqs = out.sequences  # (beams, L)
        # Recompute every beam's log-probability with full forwards (no cache) through the adapter.
        if encoder_decoder:
            logits = model(input_ids=ids.expand(beams, -1), attention_mask=mask.expand(beams, -1),
                           decoder_input_ids=seqs[:, :-1]).logits
            targets, start = seqs[:, 1:], 1
        else:
            full_mask = torch.ones_like(seqs)
            logits = model(input_ids=seqs, attention_mask=full_mask).logits[:, -seqs.shape[1]:]
            logits, targets, start = logits[:, ids.shape[1] - 1: -1], seqs[:, ids.shape[1]:], ids.shape[1]
        logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row in range(beams):
            n = len(_until_eos(seqs[row], start, eos))
            assert logprobs[row, :n].sum().item() == pytest.approx(out.sequences_scores[row].item(), abs=1e-4)
        torch.manual_seed(123)
        first = model.generate(input_ids=ids, do_sample=True, max_new_tokens=4)
        torch.manual_seed(123)
        second = model.generate(input_ids=ids, do_sample=True, max_new_tokens=4)
        without_cache = model.generate(input_ids=ids, max_new_tokens=4, use_cache=False)
        with_cache = model.generate(input_ids=ids, max_new_tokens=4)
    assert torch.equal(first, second)
    assert torch.equal(without_cache, with_cache)


@pytest.mark.parametrize("method", METHODS)
def test_continuing_from_a_returned_cache_equals_full_forward(method):
    """A manual decoding loop (forward, then forward of the next token with the returned cache) sees the prompt once."""
    torch.manual_seed(0)
    model = get_peft_model(_lively(tiny_llama()), _config(_deltatune(), method, "CAUSAL_LM"))
    ids, mask = _gen_inputs(model, padded=True)
    nxt = torch.tensor([[5], [6]])
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        step = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=cache)
        full = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_continuing_with_explicit_positions_equals_full_forward(method):
    """Explicit position ids count real tokens only, in the first call and in the continuing one: both shift past the
    prompt already in the cache, whether it is a prefix or the virtual tokens of the first call."""
    torch.manual_seed(0)
    model = get_peft_model(_lively(tiny_llama()), _config(_deltatune(), method, "CAUSAL_LM"))
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    nxt, mask = torch.tensor([[5], [6]]), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask[:, :4], position_ids=torch.arange(4).expand(2, 4),
                      use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        step = model(input_ids=nxt, attention_mask=mask, position_ids=torch.tensor([[4], [4]]), cache=cache)
        full = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_prefix_is_never_dropped_silently():
    """A model whose forward takes a cache but ignores it must raise, not quietly compute the base model."""

    class IgnoresCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)

        def forward(self, input_ids=None, attention_mask=None, cache=None):
            return self.embed(input_ids)

    config = PrefixTuningConfig(num_virtual_tokens=2, num_layers=1, token_dim=8, num_attention_heads=2)
    model = get_peft_model(IgnoresCache(), config)
    with pytest.raises(AdapterStateError, match="did not use the key/value prefix"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def _llama_with_cache_argument_named(name: str) -> type:
    """A Llama whose forward calls its cache argument ``name`` and hands it on under the installed transformers'
    own name, whichever that is."""
    from transformers import LlamaForCausalLM

    native = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs[native] = kwargs.pop(name, None)
        return LlamaForCausalLM.forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    forward.__signature__ = inspect.Signature([
        inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None if p != "self" else inspect._empty)
        for p in ("self", "input_ids", "attention_mask", name, "position_ids", "inputs_embeds", "labels", "use_cache")
    ] + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    return type(f"LlamaWith_{name}", (LlamaForCausalLM,), {"forward": forward})


@pytest.mark.parametrize("argument", ["past_key_values", "cache"])
def test_the_cache_argument_name_is_read_from_the_forward_signature(argument):
    """transformers before 5.24 names the cache argument ``past_key_values``, 5.24 on ``cache``; either gets the
    prefix, on any installed version."""
    renamed = _llama_with_cache_argument_named(argument)

    def build(cls):
        reference = tiny_llama()
        model = cls(reference.config).eval()
        model.load_state_dict(reference.state_dict())
        torch.manual_seed(5)
        return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))

    old, new = build(renamed), build(type(tiny_llama()))
    ids, mask = _gen_inputs(new, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(old(input_ids=ids, attention_mask=mask).logits,
                                   new(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
        with old.disable_adapter():
            base = old(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base, new(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("method", METHODS)
def test_nothing_leaks_into_later_calls(method):
    torch.manual_seed(0)
    model = get_peft_model(_lively(tiny_llama()), _config(_deltatune(), method, "CAUSAL_LM"))
    ids, mask = _gen_inputs(model, padded=True)
    base = model.get_base_model()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2)
        after = model(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    fresh = _lively(tiny_llama())
    with torch.no_grad():
        assert torch.equal(plain, fresh(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(before, after)
    assert not base._forward_pre_hooks and not base._forward_hooks


# --- (b) interop with peft ------------------------------------------------------------------------------------------

INTEROP = {"llama": (tiny_llama, "CAUSAL_LM", make_causal_lm_inputs), "t5": (tiny_t5, "SEQ_2_SEQ_LM", make_seq2seq_inputs),
           "bert_seq_cls": ALL_FAMILIES["bert_seq_cls"]}


def _interop_cases():
    for family in ("llama", "t5"):
        for method in [*METHODS, "prefix_projection"]:
            yield family, method
    yield "bert_seq_cls", "prompt_tuning"  # the classifier head travels as base_model.classifier.*
    yield "bert_seq_cls", "p_tuning"


def _perturb_heads(model) -> None:
    """Make trained-head copies differ from the base model's head, so the test sees whether they load."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))


@pytest.mark.parametrize("family,method", list(_interop_cases()))
def test_peft_saved_adapter_loads_with_same_outputs(family, method, tmp_path):
    peft = pytest.importorskip("peft")
    factory, task, make_inputs = INTEROP[family]
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(), _config(peft, method, task))
    _perturb_heads(theirs)
    inputs = make_inputs(theirs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft passes the deprecated past_key_values
        want = theirs(**inputs).logits
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(factory(), tmp_path)
    with torch.no_grad():
        got = ours(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.adapter_state_dict().items()} == {k: v.shape for k, v in saved.items()}


@pytest.mark.parametrize("family,method", list(_interop_cases()))
def test_deltatune_saved_adapter_loads_in_peft_with_same_outputs(family, method, tmp_path):
    peft = pytest.importorskip("peft")
    factory, task, make_inputs = INTEROP[family]
    torch.manual_seed(4)
    ours = get_peft_model(factory(), _config(_deltatune(), method, task))
    _perturb_heads(ours)
    inputs = make_inputs(ours)
    with torch.no_grad():
        want = ours(**inputs).logits
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(factory(), tmp_path)
        with torch.no_grad():
            got = theirs(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # peft saves the same keys with the same shapes
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(factory(), _config(peft, method, task))
        reference.save_pretrained(tmp_path / "peft")
    theirs_keys = {k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    ours_keys = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert ours_keys == theirs_keys


def test_prefix_layout_matches_peft_facts():
    """GQA: the prefix has key/value width (2 kv heads × 8) per layer; T5 decoder layer i reads block 2i mod L."""
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    assert model.adapter_state_dict()["prompt_embeddings"].shape == (T, 2 * 2 * 16)
    table = torch.arange(T * 4 * 4, dtype=torch.float).view(T, 16)  # L=2, token_dim=4 (2 heads × 2)
    cfg = PrefixTuningConfig(num_virtual_tokens=T, num_layers=2, token_dim=4, num_attention_heads=2)
    decoder_only = split_prefix(table, cfg, encoder_decoder=False)
    encoder_decoder = split_prefix(table, cfg, encoder_decoder=True)
    assert torch.equal(decoder_only[1][0], table[:, 8:12].view(T, 2, 2).transpose(0, 1))  # layer 1 key
    assert torch.equal(encoder_decoder[1][0], decoder_only[0][0])  # peft's seq2seq pairing


# --- (c) the matrix: round trip, training, gradients, disabling -----------------------------------------------------

MATRIX = [(f, m) for f in sorted(ALL_FAMILIES) for m in METHODS] + [("llama", "p_tuning_lstm"), ("t5", "prefix_projection")]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family,method", MATRIX)
def test_save_load_round_trip(family, method, tmp_path):
    model, factory, inputs = _make(family, method)
    _perturb_heads(model)
    want = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(factory(), tmp_path)
    assert torch.equal(_logits(loaded, inputs), want)
    assert not any(p.requires_grad for p in loaded.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reparameterised encoder continues as a plain table (warned)
        trainable = PeftModel.from_pretrained(factory(), tmp_path, is_trainable=True)
    assert torch.equal(_logits(trainable, inputs), want)
    assert isinstance(trainable.prompt_encoder["default"], PromptTable)
    assert any(p.requires_grad for p in trainable.prompt_encoder.parameters())


@pytest.mark.parametrize("family,method", MATRIX)
def test_training_lowers_loss_and_only_prompt_and_head_get_gradients(family, method):
    model, _, inputs = _make(family, method)  # eval mode: no dropout, so the loss curve is deterministic
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        if not losses:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    head = {n for n in with_grad if ".modules_to_save.default." in n}
    prompt = {n for n in with_grad if n.startswith("prompt_encoder.default.")}
    assert prompt and with_grad == prompt | head
    assert bool(head) == family.startswith("bert")  # SEQ_CLS / TOKEN_CLS train and save the classifier


@pytest.mark.parametrize("family,method", MATRIX)
def test_disable_adapter_gives_base_output(family, method):
    model, factory, inputs = _make(family, method)
    with model.disable_adapter():
        disabled = _logits(model, inputs)
    assert torch.equal(disabled, _logits(factory(), inputs))
    assert not torch.equal(_logits(model, inputs)[..., -disabled.shape[-2]:, :] if disabled.dim() == 3
                           else _logits(model, inputs), disabled)


def test_embedding_methods_pad_labels_and_extend_inputs():
    """Causal LM and token classification: the output has T extra leading positions whose labels are -100."""
    model, _, inputs = _make("bert_token_cls", "prompt_tuning")
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    out = model(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] + T
    manual = torch.nn.functional.cross_entropy(out.logits[:, T:].reshape(-1, out.logits.shape[-1]),
                                               inputs["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_span_labels_shift_and_explicit_positions_are_kept():
    """QA start/end positions index the output, which has T leading virtual positions; explicit position ids give
    the same result as the default ones."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert("qa"), PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=T))
    inputs = make_qa_inputs(model)
    out = model(**inputs)
    ce = torch.nn.functional.cross_entropy
    want = (ce(out.start_logits, inputs["start_positions"] + T) + ce(out.end_logits, inputs["end_positions"] + T)) / 2
    torch.testing.assert_close(out.loss, want)
    for method in METHODS:
        model, _, inputs = _make("llama", method)
        positions = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
        torch.testing.assert_close(_logits(model, {**inputs, "position_ids": positions}), _logits(model, inputs))
        ids = inputs["input_ids"]
        assert torch.equal(model.generate(input_ids=ids, position_ids=positions, max_new_tokens=3),
                           model.generate(input_ids=ids, max_new_tokens=3))


# --- initialisation -------------------------------------------------------------------------------------------------

def _tiny_tokenizer(path) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 5, "the": 6, "review": 7}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def test_text_init_uses_the_text_token_embeddings(tmp_path):
    path = _tiny_tokenizer(tmp_path / "tok")
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="classify the review", tokenizer_name_or_path=path)
    model = get_peft_model(tiny_llama(), config)
    words = model.get_base_model().get_input_embeddings().weight[[5, 6, 7, 5, 6]]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, words)


def test_sample_vocab_init_uses_vocabulary_rows():
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")
    model = get_peft_model(tiny_llama(), config)
    vocab = model.get_base_model().get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert (vocab == row).all(-1).any()


# --- (e) bad input --------------------------------------------------------------------------------------------------

class _NoCacheNoEmbeds(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def test_model_without_cache_argument_is_refused_for_prefix_tuning():
    config = PrefixTuningConfig(num_virtual_tokens=2, num_layers=1, token_dim=8, num_attention_heads=2)
    with pytest.raises(ConfigError, match="_NoCacheNoEmbeds.*KV cache"):
        get_peft_model(_NoCacheNoEmbeds(), config)


def test_model_without_inputs_embeds_is_refused_for_prompt_tuning():
    config = PromptTuningConfig(num_virtual_tokens=2, num_layers=1, token_dim=8, num_attention_heads=2)
    with pytest.raises(ConfigError, match="_NoCacheNoEmbeds.*inputs_embeds"):
        get_peft_model(_NoCacheNoEmbeds(), config)


@pytest.mark.parametrize("method", METHODS)
def test_too_many_positions_is_a_clear_error(method):
    model = get_peft_model(tiny_gpt2(), _config(_deltatune(), method, "CAUSAL_LM"))  # 128 positions
    ids = torch.full((1, 126), 5)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        model(input_ids=ids)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        model.generate(input_ids=ids[:, :100], max_new_tokens=30)
    with pytest.raises(ConfigError, match="leaves no room"):
        get_peft_model(tiny_gpt2(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=128))


def test_text_init_needs_a_tokenizer_and_a_text_that_tokenizes(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="x")
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="", tokenizer_name_or_path=_tiny_tokenizer(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="gives no tokens"):
        get_peft_model(tiny_llama(), config)


@pytest.mark.parametrize("method", METHODS)
def test_merging_a_prompt_adapter_is_refused(method):
    model = get_peft_model(tiny_llama(), _config(_deltatune(), method, "CAUSAL_LM"))
    with pytest.raises(AdapterStateError, match="prompt methods have no weights to merge"):
        model.merge_and_unload()
    with pytest.raises(AdapterStateError, match="prompt methods have no weights to merge"):
        model.merge_adapter()


def test_other_misuse_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ConfigError, match="builds its own cache"):
        from transformers import DynamicCache

        model.generate(input_ids=ids, cache=DynamicCache())
    with pytest.raises(AdapterStateError, match="adapter_names"):
        model(input_ids=ids, adapter_names=["default"])
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T))
    with pytest.raises(AdapterStateError, match="cannot be combined"):
        model.set_adapter(["default", "other"])
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig()
    model.save_pretrained(tmp_path)
    other = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T + 1))
    other.save_pretrained(tmp_path / "longer")
    with pytest.raises(AdapterLoadError, match="shape mismatch for 'prompt_embeddings'"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "longer", config=model.peft_config["default"])


def test_generic_wrapper_pads_per_token_labels_like_the_causal_lm_wrapper() -> None:
    """Without a task_type the generic PeftModel still feeds the virtual tokens; labels shaped like the input get
    -100 over them, as the causal-LM wrapper does, instead of a length mismatch inside the model."""
    config = dict(num_virtual_tokens=3, prompt_tuning_init="RANDOM")
    torch.manual_seed(0)
    generic = get_peft_model(tiny_llama(), PromptTuningConfig(**config))
    torch.manual_seed(0)
    causal = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", **config))
    assert type(generic) is PeftModel
    batch = make_causal_lm_inputs(generic)
    with torch.no_grad():
        torch.testing.assert_close(generic(**batch).loss, causal(**batch).loss)
