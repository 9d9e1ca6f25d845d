"""A hub dataset repo's data files, read directly through huggingface_hub's cache.

Some datasets the paper uses are script datasets (livecodebench/code_generation_lite), which
`datasets` 4 and later refuse to load; their data are plain files in the same repo. So every hub
id is read here as files: `snapshot_download` of the files an importer names (patterns), into
huggingface_hub's cache. Offline (HF_HUB_OFFLINE=1, or no network) it resolves the revision from
the cache alone, so an importer reads a cached copy exactly as it reads a local directory laid
out like the repo: the same files, the same code path.
"""
from __future__ import annotations

from pathlib import Path

from tasks.core import files
from tasks.core.files import DataError


def snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> tuple[Path, str]:
    """(the local snapshot directory, the commit it is) of the files of dataset `repo_id`
    matching `patterns`; DataError naming the repo when it cannot be had."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise DataError(f"{repo_id!r} is not a local file or folder, and reading it from the hub needs "
                        f"huggingface_hub (pip install huggingface_hub)") from None
    where = f"hub dataset {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        local = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise DataError(f"{where}: no such dataset on the hub (or it is private or gated)") from None
    except RevisionNotFoundError:
        raise DataError(f"{where}: the dataset has no such revision") from None
    except LocalEntryNotFoundError as err:
        raise DataError(f"{where}: not in the local huggingface_hub cache, and the hub cannot be reached "
                        f"({str(err).splitlines()[0]})") from None
    except (HfHubHTTPError, ValueError, OSError) as err:  # ValueError: not a valid repo id
        raise DataError(f"{where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return local, local.name  # the cache keeps each snapshot in a directory named by its commit


def provenance(repo_id: str, revision: str | None, commit: str, root: Path, paths: list[Path]) -> dict:
    """What NAME.source.json records of a hub import: the id, the revision asked for, the commit
    it resolved to, and each file read (relative to the repo) with its sha256."""
    return {"hub": {"id": repo_id, "revision": revision, "commit": commit},
            "files": {str(p.relative_to(root)): files.file_sha256(p) for p in paths}}
