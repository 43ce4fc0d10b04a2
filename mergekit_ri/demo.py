"""The demo: a tiny Llama-style base and two experts, generated, and the recipe that merges them.

`configs/demo.yaml` names the models `base`, `expert_math` and `expert_code`, relative to the
recipe. `ri-merge demo` writes them beside a copy of the recipe; merging `configs/demo.yaml`
itself (`mergekit_ri.merge("configs/demo.yaml", "out")`) finds them in ri-merge's cache folder,
generated there on first use (a few hundred KB, deterministic), when they are not beside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

DEMO_EXPERTS = ("expert_math", "expert_code")
MARKER = ".ri-merge-demo"


def demo_recipe_path() -> Path:
    """configs/demo.yaml: packaged in the wheel, or beside the package in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs" / "demo.yaml", here.parent / "configs" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError("configs/demo.yaml is missing from this installation")


def write_demo_models(folder: Path) -> None:
    """The base and the two experts under `folder` (sharded, as the Hub stores big models)."""
    from .synthetic import make_family

    make_family(folder, list(DEMO_EXPERTS), shards=2)


def prepare_demo_folder(folder: Path) -> Path:
    """`ri-merge demo --dir FOLDER`: a fresh folder with the models and recipe.yaml (returned).
    Refuses a folder that holds something else, so a typo never deletes user data."""
    marker = folder / MARKER
    if folder.exists() and any(folder.iterdir()) and not marker.exists():
        raise UserError(f"{folder} exists and is not a previous demo folder; pass --dir elsewhere")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    marker.touch()
    write_demo_models(folder)
    recipe = folder / "recipe.yaml"
    shutil.copyfile(demo_recipe_path(), recipe)
    return recipe


def demo_models_for(recipe_path: Path) -> Path | None:
    """The folder to resolve the models of `recipe_path` against when it is the demo recipe and
    its models are neither beside it nor in the working folder; None otherwise."""
    try:
        if recipe_path.read_bytes() != demo_recipe_path().read_bytes():
            return None
    except (OSError, UserError):
        return None
    if any((where / "base").exists() for where in (recipe_path.resolve().parent, Path.cwd())):
        return None
    return cached_demo_models()


def cached_demo_models() -> Path:
    """$RI_MERGE_CACHE/demo (default ~/.cache/ri-merge/demo), generated once, published by a
    rename so that concurrent first uses never see half a model."""
    root = Path(os.environ.get("RI_MERGE_CACHE") or Path.home() / ".cache" / "ri-merge").expanduser()
    folder = root / "demo"
    if (folder / MARKER).exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        write_demo_models(staging)
        (staging / MARKER).touch()
        try:
            os.rename(staging, folder)
        except OSError:  # another process published it first (or a stale folder is in the way)
            if not (folder / MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
