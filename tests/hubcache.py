"""Write real Hugging Face hub-cache layouts for offline resolution tests.

The layout is the one ``huggingface_hub`` itself writes and reads::

    <cache>/models--org--name/
        blobs/<sha256 of content>
        refs/<branch or tag>            -> text file holding a 40-hex commit
        snapshots/<commit>/<path>       -> symlink to ../../blobs/<sha256> (a copy where symlinks are unavailable)
        .no_exist/<commit>/<path>       -> empty marker: "this file is known not to exist at that commit"

Tests point ``cache_dir`` (or ``huggingface_hub.constants.HF_HUB_CACHE``) at it with ``HF_HUB_OFFLINE=1`` and let
``hf_hub_download`` resolve branches, tags, commits and sub-folders exactly as it would for a downloaded repo.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def fake_commit(seed: str) -> str:
    """A deterministic 40-hex commit id."""
    return hashlib.sha1(seed.encode()).hexdigest()


def write_snapshot(
    cache_dir: str | os.PathLike,
    repo_id: str,
    files: Mapping[str, bytes],
    *,
    commit: str,
    refs: Iterable[str] = ("main",),
    missing: Iterable[str] = (),
) -> Path:
    """Add a snapshot of ``repo_id`` at ``commit`` holding ``files`` (repo-relative path -> bytes), point ``refs``
    at it, and mark ``missing`` paths as known-absent. Returns the snapshot directory."""
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = storage / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:  # no symlinks (some Windows setups): huggingface_hub copies too
            target.write_bytes(data)
    for ref in refs:
        ref_path = storage / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(commit)
    for rel in missing:
        marker = storage / ".no_exist" / commit / rel
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def directory_files(directory: str | os.PathLike, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``directory`` as ``{prefix + relative posix path: bytes}`` (to copy a saved dir into a repo)."""
    root = Path(directory)
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
