"""``deltatune train``: fine-tune an adapter on a data set (see docs/training.md)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from ._common import one_line_errors

DESCRIPTION = """\
Fine-tune a PEFT adapter. With no arguments, runs the default preset: SmolLM2-135M-Instruct learns to answer
"positive" or "negative" for movie reviews with LoRA, in about 5 minutes on 2 CPU cores, and shows held-out accuracy
and answers before and after training. Everything runs offline.

Examples:
  deltatune train
  deltatune train --preset sentiment-minilm
  deltatune train --model PATH --data train.jsonl --method lora --r 16 --target all-linear --epochs 3 --out runs/x
  deltatune train --resume runs/x
  accelerate launch --multi_gpu --num_processes 2 -m deltatune train ... --out runs/x   (CPU: gloo)
"""

EPILOG = """\
data formats: .jsonl/.json/.csv/.tsv files, a directory with train.<ext> (+ validation.<ext>), a datasets
save_to_disk directory, or the built-in 'polarity'. Default columns: causal-lm prompt+completion (or text),
seq2seq prompt+completion, seq-cls text+label, token-cls tokens+tags.
"""


def _method_option(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.replace("-", "_"), value


def register(subparsers) -> None:
    from ..train.presets import BUILTIN_DATA, BUILTIN_MODELS, DEFAULT_PRESET, PRESETS

    p = subparsers.add_parser(
        "train", help="fine-tune an adapter (no arguments: a 5-minute offline demo)", description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"start from a preset's options (default when neither --model nor --data is given: "
                        f"{DEFAULT_PRESET}); options given here override it")
    g.add_argument("--model", metavar="PATH",
                   help=f"base model: a transformers directory, a .gguf file, a built-in "
                        f"({', '.join(BUILTIN_MODELS)}) or a cached hub id")
    g.add_argument("--data", metavar="PATH",
                   help=f"training data: .jsonl/.json/.csv/.tsv, a directory, or a built-in "
                        f"({', '.join(BUILTIN_DATA)})")
    g.add_argument("--eval-data", metavar="PATH", help="held-out data (default: hold out --eval-split of --data)")
    g.add_argument("--eval-split", type=float, metavar="F",
                   help="fraction (<1) or count (>=1) of --data held out for evaluation; 0: none (default 0.1)")
    g.add_argument("--task", choices=["causal-lm", "seq2seq", "seq-cls", "token-cls"],
                   help="what the model learns (default: from the model's architecture, then the data's columns)")
    g.add_argument("--text-column", metavar="NAME", help="column with the text (causal-lm raw text, seq-cls, "
                   "token-cls word list); default text / tokens")
    g.add_argument("--prompt-column", metavar="NAME", help="column with the prompt / source (default prompt)")
    g.add_argument("--completion-column", metavar="NAME",
                   help="column with the completion / target (default completion)")
    g.add_argument("--label-column", metavar="NAME", help="column with the label(s) (default label / tags)")
    g.add_argument("--task-id-column", metavar="NAME",
                   help="column with each example's task index (0, 1, ...), passed to the model as task_ids: "
                        "needed by --method poly and multitask_prompt_tuning (their n_tasks / num_tasks default to "
                        "the largest index + 1)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction,
                   help="wrap prompts in the tokenizer's chat template as a user turn (causal-lm; instruct models)")
    g.add_argument("--max-length", type=int, metavar="N",
                   help="longest tokenised example; longer prompts lose their start (default 512)")

    g = p.add_argument_group("method")
    g.add_argument("--method", help="PEFT method (default lora)")
    g.add_argument("--r", "--rank", dest="r", type=int, metavar="N",
                   help="LoRA rank (default 8); spell it --rank after torchrun, whose own parser takes --r")
    g.add_argument("--lora-alpha", "--alpha", dest="lora_alpha", type=float, metavar="A",
                   help="LoRA scale numerator; the update is scaled by alpha/r (default 2*r when --r is given)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the LoRA input (default 0)")
    g.add_argument("--target", metavar="MODULES",
                   help="modules to adapt: all-linear, a regex, or comma-separated names (default: the model "
                        "type's attention projections)")
    g.add_argument("--exclude", metavar="MODULES", help="modules never adapted (same forms as --target)")
    g.add_argument("--layers", metavar="I,J", help="only adapt these layer indices")
    g.add_argument("--modules-to-save", metavar="NAMES",
                   help="modules trained in full and saved with the adapter (classification heads are added "
                        "automatically)")
    g.add_argument("--use-dora", action=argparse.BooleanOptionalAction, help="DoRA: weight-decomposed LoRA")
    g.add_argument("--use-rslora", action=argparse.BooleanOptionalAction, help="rsLoRA scaling alpha/sqrt(r)")
    g.add_argument("--init-lora-weights", metavar="SCHEME",
                   help="LoRA init: true, false, gaussian, pissa, pissa_niter_N, olora")
    g.add_argument("--method-option", dest="method_options", action="append", type=_method_option,
                   metavar="NAME=VALUE", help="any other field of the method's config (VALUE parsed as JSON); "
                                              "repeatable")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, metavar="E", help="passes over the training data (default 3)")
    g.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps; overrides --epochs")
    g.add_argument("--batch-size", type=int, metavar="N", help="examples per process per micro-step (default 8)")
    g.add_argument("--grad-accum", type=int, metavar="N",
                   help="micro-steps per optimizer step; global batch = batch-size x processes x grad-accum "
                        "(default 1)")
    g.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default 2e-4)")
    g.add_argument("--lr-schedule", choices=["linear", "cosine", "constant"],
                   help="after warmup: linear or cosine decay to 0, or constant (default linear)")
    g.add_argument("--warmup-ratio", type=float, metavar="F", help="fraction of steps warming up (default 0)")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="warmup steps (overrides --warmup-ratio)")
    g.add_argument("--weight-decay", type=float, metavar="W", help="AdamW weight decay on matrices (default 0)")
    g.add_argument("--max-grad-norm", type=float, metavar="N", help="gradient clipping norm; 0: off (default 1)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward to save memory")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 mixed precision")
    g.add_argument("--quantize", choices=["nf4", "int8", "torchao-int8"],
                   help="QLoRA: load the base model quantized (bitsandbytes nf4 / LLM.int8, torchao int8 "
                        "weight-only; pip install 'deltatune[quant]'); the adapter trains in float32")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction,
                   help="fast training path: chunked loss without full logits, bfloat16 frozen base where the "
                        "hardware is fast at it (default on; --no-fast: the standard path)")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="fit a training step in SIZE (e.g. 6GiB) by checkpointing the fewest decoder layers, "
                        "measured on the longest batch (fast path only)")
    g.add_argument("--seed", type=int, help="seed for adapter init, data order and dropout (default 0)")

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-steps", type=int, metavar="N",
                   help="evaluate every N steps, besides before and after training; 0: only then (default 0)")
    g.add_argument("--early-stopping-patience", type=int, metavar="N",
                   help="stop after N evaluations without a better eval loss (needs --eval-steps)")
    g.add_argument("--eval-generate", type=int, metavar="N",
                   help="held-out examples answered by generation for the exact-match metric; 0: off (default 64)")
    g.add_argument("--show-examples", type=int, metavar="N",
                   help="held-out examples printed with answers before/after training (default 3)")
    g.add_argument("--log-steps", type=int, metavar="N", help="write a metrics line every N steps (default 1)")
    g.add_argument("--save-steps", type=int, metavar="N",
                   help="checkpoint every N steps and at the end; 0: only at the end (default 50)")
    g.add_argument("--save-total-limit", type=int, metavar="N", help="checkpoints kept (default 2)")

    g = p.add_argument_group("run directory")
    g.add_argument("--out", metavar="DIR", help="run directory (default runs/<preset or run>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace a run directory holding a different run")
    g.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its last checkpoint; other options may be omitted")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)
    one_line_errors(p)


def resolve_options(given: dict[str, Any]):
    """Complete options from what the command line gave: the stored run's (``--resume``) or a preset's, overridden
    by the given ones.

    Raises:
        TrainError: ``--resume`` with options that differ from the run's, an unknown preset, or missing inputs.
    """
    from ..train.options import NOT_IDENTITY, TrainError, TrainOptions, field_names
    from ..train.presets import DEFAULT_PRESET, PRESETS
    from ..train.state import read_run

    given = {k: v for k, v in given.items() if k in field_names()}
    for key in ("model", "data", "eval_data", "out", "resume"):
        # Existing paths are stored absolute, so a run can be resumed, generated from or merged from anywhere.
        if isinstance(given.get(key), str) and os.path.exists(given[key]):
            given[key] = os.path.abspath(given[key])
    if "method_options" in given:
        given["method_options"] = dict(given["method_options"])
    if given.get("resume"):
        directory = given["resume"]
        stored = read_run(directory) if os.path.isdir(directory) else None
        if stored is None:
            raise TrainError(f"--resume {directory}: not a run directory (no run.json)")
        if given.get("out") not in (None, directory):
            raise TrainError(
                f"--out {given['out']} differs from --resume {directory}; a resumed run stays in its directory"
            )
        options = stored["options"]
        changed = ["--" + k.replace("_", "-") for k, v in given.items()
                   if k not in NOT_IDENTITY and v != options.get(k)]
        if changed:
            raise TrainError(
                f"--resume {directory}: {', '.join(changed)} differ(s) from the run's options; drop them to continue "
                f"the run as it was, or start a new run with another --out"
            )
        merged = {**options, **{k: v for k, v in given.items() if k in NOT_IDENTITY}, "out": directory,
                  "overwrite": False}
        return TrainOptions.from_dict(merged)
    preset = given.get("preset")
    if preset is None and "model" not in given and "data" not in given:
        preset = DEFAULT_PRESET
    base: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    merged = {**base, **given, "preset": preset}
    for required in ("model", "data"):
        if merged.get(required) is None:
            raise TrainError(
                f"--{required} is required (or pick a --preset; no arguments at all runs {DEFAULT_PRESET})"
            )
    if merged.get("out") is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainError("--out is required when training with more than one process")
        merged["out"] = os.path.join("runs", f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    return TrainOptions.from_dict(merged)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import train

    options = resolve_options(vars(args))
    train(options)
    return 0
