"""deltatune.train.data: reading, columns, tokenising, splitting and batching."""

from __future__ import annotations

import json

import pytest

from deltatune.train import data as D
from deltatune.train.options import TrainError, TrainOptions
from tests.train_utils import ner_records, sentiment_records, write_jsonl, write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


# --- reading -----------------------------------------------------------------------------------------------------

def test_reads_jsonl_json_csv_tsv(tmp_path):
    records = sentiment_records(4)
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records))
    (tmp_path / "c.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in records))
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in records))
    assert D.read_records(str(tmp_path / "a.jsonl")) == (records, None)
    assert D.read_records(str(tmp_path / "b.json")) == (records, None)
    for name in ("c.csv", "d.tsv"):
        rows, _ = D.read_records(str(tmp_path / name))
        assert [(r["text"], r["label"]) for r in rows] == [(r["text"], r["label"]) for r in records]


def test_reads_directory_with_validation_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sentiment_records(6))
    write_jsonl(tmp_path / "validation.jsonl", sentiment_records(2, seed=1))
    train, held = D.read_records(str(tmp_path))
    assert len(train) == 6 and len(held) == 2


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: (p / "x.jsonl").write_text(""), "holds no examples"),
        (lambda p: (p / "x.jsonl").write_text('{"a": 1}\n{"a": \n'), "x.jsonl:2: not valid JSON"),
        (lambda p: (p / "x.jsonl").write_text("[1, 2]\n"), "expected an object"),
        (lambda p: (p / "x.jsonl").write_bytes(b'{"a": "\xff"}\n'), "not UTF-8"),
    ],
)
def test_read_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(TrainError, match=message):
        D.read_records(str(tmp_path / "x.jsonl"))


def test_unknown_format_and_directory_without_train(tmp_path):
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(TrainError, match="unknown data format"):
        D.read_records(str(tmp_path / "x.parquet"))
    (tmp_path / "d").mkdir()
    with pytest.raises(TrainError, match="no train"):
        D.read_records(str(tmp_path / "d"))


# --- columns -----------------------------------------------------------------------------------------------------

def test_causal_lm_prefers_prompt_completion_then_text():
    pairs = D.choose_columns("causal-lm", [{"prompt": "a", "completion": "b", "text": "c"}], {}, "data")
    assert (pairs.prompt, pairs.completion, pairs.text) == ("prompt", "completion", None)
    text = D.choose_columns("causal-lm", [{"text": "c"}], {}, "data")
    assert (text.prompt, text.text) == (None, "text")


def test_missing_column_names_it_and_the_option():
    records = [{"text": "a", "label": "x"}, {"text": "b"}]
    with pytest.raises(TrainError, match=r"example 2 has no column 'label'.*--label-column"):
        D.choose_columns("seq-cls", records, {}, "train.jsonl")
    with pytest.raises(TrainError, match="no column 'review'"):
        D.choose_columns("seq-cls", records[:1], {"text": "review"}, "train.jsonl")


def test_column_option_that_does_not_apply_to_the_task():
    with pytest.raises(TrainError, match="--label-column does not apply to --task causal-lm"):
        D.choose_columns("causal-lm", [{"text": "a"}], {"label": "y"}, "data")


# --- tokenising --------------------------------------------------------------------------------------------------

def test_causal_prompt_completion_masks_the_prompt(tok):
    columns = D.Columns(prompt="prompt", completion="completion")
    example = D.Tokenizer(tok, "causal-lm", columns, 64, chat=False)({"prompt": "review : great film",
                                                                        "completion": "positive"})
    n_prompt = len(example.prompt_ids)
    assert example.labels[:n_prompt] == [D.IGNORE] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:] == tok("positive")["input_ids"] + [2]
    assert example.targets == 2 and example.reference == "positive"


def test_chat_wraps_the_prompt_and_long_prompts_lose_their_start(tok):
    columns = D.Columns(prompt="prompt", completion="completion")
    chat = D.Tokenizer(tok, "causal-lm", columns, 64, chat=True)({"prompt": "great film", "completion": "positive"})
    assert tok.decode(chat.prompt_ids) == "user : great film </s> assistant :"
    short = D.Tokenizer(tok, "causal-lm", columns, 4, chat=False)({"prompt": "the film was great",
                                                                    "completion": "positive"})
    assert len(short.input_ids) == 4
    assert tok.decode(short.input_ids) == "was great positive </s>"


def test_chat_needs_a_template(tmp_path):
    plain = write_tokenizer(tmp_path, chat=False)
    with pytest.raises(TrainError, match="chat template"):
        D.Tokenizer(plain, "causal-lm", D.Columns(prompt="p", completion="c"), 64, chat=True)


def test_seq_cls_and_token_cls_labels(tok):
    labels = D.label_names("seq-cls", sentiment_records(4), "label")
    assert labels == ["negative", "positive"]
    ex = D.Tokenizer(tok, "seq-cls", D.Columns(text="text", label="label"), 64, False, labels)(
        {"text": "great film", "label": "positive"})
    assert ex.labels == 1 and ex.targets == 1
    records = ner_records(3)
    tags = D.label_names("token-cls", records, "tags")
    ex = D.Tokenizer(tok, "token-cls", D.Columns(text="tokens", label="tags"), 64, False, tags)(records[0])
    assert len(ex.labels) == len(ex.input_ids) == 4 and ex.targets == 4
    assert D.label_names("seq-cls", [{"label": 2}, {"label": 10}], "label") == ["2", "10"]


def test_split_eval_is_seeded_and_checks_size():
    records = [{"i": i} for i in range(10)]
    train, held = D.split_eval(records, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8 and D.split_eval(records, 0.2, seed=0) == (train, held)
    assert len(D.split_eval(records, 3, seed=0)[1]) == 3
    assert D.split_eval(records, 0, seed=0) == (records, [])
    with pytest.raises(TrainError, match="leaving none"):
        D.split_eval(records, 10, seed=0)


# --- batching ----------------------------------------------------------------------------------------------------

def test_global_batches_and_shards_cover_the_epoch():
    batches = D.global_batches(10, 4, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == D.global_batches(10, 4, seed=1, epoch=0) != D.global_batches(10, 4, seed=1, epoch=1)
    assert D.shard([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]


def test_collate_pads_inputs_and_labels(tok):
    a = D.Example([5, 6, 7], [D.IGNORE, 6, 7])
    b = D.Example([8], [8])
    right = D.collate([a, b], "causal-lm", 0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[D.IGNORE, 6, 7], [8, D.IGNORE, D.IGNORE]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert D.collate([a, b], "causal-lm", 0, side="left")["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


def test_options_validate_with_cli_names():
    with pytest.raises(TrainError, match="--batch-size must be at least 1"):
        TrainOptions(batch_size=0)
    with pytest.raises(TrainError, match="--lr-schedule"):
        TrainOptions(lr_schedule="step")
    a, b = TrainOptions(lr=1e-3, out="x"), TrainOptions(lr=2e-3, out="y")
    assert a.differences(b) == ["--lr"]
