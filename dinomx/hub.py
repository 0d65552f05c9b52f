"""Where a pretrained backbone comes from: a hub model already in the local Hugging Face cache, or
a folder written by ``save_pretrained``. No torch, so that the portal checks a teacher's name
without loading the engine."""
from __future__ import annotations

import re
from pathlib import Path

from dinomx.errors import MissingInput

# A hub id is ``name`` or ``org/name``; the hub itself allows no other shapes.
HUB_PART = r"[A-Za-z0-9](?:[\w-]|\.(?!\.))*"
HUB_ID = re.compile(rf"{HUB_PART}(?:/{HUB_PART})?")


def hub_snapshot(repo_id: str) -> str:
    """The local cache's snapshot folder of hub model ``repo_id``; nothing is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if not HUB_ID.fullmatch(repo_id):
        raise MissingInput(f"hf:{repo_id}: expected a hub id 'org/name' (letters, digits, '-', '_', '.'), never a path")
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as exc:
        raise MissingInput(f"hf:{repo_id}: not in the local Hugging Face cache ({type(exc).__name__}); download it "
                           f"once on a machine with hub access (`hf download {repo_id}`) and copy the cache") from None


def resolve_pretrained(pretrained: str, key: str = "student.pretrained") -> str:
    """``hf:<repo id>`` names a hub model that must already be in the local Hugging Face cache: it
    resolves to that snapshot and never to a folder of the working directory, which
    ``from_pretrained`` would otherwise prefer for a two-part id such as ``hf:outputs/pretrain``.
    Anything else is a local directory written by ``save_pretrained``. ``key``: the config key
    that named it (a student, or one of ``distillation.teachers``), for the error."""
    if pretrained.startswith("hf:"):
        try:
            return hub_snapshot(pretrained[3:])
        except MissingInput as exc:
            raise MissingInput(f"{key}: {exc}") from None
    if not (Path(pretrained) / "config.json").is_file():
        named = "'scratch', 'hf:<repo id>'" if key == "student.pretrained" else "'hf:<repo id>'"
        raise MissingInput(f"{key}: {pretrained!r} is neither {named} nor a directory containing config.json")
    return pretrained
