"""Tiny model directories, tokenizers and data files for the training / CLI tests (all built offline).

The tokenizer is a word-level ``tokenizers`` model over a fixed vocabulary, wrapped as a transformers fast
tokenizer with pad/bos/eos/unk tokens and a small chat template, so every code path that needs a real tokenizer
(chat prompts, generation, decoding, word ids for token classification) runs in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

POSITIVE = ["great", "fun", "moving", "brilliant", "charming", "witty", "warm", "superb"]
NEGATIVE = ["dull", "silly", "tedious", "bland", "messy", "awful", "flat", "boring"]
FILLER = ["the", "film", "movie", "is", "was", "a", "and", "plot", "story", "acting", "very", "quite"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["review", ":", "positive", "negative", "sentiment", "?", "user", "assistant",
                                        "PER", "LOC", "O", "paris", "anna", "went", "to"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def write_tokenizer(path: str | os.PathLike, chat: bool = True, bos: bool = False):
    """A word-level fast tokenizer over :data:`WORDS`; returns the transformers tokenizer (also saved to ``path``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS)


def write_llama(path: str | os.PathLike, seed: int = 0, chat: bool = True) -> str:
    """A tiny random Llama causal LM with its tokenizer, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
        # Large init: with the default 0.02 a frozen 32-wide head cannot produce confident logits, so the loss of
        # any adapter would plateau near log(vocab) instead of showing that training works.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    write_tokenizer(path, chat=chat)
    return str(path)


def write_bert(path: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random ``BertModel`` (no head, like a sentence encoder) with its tokenizer."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                        initializer_range=0.3)  # see write_llama
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    write_tokenizer(path, chat=False)
    return str(path)


def write_t5(path: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random T5 with its tokenizer (eos id 2, decoder start / pad id 0)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
                      initializer_factor=3.0)  # see write_llama
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(path)
    write_tokenizer(path, chat=False)
    return str(path)


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    """Synthetic reviews: filler words then one sentiment word, which decides the label (learnable in a few dozen
    steps by a tiny model)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        words = rng.sample(FILLER, 3) + [word]
        text = " ".join(words)
        label = "positive" if positive else "negative"
        out.append({"text": text, "label": label, "prompt": f"review : {text} sentiment ?", "completion": label})
    return out


def ner_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, where = rng.choice(["anna", "paris"]), rng.choice(["paris", "anna"])
        tokens = [who, "went", "to", where]
        tags = ["PER" if who == "anna" else "LOC", "O", "O", "LOC" if where == "paris" else "PER"]
        out.append({"tokens": tokens, "tags": tags})
    return out


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return str(path)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run in-process training with one intra-op thread (see :func:`cli_env`), restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli_env() -> dict[str, str]:
    """Environment for running ``python -m deltatune`` in a subprocess: offline, deterministic thread count."""
    env = dict(os.environ)
    # One thread: tiny models gain nothing from intra-op threads, and on a busy machine two threads per process
    # can be many times slower than one.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltatune", *args], capture_output=True, text=True, env=cli_env(),
                          cwd=cwd, timeout=timeout)


def read_losses(run_dir: str | os.PathLike) -> dict[int, tuple]:
    """``step -> (loss, lr, grad_norm)`` of a run's train metrics lines."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if record.get("kind") == "train":
                out[record["step"]] = (record["loss"], record["lr"], record["grad_norm"])
    return out
