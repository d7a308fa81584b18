"""``deltatune generate``: answer prompts with a trained adapter (KV cache on)."""

from __future__ import annotations

import argparse
import sys

from ._common import one_line_errors

DESCRIPTION = """\
Generate with a trained adapter. RUN is a run directory (its final adapter, or its newest checkpoint while training
is still going) or an adapter directory. The base model, prompt format (chat template) and task come from the run.
For classification runs, prints the predicted label and its probability instead.

Examples:
  deltatune generate runs/x --prompt "Is this movie review positive or negative?\\nReview: a gem."
  deltatune generate runs/x --prompt "Once upon a time" --do-sample --temperature 0.8 --num-return-sequences 3
  deltatune generate runs/x --prompt "..." --no-adapter        # the base model, for comparison
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate with a trained adapter", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory or adapter directory")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt (repeatable; '\\n' in TEXT is a newline); '-' reads one prompt from stdin")
    p.add_argument("--model", metavar="PATH", help="base model (default: the run's, or the adapter's "
                                                   "base_model_name_or_path)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: as in training)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (implies --do-sample)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass (implies --do-sample)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens (implies --do-sample)")
    p.add_argument("--repetition-penalty", type=float, metavar="X", help="penalise repeated tokens (>1)")
    p.add_argument("--num-return-sequences", type=int, default=1, metavar="N", help="answers per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-adapter", action="store_true", help="run the base model alone")
    p.add_argument("--task-id", type=int, metavar="N",
                   help="task index of the prompts, for an adapter that takes task_ids (poly, "
                        "multitask_prompt_tuning)")
    p.set_defaults(func=run)
    one_line_errors(p)


def _task_ids(task_id: int | None, config) -> dict:
    """``{"task_ids": ...}`` for the model's calls: ``--task-id`` for an adapter that takes task ids, else nothing.

    Raises:
        TrainError: ``--task-id`` missing for such an adapter, or given for another.
    """
    import torch

    from ..train.models import TASK_COUNT_FIELDS
    from ..train.options import TrainError

    method = config.peft_type.value
    if method not in TASK_COUNT_FIELDS:
        if task_id is not None:
            raise TrainError(f"--task-id does not apply to a {method} adapter (it takes no task ids)")
        return {}
    if task_id is None:
        raise TrainError(f"a {method} adapter needs --task-id: the task index of the prompts")
    return {"task_ids": torch.tensor([task_id])}


def _prompts(args: argparse.Namespace) -> list[str]:
    out = []
    for text in args.prompt:
        out.append(sys.stdin.read() if text == "-" else text.replace("\\n", "\n"))
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train.artifacts import load, locate
    from ..train.data import encode_prompt
    from ..train.options import TrainError

    for name in ("max_new_tokens", "num_return_sequences"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    source = locate(args.run, args.model)
    chat = source.chat if args.chat is None else args.chat
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k") if getattr(args, k) is not None}
    if source.task in ("seq-cls", "token-cls"):
        given = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                 if getattr(args, k) is not None] + (["--do-sample"] if args.do_sample else [])
        if given or args.chat:
            raise TrainError(f"{', '.join(given or ['--chat'])} does not apply to a {source.task} run")
    model, tokenizer = load(source)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise TrainError("--chat: this model's tokenizer has no chat template")
    tasks = _task_ids(args.task_id, model.active_peft_config)
    torch.manual_seed(args.seed)
    context = model.disable_adapter() if args.no_adapter else _nothing()
    prompts = _prompts(args)
    with torch.no_grad(), context:
        if source.task == "seq-cls":
            for prompt in prompts:
                enc = tokenizer(prompt, return_tensors="pt", truncation=True)
                probs = model(**enc, **tasks).logits.softmax(-1)[0]
                best = int(probs.argmax())
                names = source.labels or [str(i) for i in range(len(probs))]
                print(f"{names[best]}\t{float(probs[best]):.3f}")
            return 0
        if source.task == "token-cls":
            for prompt in prompts:
                words = prompt.split()
                enc = tokenizer(words, is_split_into_words=True, return_tensors="pt", truncation=True)
                pred = model(**enc, **tasks).logits.argmax(-1)[0].tolist()
                names = source.labels or []
                seen, tags = set(), []
                for pos, word in enumerate(enc.word_ids()):
                    if word is not None and word not in seen:
                        seen.add(word)
                        tags.append(f"{words[word]}/{names[pred[pos]] if names else pred[pos]}")
                print(" ".join(tags))
            return 0
        do_sample = args.do_sample or bool(sampling)
        for i, prompt in enumerate(prompts):
            if source.task == "causal-lm":
                ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)])
            else:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample, use_cache=True,
                          num_return_sequences=args.num_return_sequences, pad_token_id=tokenizer.pad_token_id)
            if do_sample:
                kwargs.update(sampling)
            else:  # greedy: neutralise sampling defaults a generation_config may carry
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if args.repetition_penalty is not None:
                kwargs["repetition_penalty"] = args.repetition_penalty
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs, **tasks)
            if source.task == "causal-lm":
                out = out[:, ids.shape[1]:]
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            for j, text in enumerate(texts):
                if len(prompts) > 1 or len(texts) > 1:
                    print(f"--- prompt {i + 1}" + (f", answer {j + 1}" if len(texts) > 1 else ""))
                print(text.strip())
    return 0


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
