"""``deltatune merge``: a standalone transformers model that computes what base + adapter computed."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from deltatune import PeftModel
from deltatune.cli import main
from deltatune.train import TrainOptions, train
from tests.train_utils import one_thread, sentiment_records, write_bert, write_jsonl, write_llama


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    llama, bert = write_llama(root / "llama"), write_bert(root / "bert")
    data = write_jsonl(root / "train.jsonl", sentiment_records(24))
    common = dict(data=data, r=4, lr=2e-2, max_steps=3, eval_split=0, progress=False)
    with one_thread():
        train(TrainOptions(model=llama, target="all-linear", out=str(root / "lm"), **common))
        train(TrainOptions(model=bert, task="seq-cls", target="query,value", out=str(root / "cls"), **common))
    return {"llama": llama, "bert": bert, "lm": root / "lm", "cls": root / "cls"}


def merge(argv, capsys) -> tuple[int, str]:
    code = main(["merge", *argv])
    return code, capsys.readouterr().err


def test_merged_causal_lm_loads_without_deltatune_and_matches(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _ = merge([str(runs["lm"]), "--out", str(out)], capsys)
    assert code == 0
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["llama"]),
                                        runs["lm"] / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("review : the film was great sentiment ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_merged_classifier_keeps_head_and_labels(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge([str(runs["cls"]), "--out", str(out)], capsys)[0] == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    base = AutoModelForSequenceClassification.from_pretrained(runs["bert"], num_labels=2)
    adapted = PeftModel.from_pretrained(base, runs["cls"] / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_existing_output_needs_overwrite_and_is_replaced_whole(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, err = merge([str(runs["lm"]), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "already holds files" in err and (out / "old.txt").exists()
    assert merge([str(runs["lm"]), "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folders left behind


def test_bfloat16_output(runs, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert merge([str(runs["lm"]), "--out", str(out), "--dtype", "bfloat16"], capsys)[0] == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.dtype == torch.bfloat16


def test_missing_run_is_one_line(tmp_path, capsys):
    code, err = merge([str(tmp_path / "nope"), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "m").exists()
