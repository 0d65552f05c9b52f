"""Who may do what to which dataset, and which S3 keys a request may touch.

Least privilege: no grant, no access (admins manage everything). Levels nest: manage > write >
read. A key is always the dataset's prefix plus a cleaned relative path, so ``..``, absolute
paths, backslashes or encoded tricks never leave the prefix, and prefixes never nest, so one
dataset's prefix cannot reach into another's.
"""
from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from dinomx.errors import UserError
from portal.db import LEVELS, Dataset, Grant, ModelFamily, User, db
from registry.mlflow_service import family_of


class AccessDenied(UserError, PermissionError):
    pass


class BadPath(UserError, ValueError):
    pass


_SEGMENT = re.compile(r"[\w][\w .+=@-]*")  # matched whole (fullmatch): "$" would let a trailing newline in
# S3 keys are at most 1024 bytes (the dataset prefix included); the prefix column holds 512.
MAX_PATH_BYTES = 1024
MAX_PREFIX_CHARS = 512
MAX_SEGMENT_BYTES = 255


def level_of(user: User, dataset: Dataset) -> str | None:
    """The highest level the user holds on the dataset, directly or through a group."""
    if user.is_admin:
        return "manage"
    group_ids = [g.id for g in user.groups]
    grants = db.session.scalars(db.select(Grant).where(
        Grant.dataset_id == dataset.id,
        (Grant.user_id == user.id) | (Grant.group_id.in_(group_ids) if group_ids else db.false()),
    )).all()
    return max((g.level for g in grants), key=LEVELS.index, default=None)


def require(user: User, dataset: Dataset, level: str) -> None:
    held = level_of(user, dataset)
    if held is None or LEVELS.index(held) < LEVELS.index(level):
        raise AccessDenied(f"{user.username} needs {level} on dataset {dataset.name} (holds {held or 'nothing'})")


def visible_datasets(user: User) -> list[tuple[Dataset, str]]:
    datasets = db.session.scalars(db.select(Dataset).order_by(Dataset.name)).all()
    return [(d, level) for d in datasets if (level := level_of(user, d))]


def clean_relative(path: str) -> str:
    """A relative object path made of plain segments; anything else is refused, never repaired."""
    decoded = unicodedata.normalize("NFC", unquote(path or ""))
    if not decoded or decoded.startswith("/") or "\\" in decoded or "\x00" in decoded:
        raise BadPath(f"path: expected a relative path like 'slides/a.svs', got {path!r}")
    if len(decoded.encode()) > MAX_PATH_BYTES:
        raise BadPath(f"path: {len(decoded.encode())} bytes; at most {MAX_PATH_BYTES}")
    segments = decoded.split("/")
    for segment in segments:
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise BadPath(f"path: segment {segment[:40]!r}... is longer than {MAX_SEGMENT_BYTES} bytes")
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise BadPath(f"path: segment {segment!r} of {path!r} is not allowed (letters, digits, space, . _ - + = @)")
    return "/".join(segments)


def object_key(dataset: Dataset, path: str) -> str:
    key = dataset.prefix + clean_relative(path)
    if len(key.encode()) > MAX_PATH_BYTES:
        raise BadPath(f"path: the object key {key[:60]!r}... would be longer than {MAX_PATH_BYTES} bytes")
    return key


def clean_prefix(prefix: str) -> str:
    """A dataset prefix: plain segments, ending with '/', nested in no other dataset's."""
    cleaned = clean_relative(prefix.strip().rstrip("/")) + "/"
    if len(cleaned) > MAX_PREFIX_CHARS:
        raise BadPath(f"prefix: {len(cleaned)} characters; at most {MAX_PREFIX_CHARS}")
    for other in db.session.scalars(db.select(Dataset.prefix)).all():
        if cleaned.startswith(other) or other.startswith(cleaned):
            raise BadPath(f"prefix: {cleaned} overlaps the prefix of an existing dataset ({other})")
    return cleaned


def may_use_family(user: User, family: ModelFamily) -> bool:
    return user.is_admin or family.owner == user.username or (family.group is not None and family.group in user.groups)


def authorize_alias_move(user: User, model_name: str) -> None:
    """The one decision whether ``user`` may move an alias of registered model ``model_name``:
    the right to promote and a share in the model's family (an administrator has both). Every
    model a promotion or rollback moves passes it, the ones moved ``with`` it too."""
    family_name = family_of(model_name)
    if not (user.is_admin or user.can_promote):
        raise AccessDenied(f"{user.username} may not promote models")
    if user.is_admin:
        return
    family = db.session.scalar(db.select(ModelFamily).where(ModelFamily.name == family_name))
    if family is None or not may_use_family(user, family):
        owner = f"belongs to {family.owner}" if family else "has no owner in the portal"
        raise AccessDenied(f"model family {family_name!r} ({model_name}) {owner}; {user.username} may not move its aliases")


def claim_family(user: User, name: str, registered: bool) -> ModelFamily | None:
    """The family ``name`` for a job of ``user``: claimed for them when it is new (and not yet in
    the registry, which ``registered`` says), theirs, their group's, or refused. A name only the
    registry knows (trained outside the portal) is an administrator's to assign."""
    family = db.session.scalar(db.select(ModelFamily).where(ModelFamily.name == name))
    if family is None:
        if registered and not user.is_admin:
            raise AccessDenied(f"model family {name!r} is in the registry but has no owner in the portal; "
                               "an administrator assigns it (python -m portal create-family)")
        if registered:
            return None
        family = ModelFamily(name=name, owner=user.username)
        db.session.add(family)
        db.session.commit()
        return family
    if not may_use_family(user, family):
        raise AccessDenied(f"model family {name!r} belongs to {family.owner}"
                           f"{f' and group {family.group.name}' if family.group else ''}; {user.username} may not "
                           "train into it or promote it")
    return family
