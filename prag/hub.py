"""Model names -> local files, without touching the network unless the user asks for it.

A name that is neither a local path nor in the local Hugging Face cache would make
transformers / sentence-transformers try the hub; with no network that is a minute of retries
before a confusing error. ``resolve_local_model`` answers at once instead, saying how to download
the model; ``allow_download=True`` (the ``--allow-download`` flag) is the explicit opt-in.
"""

from __future__ import annotations

import os
from pathlib import Path

from prag.errors import PragError


def hub_offline() -> bool:
    """True when the environment forbids hub access (``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(name: str, probe_file: str = "config.json") -> Path | None:
    """The local Hugging Face cache snapshot of hub id ``name`` (a pure file-system lookup), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name), probe_file)
    except Exception:  # an invalid repo id, e.g. a path that does not exist
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def download_hint(name: str, flag: str | None = "--allow-download") -> str:
    """How to get ``name`` onto this machine; every 'model not found' message ends with it."""
    opt_in = f", or pass {flag} to let this command fetch it" if flag else ""
    return f"download it first with `hf download {name}` (older clients: `huggingface-cli download {name}`){opt_in}"


def resolve_local_model(name: str | os.PathLike, *, what: str = "model", probe_file: str = "config.json",
                        allow_download: bool = False, flag: str | None = "--allow-download") -> Path | None:
    """A local directory for ``name``: the path itself, or its Hugging Face cache snapshot.

    Not found locally: a ``PragError`` saying how to download it, at once (no network call), unless
    ``allow_download`` and the hub is not switched off, in which case ``None`` means "let the
    library download it". ``flag`` is the command's opt-in flag named in the message (None: it has none).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PragError(f"{what} not found: {name} is a file, not a model directory or a Hugging Face model name")
    text = str(name)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        # spelled as a path (a hub id is "org/name"): no hub lookup, no download hint
        raise PragError(f"{what} not found: {name} does not exist (expected a local model directory)")
    snapshot = cached_snapshot(str(name), probe_file)
    if snapshot is not None:
        return snapshot
    if allow_download and not hub_offline():
        return None
    reason = ("HF_HUB_OFFLINE=1 forbids downloads" if allow_download
              else "downloads are off by default" if flag else "this command never downloads models")
    raise PragError(f"{what} not found: {name} is neither a local directory nor a model in the Hugging Face "
                    f"cache, and {reason}; {download_hint(str(name), flag if not hub_offline() else None)}")
