"""``deltatune merge``: fold a trained adapter into its base and write a standalone transformers model."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from ._common import one_line_errors

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
    from ..train.options import TrainError

    out = os.path.abspath(args.out)
    if os.path.isfile(out):
        raise TrainError(f"--out {args.out} is a file; choose a directory")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise TrainError(f"--out {args.out} already holds files; choose another directory or pass --overwrite")
    source = locate(args.run, args.model)
    model, tokenizer = load(source)
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, _DTYPES[args.dtype]))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    try:
        try:
            with quiet_transformers():
                merged.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        except OSError as exc:
            raise TrainError(f"could not write the merged model ({exc.strerror or exc}); --out is unchanged") from None
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".old-merge-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {source.adapter_dir} into {source.model}: {args.out} "
          f"(load with transformers' AutoModel*.from_pretrained)")
    return 0
