"""``deltatune export --to vllm``: a directory vLLM serves, with the same outputs as base + adapter."""

from __future__ import annotations

import argparse
import os
import shutil

from ._common import check_output_directory, one_line_errors, replace_directory

DESCRIPTION = """\
Write what vLLM needs to serve ADAPTER. An adapter vLLM loads (see `deltatune inspect --check vllm`) is copied as is
(adapter_config.json + adapter_model.safetensors; serve it with --enable-lora --lora-modules NAME=DIR). Any other
adapter vLLM would refuse (DoRA, trained biases or heads, convolution targets, a resized vocabulary, PiSSA/OLoRA,
a rank above 512, a method other than LoRA) is merged into its base model instead: a full transformers model that
vLLM serves without adapter support; its size and the largest logit difference from base + adapter on a random
batch are printed. A prompt-learning adapter has no weights to merge and is refused. The output is written to a
temporary folder and moved into place only when complete.

Example:
  deltatune export runs/x/adapter --to vllm --out served/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write an adapter (or a merged model) that vLLM serves",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (or a run directory)")
    p.add_argument("--to", required=True, choices=["vllm"], help="the serving engine")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write")
    p.add_argument("--model", metavar="PATH", help="base model for a merge (default: the adapter's "
                                                   "base_model_name_or_path)")
    p.add_argument("--max-lora-rank", type=int, metavar="N", help="the server's --max-lora-rank; a larger rank is "
                                                                   "merged instead")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.set_defaults(func=run)
    one_line_errors(p)


def run(args: argparse.Namespace) -> int:
    from ..deploy import check_vllm
    from ..files import CONFIG_NAME, SAFETENSORS_NAME
    from ..train.artifacts import locate

    out = check_output_directory(args.out, "--out", args.overwrite)
    source = locate(args.adapter, args.model)
    verdict = check_vllm(source.adapter_dir, max_lora_rank=args.max_lora_rank)
    if verdict.loads:
        def copy(directory: str) -> None:
            for name in (CONFIG_NAME, SAFETENSORS_NAME):
                shutil.copyfile(os.path.join(source.adapter_dir, name), os.path.join(directory, name))

        replace_directory(out, copy, "adapter")
        print(f"vLLM loads this adapter as is: {args.out} (serve with --enable-lora --max-lora-rank "
              f"{verdict.max_lora_rank} --lora-modules NAME={args.out})")
        return 0
    size, diff = _merged(source, out)
    print(f"vLLM refuses the adapter ({'; '.join(verdict.problems)}).\n"
          f"Wrote the merged model instead: {args.out}, {size / 2**20:.1f} MiB; largest logit difference from base + "
          f"adapter on a random batch: {diff:.3g} (serve it as a plain model, no --enable-lora)")
    return 0


def _merged(source, out: str) -> tuple[int, float]:
    """Merge ``source`` into its base, write it (and the tokenizer) to ``out``; its size on disk and the largest
    absolute logit difference between base + adapter and the merged model on a random batch."""
    import torch

    from ..train._quiet import quiet_transformers
    from ..train.artifacts import load

    model, tokenizer = load(source)
    base = model.get_base_model()
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (2, 16), generator=gen)}
    with torch.no_grad():
        before = model(**inputs).logits
        merged = model.merge_and_unload()  # refuses a prompt-learning adapter before anything is written
        diff = (merged(**inputs).logits - before).abs().max().item()

    def fill(directory: str) -> None:
        with quiet_transformers():
            merged.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

    replace_directory(out, fill, "merged model")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    return size, diff
