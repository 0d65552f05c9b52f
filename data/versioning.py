"""Which DVC version of a dataset is in the workspace, as DVC records it (``dvc.lock`` or a ``.dvc`` file)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dvc.repo import Repo
from dvc.stage import PipelineStage


class UntrackedDataError(LookupError):
    """The path is not an output of any DVC stage nor of a ``.dvc`` file."""


@dataclass(frozen=True)
class DatasetVersion:
    path: str  # as given, relative to the DVC repo root
    tracked_path: str  # the DVC output containing it
    md5: str  # DVC's content hash of that output ("<md5>.dir" for directories)
    source: str  # "dvc.lock:<stage>" or "<file>.dvc"
    repo_root: str
    remote_url: str | None

    @property
    def digest(self) -> str:
        return self.md5.removesuffix(".dir")


def find_repo_root(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if (candidate / ".dvc").is_dir():
            return candidate
    raise UntrackedDataError(f"{path}: not inside a DVC repository (no .dvc directory above it)")


def _outs(repo: Repo, root: Path):
    """(output path, md5, source) for every DVC-tracked output: stage outputs with their hash from
    dvc.lock, and outputs of ``.dvc`` files."""
    for out in repo.index.outs:
        stage_file = Path(out.stage.path).relative_to(root)
        if isinstance(out.stage, PipelineStage):
            source = f"{stage_file.with_name('dvc.lock').as_posix()}:{out.stage.name}"
        else:
            source = stage_file.as_posix()
        yield Path(out.fs_path).relative_to(root).as_posix(), out.hash_info.value, source


def dataset_version(path: str | Path) -> DatasetVersion:
    """The DVC version of ``path`` (a tracked output or a folder inside one)."""
    absolute = Path(path).resolve()
    root = find_repo_root(absolute)
    relative = absolute.relative_to(root).as_posix()
    repo = Repo(str(root))
    remote = repo.config["core"].get("remote")
    for out_path, md5, source in _outs(repo, root):
        if md5 and (relative == out_path or relative.startswith(out_path.rstrip("/") + "/")):
            return DatasetVersion(
                path=relative,
                tracked_path=out_path,
                md5=md5,
                source=source,
                repo_root=str(root),
                remote_url=repo.config["remote"][remote]["url"] if remote else None,
            )
    raise UntrackedDataError(
        f"{path}: not tracked by DVC in {root} (no dvc.lock stage output or .dvc file covers it); "
        "run `dvc repro` or `dvc add` first so the run can name its data version"
    )
