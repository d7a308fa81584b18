"""``deltatune merge``: fold a trained adapter into its base and write a standalone transformers model."""

from __future__ import annotations

import argparse

from ._common import check_output_directory, one_line_errors, replace_directory

DESCRIPTION = """\
Merge a trained adapter into its base model and save the result as a plain transformers model directory (weights,
config, tokenizer) that AutoModelFor*.from_pretrained loads without deltatune. RUN is a run directory or an adapter
directory. The output is written to a temporary folder and moved into place only when complete.

Example:
  deltatune merge runs/x --out merged/
"""

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run directory or adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument("--model", metavar="PATH", help="base model (default: the run's, or the adapter's "
                                                   "base_model_name_or_path)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="dtype of the saved weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.set_defaults(func=run)
    one_line_errors(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train._quiet import quiet_transformers
    from ..train.artifacts import load, locate

    out = check_output_directory(args.out, "--out", args.overwrite)
    source = locate(args.run, args.model)
    model, tokenizer = load(source)
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, _DTYPES[args.dtype]))

    def fill(directory: str) -> None:
        with quiet_transformers():
            merged.save_pretrained(directory)
            tokenizer.save_pretrained(directory)

    replace_directory(out, fill, "merged model")
    print(f"merged {source.adapter_dir} into {source.model}: {args.out} "
          f"(load with transformers' AutoModel*.from_pretrained)")
    return 0
