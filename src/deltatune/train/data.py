"""Training data: read records, pick the task's columns, tokenise, split, batch.

Records are plain dicts read from ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` files, a directory holding
``train.<ext>`` (and ``validation.<ext>``), a ``datasets.save_to_disk`` directory, or a built-in data set. They are
small enough to hold in memory, which keeps the data position of a run a plain integer (see ``loop.py``).

Per task, an :class:`Example` holds token ids and what the loss compares them with:

* ``causal-lm``: ``prompt`` + ``completion`` (loss on the completion and EOS only) or ``text`` (loss on all of it);
* ``seq2seq``: source ``prompt`` -> target ``completion``;
* ``seq-cls``: ``text`` -> ``label`` (strings or ints);
* ``token-cls``: ``text`` as a list of words -> ``label`` as a list of tags, one per word (first sub-token only).

Any task may also name a ``task_id`` column: each example's task index, batched as the model's ``task_ids`` (Poly,
multitask prompt tuning).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .options import TrainError

IGNORE = -100  # label id the loss skips
_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")

# Default column names per task: (role -> column).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "causal-lm": {"prompt": "prompt", "completion": "completion", "text": "text"},
    "seq2seq": {"prompt": "prompt", "completion": "completion"},
    "seq-cls": {"text": "text", "label": "label"},
    "token-cls": {"text": "tokens", "label": "tags"},
}


# --- reading ---------------------------------------------------------------------------------------------------------

def read_records(spec: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Read ``spec`` (file, directory or built-in name) into ``(train, eval or None)`` record lists.

    Raises:
        TrainError: the path does not exist, has an unknown format, cannot be parsed, or holds no examples.
    """
    from .presets import BUILTIN_DATA, read_builtin_data

    if spec in BUILTIN_DATA and not os.path.exists(spec):
        records = read_builtin_data(spec)
        return records, None
    if not os.path.exists(spec):
        raise TrainError(f"data file {spec!r} does not exist (built-in data sets: {', '.join(BUILTIN_DATA)})")
    if os.path.isdir(spec):
        return _read_directory(spec)
    return _read_file(spec), None


def _read_directory(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json")):
        return _read_saved_dataset(path)
    found: dict[str, str] = {}
    for split in ("train", "validation", "eval", "test"):
        for ext in _EXTENSIONS:
            candidate = os.path.join(path, split + ext)
            if os.path.isfile(candidate) and split not in found:
                found[split] = candidate
    if "train" not in found:
        raise TrainError(
            f"data directory {path!r} has no train{{{','.join(_EXTENSIONS)}}} file and is not a datasets "
            f"save_to_disk directory"
        )
    eval_path = found.get("validation") or found.get("eval") or found.get("test")
    return _read_file(found["train"]), (_read_file(eval_path) if eval_path else None)


def _read_saved_dataset(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    try:
        import datasets
    except ImportError:
        raise TrainError(f"{path!r} is a datasets save_to_disk directory; pip install datasets to read it") from None
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise TrainError(f"{path!r}: the saved DatasetDict has no 'train' split (splits: {list(loaded)})")
        eval_split = next((s for s in ("validation", "eval", "test") if s in loaded), None)
        return _nonempty(list(loaded["train"]), path), (list(loaded[eval_split]) if eval_split else None)
    return _nonempty(list(loaded), path), None


def _read_file(path: str) -> list[dict[str, Any]]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise TrainError(f"{path!r}: unknown data format {ext or '(no extension)'!r}; use {', '.join(_EXTENSIONS)}")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if ext in (".csv", ".tsv"):
                records = list(csv.DictReader(fh, delimiter="," if ext == ".csv" else "\t"))
            else:
                records = _parse_json(fh.read(), path, lines=ext == ".jsonl")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TrainError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    return _nonempty(records, path)


def _parse_json(text: str, path: str, lines: bool) -> list[dict[str, Any]]:
    if not lines:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError:
            lines = True  # many ".json" files are JSON lines
        else:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise TrainError(f"{path!r}: expected a JSON list of objects (or JSON lines)")
            return _check_objects(data, path)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise TrainError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    return _check_objects(records, path)


def _check_objects(records: list, path: str) -> list[dict[str, Any]]:
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise TrainError(f"{path!r}: example {i + 1} is a {type(record).__name__}, expected an object")
    return records


def _nonempty(records: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    if not records:
        raise TrainError(f"{path!r} holds no examples")
    return records


# --- columns ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    """Which record fields play which role; ``None`` for roles the task does not use."""

    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    label: str | None = None
    task_id: str | None = None

    def used(self) -> list[str]:
        return [c for c in (self.prompt, self.completion, self.text, self.label, self.task_id) if c is not None]


def choose_columns(
    task: str, records: Sequence[dict[str, Any]], explicit: dict[str, str | None], source: str
) -> Columns:
    """Resolve column roles for ``task`` from explicit names and the task's defaults, checking every record.

    ``causal-lm`` uses prompt/completion when both are present (or named), else ``text``. A ``task_id`` column, for
    any task, is used only when named.

    Raises:
        TrainError: an explicitly named option does not apply to the task, or a required column is missing.
    """
    defaults = DEFAULT_COLUMNS[task]
    for role, name in explicit.items():
        if name is not None and role not in defaults and role != "task_id":
            raise TrainError(f"--{role}-column does not apply to --task {task} (its columns: {', '.join(defaults)})")
    pick = {role: explicit.get(role) or default for role, default in defaults.items()}
    if explicit.get("task_id"):
        pick["task_id"] = explicit["task_id"]
    first = records[0]
    if task == "causal-lm":
        wants_pairs = explicit.get("prompt") or explicit.get("completion") or (
            pick["prompt"] in first and pick["completion"] in first and not explicit.get("text")
        )
        if wants_pairs:
            pick.pop("text")
        else:
            pick.pop("prompt"), pick.pop("completion")
    columns = Columns(**pick)
    for i, record in enumerate(records):
        missing = [c for c in columns.used() if c not in record or record[c] is None]
        if missing:
            roles = {v: k for k, v in pick.items()}
            hint = ", ".join(f"--{roles[c].replace('_', '-')}-column" for c in missing)
            raise TrainError(
                f"{source}: example {i + 1} has no column {missing[0]!r} (columns: {sorted(record)}); "
                f"name the right one with {hint}"
            )
    return columns


# --- tokenising ------------------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One tokenised example.

    Attributes:
        input_ids: Model input tokens.
        labels: Per-token targets aligned with ``input_ids`` (causal LM, token-cls), target tokens (seq2seq), or
            the class id (seq-cls).
        prompt_ids: The prompt alone (for generating an answer); ``None`` for raw-text examples.
        reference: The expected answer text (completion / label name), for exact match and display.
        prompt_text: The prompt as the user wrote it, for display.
        targets: How many label positions count in the loss.
        task_id: The example's task index (``--task-id-column``), batched as the model's ``task_ids``.
    """

    input_ids: list[int]
    labels: list[int] | int
    prompt_ids: list[int] | None = None
    reference: str | None = None
    prompt_text: str | None = None
    targets: int = field(default=0)
    task_id: int | None = None


def label_names(task: str, records: Sequence[dict[str, Any]], column: str) -> list[str] | None:
    """Sorted distinct label values of a classification task as strings (ints sort numerically)."""
    if task not in ("seq-cls", "token-cls"):
        return None
    values: set = set()
    for record in records:
        value = record[column]
        if task == "token-cls":
            if not isinstance(value, list):
                raise TrainError(f"column {column!r} must hold a list of tags per example for --task token-cls")
            values.update(value)
        else:
            values.add(value)
    if all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values):
        return [str(v) for v in sorted({int(v) for v in values})]
    return sorted(str(v) for v in values)


class Tokenizer:
    """Turns records into :class:`Example`s for one task with one tokenizer."""

    def __init__(self, tokenizer, task: str, columns: Columns, max_length: int, chat: bool,
                 labels: list[str] | None = None) -> None:
        self.tok = tokenizer
        self.task = task
        self.columns = columns
        self.max_length = max_length
        self.chat = chat
        self.label_ids = {name: i for i, name in enumerate(labels or [])}
        if chat and not getattr(tokenizer, "chat_template", None):
            raise TrainError("--chat needs a tokenizer with a chat template; this model's tokenizer has none")

    # prompt formatting is shared with `deltatune generate`
    def prompt_ids(self, prompt: str) -> list[int]:
        return encode_prompt(self.tok, prompt, self.chat)

    def __call__(self, record: dict[str, Any]) -> Example:
        example = getattr(self, "_" + self.task.replace("-", "_"))(record)
        if self.columns.task_id is not None:
            example.task_id = task_index(record[self.columns.task_id], self.columns.task_id)
        return example

    def _causal_lm(self, record: dict[str, Any]) -> Example:
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        if self.columns.text is not None:
            ids = self.tok(str(record[self.columns.text]), add_special_tokens=True)["input_ids"]
            ids = (ids + eos)[: self.max_length]
            return Example(ids, list(ids), targets=max(len(ids) - 1, 0))
        prompt = str(record[self.columns.prompt])
        completion = str(record[self.columns.completion])
        p = self.prompt_ids(prompt)
        c = self.tok(completion, add_special_tokens=False)["input_ids"] + eos
        c = c[: self.max_length - 1]
        p_kept = p[max(0, len(p) - (self.max_length - len(c))):]  # keep the end of a long prompt
        return Example(p_kept + c, [IGNORE] * len(p_kept) + c, p_kept, completion.strip(), prompt, targets=len(c))

    def _seq2seq(self, record: dict[str, Any]) -> Example:
        prompt, target = str(record[self.columns.prompt]), str(record[self.columns.completion])
        ids = self.tok(prompt, truncation=True, max_length=self.max_length)["input_ids"]
        labels = self.tok(text_target=target, truncation=True, max_length=self.max_length)["input_ids"]
        return Example(ids, labels, ids, target.strip(), prompt, targets=len(labels))

    def _seq_cls(self, record: dict[str, Any]) -> Example:
        text = str(record[self.columns.text])
        ids = self.tok(text, truncation=True, max_length=self.max_length)["input_ids"]
        label = str(record[self.columns.label])
        return Example(ids, self.label_ids[label], None, label, text, targets=1)

    def _token_cls(self, record: dict[str, Any]) -> Example:
        words, tags = record[self.columns.text], record[self.columns.label]
        if not isinstance(words, list) or len(words) != len(tags):
            raise TrainError(
                f"--task token-cls needs {self.columns.text!r} to be a list of words with one tag each in "
                f"{self.columns.label!r}; got {type(words).__name__} of length {len(words)} and {len(tags)} tags"
            )
        enc = self.tok([str(w) for w in words], is_split_into_words=True, truncation=True, max_length=self.max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE if word is None or word == previous else self.label_ids[str(tags[word])])
            previous = word
        return Example(enc["input_ids"], labels, None, " ".join(map(str, tags)), " ".join(map(str, words)),
                       targets=sum(label != IGNORE for label in labels))


def task_index(value: Any, column: str) -> int:
    """A task-id cell as an index: a non-negative integer (or its decimal text, as CSV files hold it).

    Raises:
        TrainError: anything else.
    """
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise TrainError(f"column {column!r} (--task-id-column) must hold task indices 0, 1, ...; got {value!r}")


def task_count(examples: Sequence[Example]) -> int | None:
    """The number of tasks the examples' ``task_id`` s name (largest + 1), or ``None`` when they carry none."""
    ids = [e.task_id for e in examples if e.task_id is not None]
    return max(ids) + 1 if ids else None


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt as training saw it: raw text, or a user turn in the chat template."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def tokenize(records: Sequence[dict[str, Any]], tokenizer: Tokenizer, source: str) -> list[Example]:
    examples = [tokenizer(r) for r in records]
    kept = [e for e in examples if e.targets > 0]
    if not kept:
        raise TrainError(f"{source}: no example has anything to learn after tokenisation (check --max-length)")
    return kept


def split_eval(records: list[dict[str, Any]], split: float, seed: int) -> tuple[list, list]:
    """Hold out ``split`` (fraction < 1, or a count) of ``records``, chosen by a seeded shuffle."""
    if split <= 0:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = int(split) if split >= 1 else max(1, round(split * len(records)))
    if n_eval >= len(records):
        raise TrainError(
            f"--eval-split {split:g} would hold out {n_eval} of {len(records)} examples, leaving none to train on"
        )
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [records[i] for i in train], [records[i] for i in held]


# --- batching --------------------------------------------------------------------------------------------------------

def collate(examples: Sequence[Example], task: str, pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of examples into model inputs (``labels`` padded with ``IGNORE``; ``task_ids`` where the examples
    have task indices)."""
    length = max(len(e.input_ids) for e in examples)

    def pad(seq: list[int], value: int, n: int) -> list[int]:
        fill = [value] * (n - len(seq))
        return fill + seq if side == "left" else seq + fill

    batch = {
        "input_ids": torch.tensor([pad(e.input_ids, pad_id, length) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0, length) for e in examples]),
    }
    if task == "seq-cls":
        batch["labels"] = torch.tensor([e.labels for e in examples])
    elif task == "seq2seq":
        n = max(len(e.labels) for e in examples)
        batch["labels"] = torch.tensor([pad(e.labels, IGNORE, n) for e in examples])
    else:
        batch["labels"] = torch.tensor([pad(e.labels, IGNORE, length) for e in examples])
    if examples[0].task_id is not None:
        batch["task_ids"] = torch.tensor([e.task_id for e in examples])
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of ``epoch``: a permutation that depends only on (seed, epoch), never on RNG state, so a
    resumed run sees exactly the batches the uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of the global batches (one optimizer step each) of ``epoch``; the last one may be smaller."""
    order = epoch_order(n, seed, epoch)
    return [order[i: i + batch] for i in range(0, n, batch)]


def shard(indices: list[int], parts: int) -> list[list[int]]:
    """Split one global batch into ``parts`` near-equal micro-batches (grad-accum steps x processes), in order."""
    size, extra = divmod(len(indices), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(indices[start:end])
        start = end
    return out


def batches_of(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]
