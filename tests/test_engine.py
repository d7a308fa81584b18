"""The serving engine (continuous batching): every answer against the library's own computation — greedy tokens
against ``PeftModel.generate`` and a loop of full forwards without a cache, logprobs against the log-softmax of a full
forward — and the scheduling claims (a short request overtakes a long one, cancelling frees the rows and the cache)
on step counts, never on wall time."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deltatune import IA3Config, LoraConfig, get_peft_model
from deltatune.engine import Engine, EngineClosed, QueueFull, Request
from deltatune.errors import DeltatuneError
from deltatune.rows import RowPlan
from deltatune.sampling import SamplingParams
from tests.models import tiny_t5
from tests.train_utils import vocab_size, write_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def _adapted(base: torch.nn.Module) -> torch.nn.Module:
    """``base`` with two random adapters of different methods, ``lora`` and ``ia3``, so each answers differently."""
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
                           adapter_name="lora")
    model.add_adapter("ia3", IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3" in name:
                p.uniform_(0.0, 3.0)
    return model.eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False, initializer_range=0.3)
    return _adapted(LlamaForCausalLM(config))


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size(), n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=EOS, pad_token_id=0, initializer_range=0.3, attn_implementation="eager")
    return _adapted(GPT2LMHeadModel(config))


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture
def engine(llama, tokenizer):
    engine = Engine(llama, tokenizer, max_batch_size=8).start()
    yield engine
    engine.close(drain=False)


PROMPTS = [[5, 9, 30, 12], [20, 7, 7, 31, 13, 26, 40, 11, 17], [33], [8, 21, 30]]
ADAPTERS = ["lora", "ia3", "__base__", "lora"]


def _full_forward_loop(model, prompt, adapter, steps, penalties=(1.0, 0.0, 0.0)) -> list[int]:
    """Greedy decoding by full forwards without a cache, penalties written out: repetition ``r`` over prompt and
    output (``l / r`` if ``l > 0`` else ``l * r``), then ``l -= count * frequency + (count > 0) * presence``."""
    rep, freq, pres = penalties
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), adapter_names=[adapter]).logits[0, -1].double()
        for t in set(ids):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= out.count(t) * freq + pres
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token == EOS:
            break
    return out


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_greedy_rows_of_mixed_adapters_equal_generate_and_the_full_forward_loop(make, tokenizer):
    model = make()
    engine = Engine(model, tokenizer, max_batch_size=4).start()
    try:
        lengths = [10, 3, 7, 12]  # rows leave at different steps; the last request joins when a row is free
        handles = [engine.submit(Request(p, a, SamplingParams(max_tokens=n, temperature=0)))
                   for p, a, n in zip(PROMPTS + [PROMPTS[1]], ADAPTERS + ["ia3"], lengths + [5])]
        outputs = [h.result(60).choices[0] for h in handles]
    finally:
        engine.close()
    assert max(engine.decode_sizes) == 4 and len(engine.prefill_sizes) >= 2
    for (prompt, adapter, n), out in zip(zip(PROMPTS + [PROMPTS[1]], ADAPTERS + ["ia3"], lengths + [5]), outputs):
        with torch.no_grad():
            ids = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                                 adapter_names=[adapter])[0, len(prompt):].tolist()
        assert out.token_ids == ids == _full_forward_loop(model, prompt, adapter, n)
        full = tokenizer.decode(prompt + ids, skip_special_tokens=True)  # the answer's text follows the prompt's
        assert out.text == full[len(tokenizer.decode(prompt, skip_special_tokens=True)):] and out.text[:1] in ("", " ")
        assert out.finish_reason == ("stop" if ids[-1] == EOS else "length")
    assert len({tuple(_full_forward_loop(model, PROMPTS[0], a, 6)) for a in ("lora", "ia3", "__base__")}) == 3


def test_penalties_equal_the_formula_in_a_full_forward_loop(engine, llama):
    cases = [(1.5, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 1.5), (0.8, -0.5, 0.3)]
    handles = [engine.submit(Request(PROMPTS[0], "lora", SamplingParams(
        max_tokens=12, temperature=0, repetition_penalty=r, frequency_penalty=f, presence_penalty=p)))
        for r, f, p in cases]
    got = [h.result(60).choices[0].token_ids for h in handles]
    want = [_full_forward_loop(llama, PROMPTS[0], "lora", 12, case) for case in cases]
    assert got == want
    assert len({tuple(w) for w in want}) > 1 and want[0] != _full_forward_loop(llama, PROMPTS[0], "lora", 12)


def test_logprobs_are_the_log_softmax_of_the_models_forward(engine, llama):
    prompt = PROMPTS[1]
    out = engine.submit(Request(prompt, "ia3", SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=3,
                                                              prompt_logprobs=2, ignore_eos=True))).result(60)
    choice = out.choices[0]
    ids = prompt + choice.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(llama(input_ids=torch.tensor([ids]), adapter_names=["ia3"]).logits[0].double(), -1)
    for pos, info in enumerate(choice.logprobs):  # generated token pos was predicted at len(prompt) + pos - 1
        row = lp[len(prompt) + pos - 1]
        assert info.token_id == ids[len(prompt) + pos]
        assert info.logprob == pytest.approx(float(row[info.token_id]), abs=1e-5)
        assert [t for t, _ in info.top] == row.topk(3).indices.tolist()
        assert [v for _, v in info.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j, info in enumerate(out.prompt_logprobs[1:], start=1):
        assert info.token_id == prompt[j] and info.logprob == pytest.approx(float(lp[j - 1, prompt[j]]), abs=1e-5)
        assert [t for t, _ in info.top] == lp[j - 1].topk(2).indices.tolist()


def test_a_seeded_request_samples_the_same_whatever_its_neighbours(engine):
    params = SamplingParams(n=2, max_tokens=10, temperature=1.3, top_k=20, seed=11, ignore_eos=True)
    alone = engine.submit(Request(PROMPTS[0], "lora", params)).result(60)
    hot = SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
    neighbours = [engine.submit(Request(p, a, hot)) for p, a in zip(PROMPTS[1:], ADAPTERS[1:])]
    next(iter(neighbours[0]))  # they are decoding: the seeded request joins a running batch of other rows
    crowded = engine.submit(Request(PROMPTS[0], "lora", params))
    second = engine.submit(Request(PROMPTS[0], "lora", SamplingParams(**{**vars(params), "n": 1, "seed": 12})))
    assert [c.token_ids for c in crowded.result(60).choices] == [c.token_ids for c in alone.choices]
    assert second.result(60).choices[0].token_ids == alone.choices[1].token_ids  # answer i of n uses seed + i
    assert alone.choices[0].token_ids != alone.choices[1].token_ids
    for h in neighbours:
        h.result(60)


def test_top_k_1_and_min_p_1_leave_only_the_most_likely_token(engine):
    greedy = engine.submit(Request(PROMPTS[3], "ia3", SamplingParams(max_tokens=8, temperature=0)))
    hot = [engine.submit(Request(PROMPTS[3], "ia3", SamplingParams(max_tokens=8, temperature=5.0, **knob)))
           for knob in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6})]
    want = greedy.result(60).choices[0].token_ids
    assert [h.result(60).choices[0].token_ids for h in hot] == [want] * 3
    loose = engine.submit(Request(PROMPTS[3], "ia3", SamplingParams(max_tokens=8, temperature=5.0, seed=0)))
    assert loose.result(60).choices[0].token_ids != want  # at that temperature, sampling without them wanders


def test_decode_steps_share_one_row_plan_while_the_rows_stay_the_same(llama, tokenizer, monkeypatch):
    # Grouping rows by adapter (and the stacked adapter weights memoised on the plan) is done once per batch
    # composition, not at every decode step.
    from deltatune import engine as engine_module

    plans = []
    monkeypatch.setattr(engine_module, "RowPlan", lambda names: plans.append(list(names)) or RowPlan(names))
    engine = Engine(llama, tokenizer, max_batch_size=4, batch_wait_ms=1000).start()
    try:
        handles = [engine.submit(Request(p, a, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
                   for p, a, n in zip(PROMPTS, ADAPTERS, [12, 12, 12, 5])]
        for h in handles:
            h.result(60)
    finally:
        engine.close()
    assert list(engine.prefill_sizes) == [4] and list(engine.decode_sizes) == [4] * 4 + [3] * 7
    assert plans == [ADAPTERS, ADAPTERS[:3]]  # one plan for 4 rows, a new one when the 5-token row left


def test_a_short_request_overtakes_a_long_one_submitted_earlier(engine):
    long = engine.submit(Request(PROMPTS[1], "lora", SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)))
    next(iter(long))
    short = engine.submit(Request(PROMPTS[2], "ia3", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    assert len(short.result(60).choices[0].token_ids) == 3
    assert len(long.result(60).choices[0].token_ids) == 80
    assert short.finish_step < long.finish_step - 60  # it left the batch after 3 of the long one's 80 steps


def test_stop_strings_across_token_boundaries_and_streamed_text(engine, tokenizer):
    plain = engine.submit(Request(PROMPTS[0], "lora", SamplingParams(max_tokens=10, temperature=0,
                                                                     ignore_eos=True))).result(60).choices[0]
    words = plain.text.split()  # the text starts with a space: the prompt is its context
    assert len(words) >= 4
    stop = f"{words[1][-1]} {words[2][:1]}"  # the last letter of one token, a space and the next token's first
    handle = engine.submit(Request(PROMPTS[0], "lora", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                                      stop=("never", stop))))
    events = list(handle)
    choice = handle.result().choices[0]
    assert choice.text == plain.text[: plain.text.index(stop)] == "".join(e.text for e in events)
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop) and events[-1].finish_reason == "stop"
    assert len(choice.token_ids) == 3  # it ended at the token that completed the stop string


def test_skip_special_tokens_false_keeps_them_in_the_text_but_not_the_ending_token(engine, tokenizer):
    def answer(adapter: str, **settings):
        params = SamplingParams(max_tokens=12, temperature=0, skip_special_tokens=False, **settings)
        return engine.submit(Request(PROMPTS[2], adapter, params)).result(60).choices[0]

    out = answer("lora", ignore_eos=True)  # this answer holds <pad> and </s> (ids 0 and 2)
    assert {0, EOS} <= set(out.token_ids)
    full = tokenizer.decode(PROMPTS[2] + out.token_ids, skip_special_tokens=False)
    assert out.text == full[len(tokenizer.decode(PROMPTS[2])):] and "<pad>" in out.text and "</s>" in out.text
    ended = answer("__base__")  # its first token is end-of-sequence, which ends the answer and adds no text
    assert ended.token_ids == [EOS] and ended.text == "" and ended.finish_reason == "stop"


def test_cancel_frees_the_rows_and_the_cache(engine):
    handle = engine.submit(Request(PROMPTS[1], "lora", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)))
    events = iter(handle)
    next(events)
    keys = engine.call(lambda: weakref.ref(engine._batch.cache.layers[0].keys)).result(30)
    handle.cancel()
    rest = list(events)
    assert rest[-1].finish_reason == "abort" and rest[-1].token_id is None
    assert handle.result(30).choices[0].finish_reason == "abort" and len(handle.choices[0].token_ids) < 100
    assert engine.call(lambda: (engine.running, engine.cache_tokens)).result(30) == (0, 0)
    gc.collect()
    assert keys() is None  # the cache tensors are gone, not just unused


def test_unloading_an_adapter_between_steps_fails_only_its_rows(tokenizer):
    model = _llama()
    engine = Engine(model, tokenizer, max_batch_size=4).start()
    try:
        long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        doomed, other = engine.submit(Request(PROMPTS[0], "ia3", long)), engine.submit(Request(PROMPTS[1], "lora", long))
        next(iter(doomed))
        engine.call(lambda: model.delete_adapter("ia3")).result(30)
        with pytest.raises(DeltatuneError, match="adapter 'ia3' was unloaded while generating"):
            doomed.result(30)
        reference = _full_forward_loop(model, PROMPTS[1], "lora", 30)  # up to its end-of-sequence
        assert other.result(30).choices[0].token_ids[: len(reference)] == reference
    finally:
        engine.close()


def test_a_full_queue_refuses_and_close_drains(llama, tokenizer):
    engine = Engine(llama, tokenizer, max_batch_size=2, max_queue=1).start()
    gate = threading.Event()
    engine.call(gate.wait)
    first = engine.submit(Request(PROMPTS[0], "lora", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        engine.submit(Request(PROMPTS[0], "lora", SamplingParams(max_tokens=4)))
    assert engine.queue_depth == 1
    gate.set()
    engine.close(drain=True)
    assert len(first.result(0).choices[0].token_ids) == 4
    with pytest.raises(EngineClosed):
        engine.submit(Request(PROMPTS[0], "lora"))


def test_bad_requests_and_models_are_refused(engine, tokenizer):
    with pytest.raises(DeltatuneError, match="no adapter 'nope'"):
        engine.submit(Request(PROMPTS[0], "nope"))
    with pytest.raises(DeltatuneError, match=f"from 0 to {vocab_size() - 1}"):
        engine.submit(Request([3, vocab_size()], "lora"))
    with pytest.raises(DeltatuneError, match="context of 128"):
        engine.submit(Request([3] * 128, "lora"))
    with pytest.raises(DeltatuneError, match="'n' is 9"):
        engine.submit(Request(PROMPTS[0], "lora", SamplingParams(n=9)))
    with pytest.raises(DeltatuneError, match="encoder-decoder"):
        Engine(tiny_t5(), tokenizer)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1, "'temperature' must be at least 0"), ("top_p", 0, "'top_p' must be in (0, 1]"),
    ("top_k", -2, "'top_k' must be -1, 0"), ("min_p", 1.5, "'min_p' must be in [0, 1]"),
    ("presence_penalty", 3, "'presence_penalty' must be in [-2, 2]"), ("repetition_penalty", 0, "greater than 0"),
    ("n", 0, "'n' must be at least 1"), ("max_tokens", True, "'max_tokens' must be an integer"),
    ("seed", 1.5, "'seed' must be an integer"), ("stop", "x", "'stop' must be a list"), ("stop", ("",), "empty"),
    ("logprobs", -1, "'logprobs' must be at least 0"), ("temperature", float("nan"), "finite"),
    ("skip_special_tokens", 1, "'skip_special_tokens' must be true or false"),
])
def test_sampling_params_refuse_bad_values_by_name(field, value, message):
    with pytest.raises(DeltatuneError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        SamplingParams(**{field: value})
