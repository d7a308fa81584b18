"""``deltatune train --task-id-column``: each record's task index reaches the model as ``task_ids`` in training and
evaluation, for the methods that take them (Poly, multitask prompt tuning), and misuse is one clear error."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train import TrainError, TrainOptions, train
from tests.train_utils import sentiment_records, write_jsonl, write_llama

# per method: options, and the saved tensors holding one row per task
METHODS = {
    "poly": (dict(target="q_proj,v_proj", method_options={"r": 4, "n_skills": 2}), "poly_router.module_logits"),
    "multitask_prompt_tuning": (dict(method_options={"num_virtual_tokens": 2}), "prefix_task_cols"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_ids")
    records = [{**r, "task": 2 * (i % 2)} for i, r in enumerate(sentiment_records(16))]  # tasks 0 and 2, never 1
    return {"llama": write_llama(root / "llama"), "data": write_jsonl(root / "data.jsonl", records)}


def opts(files, tmp_path, **kw) -> TrainOptions:
    base = dict(model=files["llama"], data=files["data"], lr=5e-2, max_steps=2, batch_size=4, eval_split=4,
                eval_generate=2, show_examples=1, save_steps=0, progress=False, out=str(tmp_path / "run"),
                task_id_column="task")
    base.update(kw)
    return TrainOptions(**base)


@pytest.mark.parametrize("method", [
    "poly", pytest.param("multitask_prompt_tuning", marks=pytest.mark.slow),  # ~20 s on 2 busy cores
])
def test_each_records_task_trains_its_own_rows(files, tmp_path, method, capsys):
    """The task count defaults to the largest id + 1 (3); the rows of tasks 0 and 2 train, task 1's (in no record)
    stays at its initial value: the loop handed each record's id, not a constant, to the model."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train.models import build_peft_config

    extra, per_task = METHODS[method]
    options = opts(files, tmp_path, method=method, **extra)
    result = train(options)
    assert result.steps == 2 and "eval_exact_match" in result.after  # generation ran with task_ids too
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["n_tasks" if method == "poly" else "num_tasks"] == 3
    trained = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    set_seed(0)  # the loop's seed before the adapter is built
    fresh = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(files["llama"]),
                              build_peft_config(options, "causal-lm", None, 3))
    initial = fresh.adapter_state_dict()
    keys = [k for k in trained if k.endswith(per_task)]
    assert keys
    for key in keys:
        assert torch.equal(trained[key][1], initial[key][1]), key
        assert not torch.equal(trained[key][0], initial[key][0]) and not torch.equal(trained[key][2], initial[key][2])
    if method == "poly":
        _check_generate_command(files, tmp_path / "run", capsys)


def _check_generate_command(files, run, capsys) -> None:
    """``deltatune generate --task-id`` answers as the adapter does in Python with that task; misuse is one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.cli import main

    prompt = "review : the film was fun sentiment ?"
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "3", "--task-id", "2"]) == 0
    printed = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(files["llama"])
    model = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["llama"]), run / "adapter")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             task_ids=torch.tensor([2]), pad_token_id=tokenizer.pad_token_id)
    assert printed == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    for extra, message in (([], "needs --task-id"), (["--task-id", "3"], r"must lie in \[0, 3\)")):
        assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "1", *extra]) != 0
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the base model's loading progress
        assert last.startswith("deltatune generate: error: ") and re.search(message, last), last


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="poly", task_id_column=None), "--method poly needs --task-id-column"),
        (dict(method="lora"), "--task-id-column does not apply to --method lora"),
        (dict(method="poly", method_options={"n_tasks": 2}), r"n_tasks=2 is too small: the data's task ids go up to 2"),
        (dict(method="poly", task_id_column="nope"), "has no column 'nope'.*--task-id-column"),
        (dict(method="poly", task_id_column="label"), "must hold task indices 0, 1, ...; got 'positive'"),
    ],
)
def test_task_id_misuse_is_one_clear_error_and_writes_nothing(files, tmp_path, change, message):
    with pytest.raises(TrainError, match=message):
        train(opts(files, tmp_path, **change))
    assert not (tmp_path / "run").exists()
