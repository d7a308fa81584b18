"""Held-out metrics, and the losses the training loop and the evaluation share.

Every metric is computed the same way before training, during it and after it, so the summary compares like with
like:

* ``eval_loss``: mean cross-entropy per target token (per example for seq-cls);
* ``eval_accuracy`` (seq-cls) and ``eval_token_accuracy`` (token-cls): argmax of the logits;
* ``eval_choice_accuracy`` (causal LM / seq2seq whose answers come from a small set, e.g. labels): the answer the
  model scores highest among the distinct answers of the data set — what the model "knows", whatever its format;
* ``eval_exact_match`` (causal LM / seq2seq): the greedy generation, lower-cased and stripped of surrounding space
  and final punctuation, equals the expected answer — what a user sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, batches_of, collate

MAX_CHOICES = 10  # more distinct answers than this and answers are free text: no choice accuracy


def loss_sum(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the positions that count (causal LM: next-token, so shifted by one)."""
    if task == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def forward_logits(model, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a collated batch, one position per input token (seq2seq gets its labels to build
    decoder inputs). Prompt tuning and P-tuning put virtual tokens in front of the input; their positions carry no
    label and are dropped here. A batch's ``task_ids`` (Poly, multitask prompt tuning) go to the model as well."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "task_ids" in batch:
        inputs["task_ids"] = batch["task_ids"]
    if task == "seq2seq":
        inputs["labels"] = batch["labels"]
    elif task == "causal-lm":
        inputs["use_cache"] = False
    logits = model(**inputs).logits
    length = batch["input_ids"].shape[1]
    if task in ("causal-lm", "token-cls") and logits.shape[1] > length:
        logits = logits[:, -length:]  # (B, S, ...)
    return logits


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".!").split())


@torch.no_grad()
def evaluate(
    model,
    examples: Sequence[Example],
    *,
    task: str,
    tokenizer,
    batch_size: int,
    device: torch.device,
    label_names: Sequence[str] | None = None,
    choices: Sequence[tuple[str, list[int]]] | None = None,
    generate_n: int = 0,
    answer_indices: Sequence[int] = (),
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[dict[str, float], dict[int, str]]:
    """Compute the held-out metrics of ``examples``; also return the model's answers for ``answer_indices``.

    The caller's RNG state is left as it was, so evaluating never changes what training computes next.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    metrics: dict[str, float] = {}
    answers: dict[int, str] = {}
    try:
        with torch.random.fork_rng(devices=[]), autocast():
            total, count, correct = 0.0, 0, 0
            predictions: dict[int, Any] = {}
            for start in range(0, len(examples), batch_size):
                chunk = examples[start: start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk, task, pad).items()}
                logits = forward_logits(model, task, batch)
                total += float(loss_sum(task, logits, batch["labels"]))
                count += sum(e.targets for e in chunk)
                if task == "seq-cls":
                    pred = logits.argmax(-1)
                    correct += int((pred == batch["labels"]).sum())
                    predictions.update({start + i: int(p) for i, p in enumerate(pred)})
                elif task == "token-cls":
                    pred = logits.argmax(-1)
                    mask = batch["labels"] != IGNORE
                    correct += int(((pred == batch["labels"]) & mask).sum())
                    for i in range(len(chunk)):
                        predictions[start + i] = pred[i][mask[i]].tolist()
            metrics["eval_loss"] = total / max(count, 1)
            if task == "seq-cls":
                metrics["eval_accuracy"] = correct / len(examples)
            elif task == "token-cls":
                metrics["eval_token_accuracy"] = correct / max(count, 1)
            if task in ("seq-cls", "token-cls") and label_names:
                for i in answer_indices:
                    p = predictions[i]
                    answers[i] = label_names[p] if task == "seq-cls" else " ".join(label_names[t] for t in p)
            if task in ("causal-lm", "seq2seq"):
                has_answers = all(e.reference is not None for e in examples)
                if choices and has_answers:
                    metrics["eval_choice_accuracy"] = _choice_accuracy(model, examples, task, choices, pad, batch_size,
                                                                       device)
                wanted = sorted(set(range(min(generate_n, len(examples)))) | set(answer_indices))
                if wanted and all(examples[i].prompt_ids for i in wanted):
                    generated = _generate(model, [examples[i] for i in wanted], task, tokenizer, batch_size, device)
                    texts = dict(zip(wanted, generated))
                    answers = {i: texts[i] for i in answer_indices}
                    n = min(generate_n, len(examples))
                    if n and has_answers:
                        hits = sum(normalize_answer(texts[i]) == normalize_answer(examples[i].reference)
                                   for i in range(n))
                        metrics["eval_exact_match"] = hits / n
    finally:
        model.train(was_training)
    return metrics, answers


def _choice_accuracy(model, examples, task, choices, pad, batch_size, device) -> float:
    """Fraction of examples whose expected answer gets the highest summed log-probability among ``choices``."""
    names = [name for name, _ in choices]
    scores = torch.empty(len(examples), len(choices))
    for c, (_, ids) in enumerate(choices):
        rows = []
        for e in examples:
            if task == "causal-lm":
                rows.append(Example(e.prompt_ids + ids, [IGNORE] * len(e.prompt_ids) + ids, task_id=e.task_id))
            else:
                rows.append(Example(e.input_ids, list(ids), task_id=e.task_id))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, task, pad).items()}
            logits = forward_logits(model, task, batch).float()
            labels = batch["labels"]
            if task == "causal-lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            logp = torch.log_softmax(logits, -1)
            mask = labels != IGNORE
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            scores[start: start + len(chunk), c] = picked.sum(-1).cpu()
    best = scores.argmax(-1).tolist()
    hits = sum(normalize_answer(names[b]) == normalize_answer(e.reference) for b, e in zip(best, examples))
    return hits / len(examples)


def _generate(model, examples: Sequence[Example], task: str, tokenizer, batch_size: int, device) -> list[str]:
    """Greedy answers (KV cache on) to each example's prompt, as text."""
    longest = max((len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples
                   if e.reference is not None), default=24)
    max_new = min(longest + 8, 128)
    out: list[str] = []
    for chunk in batches_of(list(examples), batch_size):
        prompts = [Example(e.prompt_ids, [], task_id=e.task_id) for e in chunk]
        side = "left" if task == "causal-lm" else "right"
        batch = collate(prompts, "causal-lm", tokenizer.pad_token_id, side)
        tasks = {"task_ids": batch["task_ids"].to(device)} if "task_ids" in batch else {}
        generated = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True, **tasks,
        )
        if task == "causal-lm":
            generated = generated[:, batch["input_ids"].shape[1]:]
        out.extend(t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return out
