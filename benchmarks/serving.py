"""Serving throughput: deltatune's engine (continuous batching across adapters) against a one-adapter-at-a-time loop.

A burst of requests arrives at once, spread over 1 / 8 / 32 LoRA adapters (request ``i`` uses adapter ``i mod n``),
each with its own prompt length and answer length (greedy, ``ignore_eos``, so every answer has exactly its
``max_tokens``). Two ways to answer them with the same model holding 32 adapters:

* **engine**: every request submitted to :class:`deltatune.engine.Engine` (``max_batch_size`` rows decode together,
  rows of different adapters in one step; a row leaves when its answer is done and a waiting request takes its place);
* **loop**: what a server without mixed-adapter batches does: one adapter at a time (``set_adapter``), its requests
  in left-padded batches of up to ``max_batch_size`` through ``generate()``, each batch running until its longest
  answer is done.

Reported per adapter count: generated tokens per second over the whole burst, and the p50 / p99 latency of a request
(from the burst's start to its last token). No HTTP: the engine is used directly.

    nice python -m benchmarks.serving            # a few minutes on one CPU thread
    nice python -m benchmarks.serving --quick    # a smoke run
    python -m benchmarks.serving --device cuda --requests 256 --batch 64
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def build(vocab: int, hidden: int, layers: int, adapters: int, device: str):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import deltatune

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = deltatune.get_peft_model(
        LlamaForCausalLM(config), deltatune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                       init_lora_weights=False), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", deltatune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                        init_lora_weights=False))
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return model.to(device).eval(), tokenizer


def workload(requests: int, vocab: int, prompt: tuple[int, int], answer: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))], rng.randint(*answer))
            for _ in range(requests)]


def run_engine(model, tokenizer, jobs, adapters: int, batch: int, device: str) -> tuple[float, list[float]]:
    from deltatune.engine import Engine, Request
    from deltatune.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=batch, max_queue=len(jobs), device=device).start()
    try:
        start = time.perf_counter()
        handles = [engine.submit(Request(ids, f"a{i % adapters}", SamplingParams(max_tokens=n, temperature=0,
                                                                                  ignore_eos=True)))
                   for i, (ids, n) in enumerate(jobs)]
        for h in handles:
            h.result()
        wall = time.perf_counter() - start
        return wall, [h.finish_time - h.arrival_time + (h.arrival_time - handles[0].arrival_time) for h in handles]
    finally:
        engine.close()


def run_loop(model, jobs, adapters: int, batch: int, device: str) -> tuple[float, list[float]]:
    latency = [0.0] * len(jobs)
    start = time.perf_counter()
    for a in range(adapters):
        model.set_adapter(f"a{a}")
        mine = [i for i in range(len(jobs)) if i % adapters == a]
        for k in range(0, len(mine), batch):
            group = mine[k:k + batch]
            width = max(len(jobs[i][0]) for i in group)
            ids = torch.tensor([[0] * (width - len(jobs[i][0])) + jobs[i][0] for i in group], device=device)
            mask = (torch.arange(width, device=device) >= torch.tensor(
                [width - len(jobs[i][0]) for i in group], device=device)[:, None]).long()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                               max_new_tokens=max(jobs[i][1] for i in group), min_new_tokens=max(jobs[i][1] for i in group))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            done = time.perf_counter() - start
            for i in group:
                latency[i] = done
    return time.perf_counter() - start, latency


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="max rows decoding together (both ways)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared machine, spinning OpenMP "
                   "threads turn tiny matmuls into milliseconds; see benchmarks/README.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        hidden, layers, vocab, requests, prompt, answer = 64, 2, 500, 16, (4, 12), (4, 24)
    else:
        hidden, layers, vocab, requests, prompt, answer = 256, 4, 4000, args.requests, (16, 64), (16, 128)
    model, tokenizer = build(vocab, hidden, layers, 32, args.device)
    jobs = workload(requests, vocab, prompt, answer)
    tokens = sum(n for _, n in jobs)
    run_engine(model, tokenizer, jobs[:4], 1, args.batch, args.device)  # warm-up
    print(f"# serving: Llama hidden {hidden}, {layers} layers, vocab {vocab}, 32 LoRA adapters r=8 (all-linear); "
          f"{requests} requests at once, prompts {prompt[0]}-{prompt[1]} tokens, answers {answer[0]}-{answer[1]} "
          f"tokens ({tokens} in all), max {args.batch} rows per batch, {args.device}, {args.threads} threads\n")
    print("| adapters | engine tok/s | engine p50 / p99 latency (s) | loop tok/s | loop p50 / p99 latency (s) | "
          "engine / loop tok/s |")
    print("|---|---|---|---|---|---|")
    for adapters in (1, 8, 32):
        e_wall, e_lat = run_engine(model, tokenizer, jobs, adapters, args.batch, args.device)
        l_wall, l_lat = run_loop(model, jobs, adapters, args.batch, args.device)
        print(f"| {adapters} | {tokens / e_wall:.0f} | {percentile(e_lat, 50):.2f} / {percentile(e_lat, 99):.2f} | "
              f"{tokens / l_wall:.0f} | {percentile(l_lat, 50):.2f} / {percentile(l_lat, 99):.2f} | "
              f"{l_wall / e_wall:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
