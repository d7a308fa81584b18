"""``deltatune serve``'s OpenAI/vLLM surface with the real ``openai`` client: streaming, every request parameter
accepted (with its effect checked) or refused by name, token-id prompts, content parts, ``models.retrieve``, runtime
load and unload (memory really freed), vLLM's flags, LRU eviction, the bounded queue, timeouts, ``/metrics``, API keys
and bad input. Answers are compared with ``PeftModel.generate`` run alone (``tests/test_serve.py``'s ``solo``)."""

from __future__ import annotations

import gc
import http.client
import json
import shutil
import threading
import time
import weakref

import openai
import pytest
import torch
from transformers import AutoTokenizer

from deltatune.cli import main
from tests.test_serve import PROMPTS, _serve, _stop, complete, files, request, solo_ids  # noqa: F401
from tests.test_serve import solo as _solo
from tests.train_utils import CHAT_TEMPLATE

_SOLO: dict[tuple, str] = {}


def solo(files, adapter, prompt, max_tokens=8, chat=False) -> str:  # noqa: F811
    """``tests.test_serve.solo``, each answer computed once (it loads a fresh model)."""
    key = (files["llama"], adapter, prompt, max_tokens, chat)
    if key not in _SOLO:
        _SOLO[key] = _solo(files, adapter, prompt, max_tokens, chat)
    return _SOLO[key]


@pytest.fixture(scope="module")
def server(files):  # noqa: F811
    served, thread = _serve(["--model", files["llama"], "--served-model-name", "tiny", "--lora-modules",
                             f"sql={files['sql']}", json.dumps({"name": "chat", "path": files["chat"],
                                                               "base_model_name": "tiny"}),
                             "--batch-wait-ms", "0", "--allow-adapter-loading"])
    yield served
    _stop(served, thread)


def client(served, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=60)


def hold_worker(served) -> threading.Event:
    """Block the model thread until the returned event is set (requests queue up meanwhile)."""
    started, gate = threading.Event(), threading.Event()
    served.engine.call(lambda: (started.set(), gate.wait(60)))
    assert started.wait(30)
    return gate


# --- streaming -------------------------------------------------------------------------------------------------------

def test_streamed_completion_is_the_whole_answer_in_openai_chunks(server, files):
    expected = solo(files, "sql", PROMPTS["sql"])
    chunks = list(client(server).completions.create(model="sql", prompt=PROMPTS["sql"], max_tokens=8, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.model == "sql" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    *text_chunks, last = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    assert [c.choices[0].finish_reason for c in text_chunks][-1] in ("stop", "length")
    assert all(c.usage is None for c in text_chunks)
    used = len(solo_ids(files, "sql", PROMPTS["sql"]))
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (8, used)


def test_streamed_chat_starts_with_the_role_and_ends_with_done(server, files):
    stream = client(server).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "the plot"}], max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == solo(files, "chat", "the plot", 6, chat=True)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # on the wire: server-sent events, chunked, ending with data: [DONE]
    conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "chat", "messages": [{"role": "user", "content": "the plot"}], "max_tokens": 2, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream" and resp.getheader("Transfer-Encoding") == "chunked"
    events = resp.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    conn.close()


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server, expected_sql):
    engine = server.engine
    gate = hold_worker(server)
    generated = engine.tokens_generated
    conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "sql", "prompt": PROMPTS["sql"], "max_tokens": 110,
                                                        "ignore_eos": True, "temperature": 0, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.raw._sock.shutdown(2)  # gone before the first token  # noqa: SLF001
    conn.close()
    gate.set()
    deadline = time.monotonic() + 30
    while (server.api.pool._holds["sql"] or server.httpd.tracker.count or engine.running) and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.api.pool._holds["sql"] == 0 and server.httpd.tracker.count == 0 and engine.running == 0
    assert engine.tokens_generated - generated < 50  # cancelled a few tokens in, not run to its 110
    assert complete(server, "sql", PROMPTS["sql"])["choices"][0]["text"] == expected_sql


@pytest.fixture(scope="module")
def expected_sql(files):  # noqa: F811
    return solo(files, "sql", PROMPTS["sql"])


# --- parameters ----------------------------------------------------------------------------------------------------

def test_token_id_prompts_n_and_echo(server, files, expected_sql):
    tok = AutoTokenizer.from_pretrained(files["llama"])
    ids = tok(PROMPTS["sql"])["input_ids"]
    other = tok(PROMPTS["chat"])["input_ids"]
    out = client(server).completions.create(model="sql", prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == expected_sql and out.usage.prompt_tokens == len(ids)
    out = client(server).completions.create(model="sql", prompt=[ids, other], max_tokens=8, temperature=0, n=2)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [expected_sql] * 2 + [solo(files, "sql", PROMPTS["chat"])] * 2  # choice i * n + j
    out = complete(server, "sql", PROMPTS["sql"], echo=True)["choices"][0]["text"]
    assert out == PROMPTS["sql"] + expected_sql
    sampled = complete(server, "sql", PROMPTS["sql"], temperature=1.5, seed=3, n=3)["choices"]
    assert len(sampled) == 3 and len({c["text"] for c in sampled}) > 1  # n draws, not one answer copied


def test_content_parts_and_the_chat_defaults(server, files):
    parts = [{"type": "text", "text": "the"}, {"type": "text", "text": "plot"}]
    out = client(server).chat.completions.create(model="chat", messages=[{"role": "user", "content": parts}],
                                                 max_tokens=6, temperature=0)
    assert out.choices[0].message.content == solo(files, "chat", "the\nplot", 6, chat=True)  # parts joined by \n
    with pytest.raises(openai.BadRequestError, match="only .*text.* parts are supported"):
        client(server).chat.completions.create(model="chat", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    # without max_tokens a chat answer may fill the context (vLLM's default), so it ends at end-of-sequence
    out = client(server).chat.completions.create(model="chat", messages=[{"role": "user", "content": "the plot"}],
                                                 temperature=0)
    assert out.choices[0].finish_reason == "stop" or out.usage.total_tokens == 128


@pytest.mark.parametrize("extra, message", [
    ({"min_tokens": 2}, "'min_tokens' is not supported"),
    ({"include_stop_str_in_output": True}, "'include_stop_str_in_output' is not supported"),
    ({"spaces_between_special_tokens": False}, "'spaces_between_special_tokens' is not supported"),
    ({"skip_special_tokens": 0}, "'skip_special_tokens' must be"),
    ({"logprobs": 21}, "'logprobs' must be 0 to 20"),
    ({"top_k": -2}, "'top_k' must be -1 to"),
    ({"suffix": "x"}, "'suffix' is not supported"),
    ({"best_of": 3}, "'best_of' 3 is not supported"),
    ({"logit_bias": {"5": 10}}, "'logit_bias' is not supported"),
    ({"guided_json": {}}, "unsupported parameter(s) 'guided_json'"),
    ({"frobnicate": 1}, "unsupported parameter(s) 'frobnicate'"),
    ({"n": 1000}, "'n' must be 1 to 128"),
    ({"max_tokens": 10**12}, "'max_tokens' must be"),
    ({"prompt": [5, 10**6]}, "token id 1000000 is outside the vocabulary"),
    ({"prompt": [[5], []]}, "non-empty list of integers"),
    ({"stream_options": {"include_usage": True}}, "only allowed with stream=true"),
])
def test_unimplemented_or_bad_parameters_are_refused_by_name(server, expected_sql, extra, message):
    code, out = request(server, "/v1/completions", {"model": "sql", "prompt": "a", "max_tokens": 2, **extra})
    assert code == 400 and message in out["error"]["message"], out
    assert complete(server, "sql", PROMPTS["sql"])["choices"][0]["text"] == expected_sql


def test_neutral_values_of_unimplemented_parameters_are_accepted(server, expected_sql):
    out = complete(server, "sql", PROMPTS["sql"], logit_bias={}, best_of=1, top_k=-1, presence_penalty=0, user="u1",
                   request_id="my-id")
    assert out["choices"][0]["text"] == expected_sql and out["id"] == "my-id"
    code, out = request(server, "/v1/chat/completions", {"model": "chat", "messages": [
        {"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert code == 400 and "'tools' is not supported" in out["error"]["message"]


def test_models_retrieve(server):
    c = client(server)
    assert c.models.retrieve("sql").id == "sql" and c.models.retrieve("sql").parent == "tiny"
    assert c.models.retrieve("tiny").parent is None
    with pytest.raises(openai.NotFoundError, match="available: tiny, sql, chat"):
        c.models.retrieve("nope")


# --- adapters --------------------------------------------------------------------------------------------------------

def test_unload_frees_the_adapter(server, files):
    base_count = sum(1 for _ in server.engine.model.parameters())
    code, out = request(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": files["sql"]})
    assert code == 200 and out["id"] == "late"
    params = [weakref.ref(p) for n, p in server.engine.model.named_parameters() if ".late." in n]
    assert params and complete(server, "late", PROMPTS["sql"])["choices"][0]["text"] == solo(files, "sql",
                                                                                            PROMPTS["sql"])
    code, out = request(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert code == 200 and out["deleted"]
    gc.collect()
    assert all(ref() is None for ref in params)  # no reference left anywhere: the memory is free
    assert sum(1 for _ in server.engine.model.parameters()) == base_count
    assert request(server, "/v1/completions", {"model": "late", "prompt": "a"})[0] == 404
    assert "late" not in [m["id"] for m in request(server, "/v1/models")[1]["data"]]
    assert request(server, "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 404


@pytest.mark.slow
def test_lru_eviction_frees_and_reloads_with_the_same_answers(files):  # noqa: F811
    served, thread = _serve(["--model", files["llama"], "--adapter", f"sql={files['sql']}", "--adapter",
                             f"chat={files['chat']}", "--max-cpu-loras", "1", "--max-loras", "1",
                             "--batch-wait-ms", "0"])
    try:
        pool = served.api.pool
        assert pool.loaded == ["chat"] and pool.evictions == 1  # sql was loaded first, then made room
        for name in ["sql", "chat", "sql"]:
            out = complete(served, name, PROMPTS[name])["choices"][0]["text"]
            assert out == solo(files, name, PROMPTS[name]) and pool.loaded == [name]
            assert list(served.engine.model.peft_config) == [name]
        assert pool.evictions == 4 and pool.loads == 5
    finally:
        _stop(served, thread)


def test_an_adapters_own_chat_template(files, tmp_path):  # noqa: F811
    adapter = tmp_path / "templated"
    shutil.copytree(files["chat"], adapter)
    template = "{% for m in messages %}review : {{ m['content'] }} {% endfor %}sentiment ?"
    (adapter / "chat_template.jinja").write_text(template)
    served, thread = _serve(["--model", files["llama"], "--adapter", f"t={adapter}", "--adapter",
                             f"chat={files['chat']}", "--batch-wait-ms", "0"])
    try:
        for name, text in [("t", "review : the plot sentiment ?"), ("chat", None)]:
            code, out = request(served, "/v1/chat/completions", {
                "model": name, "messages": [{"role": "user", "content": "the plot"}], "max_tokens": 5,
                "temperature": 0})
            want = solo(files, "chat", text, 5) if text else solo(files, "chat", "the plot", 5, chat=True)
            assert code == 200 and out["choices"][0]["message"]["content"] == want
        assert CHAT_TEMPLATE != template
    finally:
        _stop(served, thread)


def test_vllm_flags_and_environment(files, monkeypatch, capsys):  # noqa: F811
    code = main(["serve", "--model", files["llama"], "--port", "0", "--max-lora-rank", "2",
                 "--lora-modules", f"sql={files['sql']}"])
    assert code == 2 and "rank 4 is above --max-lora-rank 2" in capsys.readouterr().err
    code = main(["serve", "--model", files["llama"], "--port", "0", "--lora-modules",
                 json.dumps({"name": "sql", "path": files["sql"], "base_model_name": "other"})])
    assert code == 2 and "base_model_name 'other'" in capsys.readouterr().err
    code = main(["serve", "--model", files["llama"], "--host", "0.0.0.0", "--port", "0"])
    assert code == 2 and "pass --api-key" in capsys.readouterr().err
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    served, thread = _serve(["--model", files["llama"], "--enable-lora", "--max-num-seqs", "4"])
    try:
        assert served.api.allow_adapter_loading and served.engine.max_batch_size == 4
    finally:
        _stop(served, thread)


# --- operations ----------------------------------------------------------------------------------------------------

def test_api_key_metrics_queue_and_timeout(files, expected_sql):  # noqa: F811
    served, thread = _serve(["--model", files["llama"], "--served-model-name", "tiny", "--adapter",
                             f"sql={files['sql']}", "--api-key", "s3cret", "--max-waiting", "2",
                             "--request-timeout", "2", "--batch-wait-ms", "0"])
    try:
        with pytest.raises(openai.AuthenticationError):
            client(served, "wrong").completions.create(model="sql", prompt="a", max_tokens=1)
        assert request(served, "/health")[0] == 200  # health and metrics stay open, as in vLLM
        good = client(served, "s3cret")
        assert good.completions.create(model="sql", prompt=PROMPTS["sql"], max_tokens=8,
                                       temperature=0).choices[0].text == expected_sql
        # a full queue answers 503 + Retry-After; a request not answered in time gets 504; both leave it serving
        gate = hold_worker(served)
        with pytest.raises(openai.InternalServerError) as full:
            results = []
            workers = [threading.Thread(target=lambda: results.append(
                _complete(good, expected_sql))) for _ in range(2)]
            for w in workers:
                w.start()
            deadline = time.monotonic() + 30
            while served.engine.queue_depth < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            good.completions.create(model="sql", prompt="a", max_tokens=1)
        assert full.value.status_code == 503 and full.value.response.headers["Retry-After"] == "1"
        for w in workers:
            w.join()
        assert sorted(results) == ["timeout", "timeout"]  # the worker is still held past --request-timeout
        gate.set()
        while served.engine.queue_depth and time.monotonic() < deadline + 30:  # the timed-out rows still run (and
            time.sleep(0.01)                                                # hold their places) once it is free
        assert good.completions.create(model="sql", prompt=PROMPTS["sql"], max_tokens=8,
                                       temperature=0).choices[0].text == expected_sql
        metrics = _metrics(served)
        assert metrics['deltatune_requests_total{endpoint="/v1/completions",status="503"}'] == 1
        assert metrics['deltatune_requests_total{endpoint="/v1/completions",status="401"}'] == 1
        assert metrics['deltatune_adapter_requests_total{model="sql"}'] == 4
        assert metrics['deltatune_generation_tokens_total{model="sql"}'] >= 2 * len(expected_sql.split())
        assert metrics["deltatune_requests_waiting"] == 0 and metrics["deltatune_adapters_loaded"] == 1
        # latency histograms count the two answered requests, not the two that timed out
        for name in ("time_to_first_token", "e2e_request_latency", "time_per_output_token"):
            prefix = f"deltatune_{name}_seconds"
            assert metrics[f'{prefix}_count{{model="sql"}}'] == 2
            assert metrics[f'{prefix}_bucket{{model="sql",le="+Inf"}}'] == 2
            assert metrics[f'{prefix}_sum{{model="sql"}}'] > 0
        assert (metrics['deltatune_time_to_first_token_seconds_sum{model="sql"}']
                < metrics['deltatune_e2e_request_latency_seconds_sum{model="sql"}'])
    finally:
        _stop(served, thread)


def test_latency_histograms_render_cumulative_buckets_as_prometheus_reads_them():
    from deltatune.serve import Metrics

    metrics = Metrics()
    name = "deltatune_e2e_request_latency_seconds"
    for seconds in (0.2, 0.3, 0.9, 3.0, 9000.0):  # 0.3 is in the bucket le="0.3" (bounds are inclusive)
        metrics.observe(name, seconds, model="a")
    lines = dict(line.rpartition(" ")[::2] for line in metrics.render({}, {}).splitlines() if not line.startswith("#"))
    bucket = lambda le: int(lines[f'{name}_bucket{{model="a",le="{le}"}}'])  # noqa: E731
    assert [bucket(le) for le in ("0.3", "0.5", "1.0", "2.5", "5.0", "7680.0", "+Inf")] == [2, 2, 3, 3, 4, 4, 5]
    assert float(lines[f'{name}_sum{{model="a"}}']) == pytest.approx(9004.4)
    assert int(lines[f'{name}_count{{model="a"}}']) == 5


def _complete(c: openai.OpenAI, expected: str) -> str:
    try:
        return "ok" if c.completions.create(model="sql", prompt=PROMPTS["sql"], max_tokens=8,
                                            temperature=0).choices[0].text == expected else "wrong"
    except openai.APIStatusError as exc:
        return "timeout" if exc.status_code == 504 else str(exc.status_code)


def _metrics(served) -> dict[str, float]:
    conn = http.client.HTTPConnection(*served.httpd.server_address[:2], timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    lines = [line for line in resp.read().decode().splitlines() if line and not line.startswith("#")]
    conn.close()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in lines}


def test_bad_bodies_get_their_status_and_the_server_goes_on(server, expected_sql):
    conn = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    for raw, message in [(b"\xff", "not valid JSON"), (b"[]", "JSON object"), (b'{"model": 3}', "'model' must be")]:
        code, out = request(server, "/v1/completions", raw=raw)
        assert code == 400 and message in out["error"]["message"]
    code, out = request(server, "/v1/chat/completions", {"model": "chat", "messages": [
        {"role": "user", "content": "a", "tool_calls": [{}]}]})
    assert code == 400 and "'tool_calls' not supported" in out["error"]["message"]
    assert complete(server, "sql", PROMPTS["sql"])["choices"][0]["text"] == expected_sql


def test_drain_finishes_requests_in_flight_and_refuses_new_ones(files, expected_sql):  # noqa: F811
    served, thread = _serve(["--model", files["llama"], "--adapter", f"sql={files['sql']}", "--batch-wait-ms", "0"])
    gate = hold_worker(served)
    results = []
    worker = threading.Thread(target=lambda: results.append(complete(served, "sql", PROMPTS["sql"])))
    worker.start()
    deadline = time.monotonic() + 30
    while served.engine.queue_depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    conn = http.client.HTTPConnection(*served.httpd.server_address[:2], timeout=30)
    conn.request("GET", "/health")  # a kept-alive connection, open before the stop
    assert json.load(conn.getresponse())["status"] == "ok"
    served.httpd.shutdown()  # what SIGTERM does: the accept loop ends
    thread.join()
    drained = []
    stopper = threading.Thread(target=lambda: drained.append(served.drain(30)))
    stopper.start()
    while not served.api.closing:
        time.sleep(0.01)
    conn.request("POST", "/v1/completions", json.dumps({"model": "sql", "prompt": "a"}))
    refused = conn.getresponse()
    assert refused.status == 503 and "shutting down" in json.load(refused)["error"]["message"]
    conn.close()
    assert not drained  # still waiting for the request in flight
    gate.set()
    worker.join()
    stopper.join()
    assert drained == [True] and results[0]["choices"][0]["text"] == expected_sql


@pytest.mark.slow
def test_sigterm_stops_the_command(files):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", files["llama"], "--port", "0",
                             "--quiet", "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    lines = [proc.stderr.readline()]
    while lines[-1] and "serving" not in lines[-1]:  # library warnings may come first
        lines.append(proc.stderr.readline())
    line = lines[-1]
    assert "serving" in line, lines
    url = line.split(" on ")[1].split(";")[0]
    assert request(type("S", (), {"url": url}), "/health")[0] == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0 and "stopped" in proc.stderr.read()


# --- the engine's parameters through HTTP ----------------------------------------------------------------------------

def _reference_logprobs(files, adapter: str, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """log-softmax of a fresh ``PeftModel``'s forward over prompt + answer: row ``t`` is the distribution of the
    token at position ``t + 1``. Shape (len(prompt) + len(answer) - 1, vocab)."""
    from transformers import AutoModelForCausalLM

    from deltatune import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["llama"]), files[adapter]).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1)


def test_completion_logprobs_and_echo_are_the_models_log_softmax(server, files):
    tok = AutoTokenizer.from_pretrained(files["llama"])
    prompt_ids = tok(PROMPTS["sql"])["input_ids"]
    answer_ids = solo_ids(files, "sql", PROMPTS["sql"], 6)
    ref = _reference_logprobs(files, "sql", prompt_ids, answer_ids)
    out = complete(server, "sql", PROMPTS["sql"], max_tokens=6, logprobs=2, echo=True)["choices"][0]
    lp = out["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in prompt_ids + answer_ids]
    assert lp["token_logprobs"][0] is None  # the first prompt token has no context
    want = ref.gather(1, torch.tensor(prompt_ids[1:] + answer_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4, rtol=0)
    for row, top in zip(ref[len(prompt_ids) - 1:], lp["top_logprobs"][len(prompt_ids):]):
        best = row.topk(2)
        assert set(top) >= {tok.decode([int(i)]) for i in best.indices}  # the 2 likeliest (and the chosen one)
        torch.testing.assert_close(torch.tensor(sorted(top.values(), reverse=True)[:2]), best.values, atol=1e-4,
                                   rtol=0)
    assert out["text"].startswith(PROMPTS["sql"])
    # streamed, the chunks' logprobs add up to the same
    chunks = list(client(server).completions.create(model="sql", prompt=PROMPTS["sql"], max_tokens=6, temperature=0,
                                                    logprobs=2, stream=True))
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    torch.testing.assert_close(torch.tensor(streamed), want[len(prompt_ids) - 1:], atol=1e-4, rtol=0)


def test_chat_logprobs_in_openai_shape(server, files):
    out = client(server).chat.completions.create(model="sql", messages=[{"role": "user", "content": "the plot"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(e.token for e in content).replace(" ", "") == out.choices[0].message.content.replace(" ", "")
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
        assert entry.bytes == list(entry.token.encode())
    with pytest.raises(openai.BadRequestError, match="'top_logprobs' needs 'logprobs': true"):
        client(server).chat.completions.create(model="sql", messages=[{"role": "user", "content": "a"}],
                                               max_tokens=1, top_logprobs=2)


def test_every_sampling_field_reaches_the_engine(server, files):
    """A request with every sampling field set gives what the engine gives for the same ``SamplingParams``
    directly (seeded, so the draws are the same); distinct values, so that two swapped fields would show."""
    from deltatune.engine import Request
    from deltatune.sampling import SamplingParams

    tok = AutoTokenizer.from_pretrained(files["llama"])
    settings = dict(temperature=1.3, top_p=0.95, top_k=20, min_p=0.01, presence_penalty=0.7, frequency_penalty=-0.4,
                    repetition_penalty=1.3, seed=11, stop_token_ids=[5], n=2, max_tokens=10, ignore_eos=True)
    out = complete(server, "sql", PROMPTS["sql"], **settings)
    direct = server.engine.submit(Request(tok(PROMPTS["sql"])["input_ids"], "sql",
                                          SamplingParams(**{**settings, "stop_token_ids": (5,)}))).result(60)
    assert [c["text"] for c in out["choices"]] == [c.text for c in direct.choices]
    assert [c["finish_reason"] for c in out["choices"]] == [c.finish_reason for c in direct.choices]
    greedy = complete(server, "sql", PROMPTS["sql"], max_tokens=10, temperature=0)["choices"][0]["text"]
    assert out["choices"][0]["text"] != greedy  # the settings change the answer
    job = server.api.parse_completion({"model": "sql", "prompt": "a", "skip_special_tokens": False,
                                       "spaces_between_special_tokens": True})
    assert job.params.skip_special_tokens is False  # what decides the text of special tokens (tests/test_engine.py)


def test_adapter_tiers_follow_least_recent_use(files):  # noqa: F811
    """``--max-loras 1 --max-cpu-loras 2`` over three adapters: one on the device, two in memory, the least recently
    used idle one moved out; an adapter held by a request is never moved; ``move_adapter`` moves only its adapter."""
    from transformers import AutoModelForCausalLM

    from deltatune.engine import Engine
    from deltatune.serve import AdapterPool, move_adapter

    engine = Engine(AutoModelForCausalLM.from_pretrained(files["llama"]),
                    AutoTokenizer.from_pretrained(files["llama"])).start()
    try:
        pool = AdapterPool(engine, max_loras=1, max_cpu_loras=2)
        for name in ("a", "b", "c"):
            pool.add(name, files["sql"] if name != "b" else files["chat"])
        assert pool.loaded == ["b", "c"] and list(pool._on_device) == ["c"] and pool.evictions == 1
        pool.acquire("b")  # in memory: moved onto the device, c moves out (to CPU memory)
        assert pool.loaded == ["c", "b"] and list(pool._on_device) == ["b"]
        with pytest.raises(TimeoutError):  # the one device slot is held by b's request
            pool.acquire("a", timeout=0.05)
        pool.release("b")
        pool.acquire("a")  # not in memory: c (least recent) is deleted, b leaves the device
        pool.release("a")
        assert pool.loaded == ["b", "a"] and list(pool._on_device) == ["a"] and pool.loads == 4
        assert sorted(engine.model.peft_config) == ["a", "b"]
        move_adapter(engine.model, "b", torch.device("meta"))
        devices = {n: p.device.type for n, p in engine.model.named_parameters()}
        assert {d for n, d in devices.items() if ".b." in n} == {"meta"}
        assert {d for n, d in devices.items() if ".b." not in n} == {"cpu"}
    finally:
        engine.close()
