"""A generated scene set in exactly the folder a recipe names (``data.scenes`` with
``data.generate``), instead of under the generator's cache key."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from distiq.data.scenes import FORMAT_VERSION, ScenePaths, generate_scenes

logger = logging.getLogger(__name__)


def generate_scenes_at(
    folder: str | os.PathLike, count: int, seed: int = 0, image_size: int = 64
) -> ScenePaths:
    """The scene set of ``count`` scenes in exactly ``folder`` (a path a recipe can name), made
    by :func:`generate_scenes` when ``folder`` does not exist yet.

    A set already there is reused when it was made with the same count, seed, image size and
    format version; any other content is refused, never replaced.

    Args:
        folder: where the set's ``meta.json`` and split folders go; its parent is created.
        count / seed / image_size: as :func:`generate_scenes`.
    Returns:
        The set's paths (``ScenePaths.at(folder)``).
    Raises:
        FileExistsError: ``folder`` holds something else (another scene set, or other files).
    """
    folder = Path(folder)
    wanted = {
        "count": count,
        "seed": seed,
        "image_size": image_size,
        "format_version": FORMAT_VERSION,
    }
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        found = {k: meta.get(k) for k in wanted}
        if found == wanted:
            logger.info("reusing the scenes in %s", folder)
            return ScenePaths.at(folder)
        raise FileExistsError(
            f"{folder} holds another scene set ({found}) than the one asked for ({wanted}); "
            "point data.scenes at another folder, or remove this one"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"{folder} exists and is not a scene set (no meta.json): generated scenes go into a "
            "new or empty folder; point data.scenes elsewhere"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.staging-{os.getpid()}"
    try:
        made = generate_scenes(staging, count=count, seed=seed, image_size=image_size)
        try:
            if folder.is_dir():
                folder.rmdir()  # empty (checked above)
            os.replace(made.root, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a concurrent generator's same set
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ScenePaths.at(folder)


__all__ = ["generate_scenes_at"]
