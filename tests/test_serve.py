"""``deltatune serve``: real HTTP requests against a tiny Llama with two adapters, each answer compared with
``PeftModel.generate`` run alone for that adapter (or the plain base model)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from deltatune.cli import build_parser, main
from deltatune.commands.serve import start
from deltatune.engine import Engine, Request
from deltatune.sampling import SamplingParams
from deltatune.serve import MAX_BODY_BYTES, Api, load_adapter
from tests.train_utils import write_llama

PROMPTS = {
    "sql": "review : the film was great sentiment ?",
    "chat": "the plot",
    "tiny": "a very dull movie and the acting was flat",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama directory and three adapters of it: two layer adapters of different methods (random, so that
    each answers differently from the base) and a prompt-learning one (which serving refuses)."""
    root = tmp_path_factory.mktemp("serve")
    llama = write_llama(root / "llama")
    configs = {
        "sql": LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
        "chat": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                          init_ia3_weights=False),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    }
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), config)
        if name == "chat":  # IA3's random init is close to 1; spread it so the answer changes
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.uniform_(0.0, 3.0)
        model.save_pretrained(root / name)
    return {"llama": llama, **{name: str(root / name) for name in configs}}


def _serve(argv: list[str]):
    served = start(build_parser().parse_args(["serve", "--port", "0", "--quiet", "--device", "cpu", *argv]))
    thread = threading.Thread(target=served.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    return served, thread


def _stop(served, thread) -> None:
    served.httpd.shutdown()
    thread.join()
    served.close()


@pytest.fixture(scope="module")
def server(files):
    served, thread = _serve(["--model", files["llama"], "--served-model-name", "tiny", "--adapter",
                             f"sql={files['sql']}", "--adapter", f"chat={files['chat']}", "--batch-wait-ms", "0"])
    yield served
    _stop(served, thread)


def request(served, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(served.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def complete(served, model: str, prompt, max_tokens: int = 8, **extra) -> dict:
    status, out = request(served, "/v1/completions",
                          {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert status == 200, out
    return out


def solo_run(files, adapter: str | None, prompt: str, max_tokens: int = 8,
             chat: bool = False) -> tuple[list[int], list[int]]:
    """Greedy answer of a fresh model for one prompt alone: ``PeftModel.generate`` with ``adapter`` active, or the
    plain transformers model; ``(prompt ids, answer ids up to and including end-of-sequence)``."""
    tok = AutoTokenizer.from_pretrained(files["llama"])
    model = AutoModelForCausalLM.from_pretrained(files["llama"]).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, files[adapter]).eval()
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


def solo_ids(files, adapter: str | None, prompt: str, max_tokens: int = 8, chat: bool = False) -> list[int]:
    return solo_run(files, adapter, prompt, max_tokens, chat)[1]


def solo(files, adapter: str | None, prompt: str, max_tokens: int = 8, chat: bool = False) -> str:
    """The solo answer's text as vLLM gives it: the text of prompt and answer together, after the prompt's text (the
    word-level test tokenizer joins tokens with spaces, so the answer's text starts with one)."""
    tok = AutoTokenizer.from_pretrained(files["llama"])
    prompt_ids, answer_ids = solo_run(files, adapter, prompt, max_tokens, chat)
    full = tok.decode(prompt_ids + answer_ids, skip_special_tokens=True)
    return full[len(tok.decode(prompt_ids, skip_special_tokens=True)):]


@pytest.fixture(scope="module")
def expected(files):
    """Each served name's solo answer to its prompt in :data:`PROMPTS`."""
    return {name: solo(files, None if name == "tiny" else name, prompt) for name, prompt in PROMPTS.items()}


def test_models_and_health_list_the_base_and_every_adapter(server):
    status, out = request(server, "/v1/models")
    assert status == 200 and out["object"] == "list"
    assert [(m["id"], m["parent"]) for m in out["data"]] == [("tiny", None), ("sql", "tiny"), ("chat", "tiny")]
    status, health = request(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["adapters"] == ["sql", "chat"]


def test_each_answer_is_peft_model_generate_alone(server, expected):
    assert len(set(expected.values())) == 3  # the adapters change the answer, so a mix-up would show
    for name, prompt in PROMPTS.items():
        out = complete(server, name, prompt)
        assert out["object"] == "text_completion" and out["model"] == name
        assert out["choices"][0]["text"] == expected[name]
        assert out["usage"]["prompt_tokens"] == len(prompt.split())


def test_requests_for_different_adapters_share_one_batch(server, expected):
    engine = server.engine
    started, gate = threading.Event(), threading.Event()
    engine.call(lambda: (started.set(), gate.wait(30)))  # hold the worker so that the three requests queue up
    assert started.wait(30)
    prefills, steps = len(engine.prefill_sizes), len(engine.decode_sizes)
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(complete, server, name, prompt) for name, prompt in PROMPTS.items()}
        deadline = time.monotonic() + 30
        while engine.queue_depth < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        gate.set()
        answers = {name: f.result()["choices"][0]["text"] for name, f in futures.items()}
    assert list(engine.prefill_sizes)[prefills:] == [3]  # one forward over the three prompts
    assert list(engine.decode_sizes)[steps:][0] == 3  # then they decode together, each row with its adapter
    assert answers == expected  # prompts of 2, 8 and 9 tokens: left padding changes no answer


def test_several_prompts_in_one_request(server, files, expected):
    out = complete(server, "sql", [PROMPTS["sql"], PROMPTS["chat"]])
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert texts == [expected["sql"], solo(files, "sql", PROMPTS["chat"])]
    used = len(solo_ids(files, "sql", PROMPTS["sql"])) + len(solo_ids(files, "sql", PROMPTS["chat"]))
    assert out["usage"] == {"prompt_tokens": 8 + 2, "completion_tokens": used, "total_tokens": 10 + used}


def test_chat_completions_use_the_chat_template(server, files):
    status, out = request(server, "/v1/chat/completions", {
        "model": "chat", "messages": [{"role": "user", "content": "the plot"}], "max_tokens": 6, "temperature": 0,
    })
    assert status == 200 and out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": solo(files, "chat", "the plot", 6, True)}


def test_stop_strings_and_finish_reasons(server, files, expected):
    text, ids = expected["sql"], solo_ids(files, "sql", PROMPTS["sql"])
    assert len(text.split()) >= 2 and len(ids) >= 3
    stop = text.split()[1]
    out = complete(server, "sql", PROMPTS["sql"], stop=["never there", stop])["choices"][0]
    assert out["finish_reason"] == "stop" and out["text"] == text[: text.index(stop)]
    out = complete(server, "sql", PROMPTS["sql"], max_tokens=2)["choices"][0]  # ids[1] is not end-of-sequence
    assert out["finish_reason"] == "length" and out["text"] == solo(files, "sql", PROMPTS["sql"], 2)
    eos = complete(server, "sql", PROMPTS["sql"], max_tokens=8)["choices"][0]["finish_reason"]
    assert eos == ("stop" if ids[-1] == 2 else "length")


def test_greedy_and_sampled_rows_share_a_batch_and_seeds_reproduce(files):
    """Each row samples with its own settings and generator: greedy and seeded rows decode together, and a seeded
    request gives the same answer alone."""
    tok = AutoTokenizer.from_pretrained(files["llama"])
    model = load_adapter(AutoModelForCausalLM.from_pretrained(files["llama"]), "sql", files["sql"], torch.device("cpu"))
    engine = Engine(model, tok, batch_wait_ms=2000, max_batch_size=3)
    ids = tok(PROMPTS["sql"])["input_ids"]
    greedy, hot = SamplingParams(max_tokens=6, temperature=0), SamplingParams(max_tokens=6, temperature=1.5,
                                                                               top_p=0.9, seed=7)
    try:
        engine.start()  # the first request waits up to 2 s for two more
        handles = [engine.submit(Request(ids, "sql", greedy)), engine.submit(Request(ids, "sql", hot)),
                   engine.submit(Request(ids, "__base__", greedy))]
        results = [h.result(30).choices[0].text for h in handles]
        assert list(engine.prefill_sizes) == [3]
        assert results[0] == solo(files, "sql", PROMPTS["sql"], 6) and results[2] == solo(files, None, PROMPTS["sql"], 6)
        again = [engine.submit(Request(ids, "sql", hot)).result(30).choices[0].text for _ in range(2)]
        assert again == [results[1]] * 2
    finally:
        engine.close()


@pytest.mark.parametrize("body, status, message", [
    ({"model": "nope", "prompt": "a"}, 404, "available: tiny, sql, chat"),
    ({"prompt": "a"}, 400, "'model' is required"),
    ({"model": "sql", "prompt": 5}, 400, "'prompt' must be a string"),
    ({"model": "sql", "prompt": []}, 400, "'prompt' must be a string"),
    ({"model": "sql", "prompt": ""}, 400, "no tokens"),
    ({"model": "sql", "prompt": "a", "max_tokens": "8"}, 400, "'max_tokens' must be an integer"),
    ({"model": "sql", "prompt": "a", "max_tokens": 0}, 400, "at least 1"),
    ({"model": "sql", "prompt": "the plot", "max_tokens": 127}, 400, "context of 128 tokens leaves 126"),
    ({"model": "sql", "prompt": "a", "temperature": True}, 400, "'temperature' must be an integer or a number"),
    ({"model": "sql", "prompt": "a", "top_p": 0}, 400, "'top_p' must be > 0.0 and <= 1.0"),
    ({"model": "sql", "prompt": "a", "stop": [1]}, 400, "'stop' must be"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_get_clear_errors_and_the_server_goes_on(server, expected, body, status, message):
    code, out = request(server, "/v1/completions", body)
    assert code == status and message in out["error"]["message"], out
    assert complete(server, "sql", PROMPTS["sql"])["choices"][0]["text"] == expected["sql"]


def test_bad_json_paths_and_methods(server):
    assert request(server, "/v1/completions", raw=b"{not json")[0] == 400
    code, out = request(server, "/v1/nothing", {})
    assert code == 404 and "/v1/completions" in out["error"]["message"]
    assert request(server, "/v1/completions")[0] == 405  # a GET
    assert request(server, "/v1/models", {})[0] == 405
    assert request(server, "/health")[0] == 200
    conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()  # the body is never sent: the size alone is refused
    assert conn.getresponse().status == 413
    conn.close()


def test_adapters_load_at_run_time_only_when_allowed(files, server):
    api = Api(server.engine, server.api.pool, "tiny")
    reply = api.handle("POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "/"}).encode())
    assert reply.status == 403 and "--allow-adapter-loading" in reply.body["error"]["message"]
    served, thread = _serve(["--model", files["llama"], "--allow-adapter-loading", "--batch-wait-ms", "0"])
    try:
        assert served.base_name == files["llama"] and served.api.pool.names == []
        code, out = request(served, "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": files["prompt"]})
        assert code == 400 and "prompt-learning method" in out["error"]["message"]
        code, out = request(served, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": files["sql"]})
        assert code == 200 and out["id"] == "late"
        assert complete(served, "late", PROMPTS["sql"])["choices"][0]["text"] == solo(files, "sql", PROMPTS["sql"])
        assert complete(served, files["llama"], PROMPTS["sql"])["choices"][0]["text"] == solo(files, None, PROMPTS["sql"])
    finally:
        _stop(served, thread)


def test_without_model_the_adapters_base_is_served(files):
    served, thread = _serve(["--adapter", f"sql={files['sql']}"])
    try:
        assert served.base_name == files["llama"] and served.api.pool.names == ["sql"]
    finally:
        _stop(served, thread)


def test_without_model_or_adapters_the_default_model_is_served(monkeypatch, capsys):
    from deltatune.train import presets
    from deltatune.train.options import TrainError

    def resolve(spec, **_):
        raise TrainError(f"resolved {spec}")

    monkeypatch.setattr(presets, "resolve_model", resolve)
    assert main(["serve"]) == 2 and "resolved smollm2-135m-instruct" in capsys.readouterr().err


@pytest.mark.parametrize("adapter, message", [
    ("x=/no/such/adapter", "neither an existing directory nor a valid hub repo id"),
    ("no-equals-sign", "expected NAME=PATH"),
    ("p={prompt}", "prompt-learning method"),
    ("tiny={sql}", "has the base model's name"),
    ("a.b={sql}", "invalid adapter name"),
])
def test_bad_adapters_fail_startup_with_one_line(files, capsys, adapter, message):
    code = main(["serve", "--model", files["llama"], "--served-model-name", "tiny", "--port", "0",
                 "--adapter", adapter.format(**files)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_corrupt_adapter_fails_startup(files, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(files["sql"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    code = main(["serve", "--model", files["llama"], "--port", "0", "--adapter", f"bad={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--adapter bad:" in err, err
