"""Where the workspace is: the checkout (or the folder holding ``config/main.yaml``) and the
workspace its relative paths start from (``data/``, ``config/local_*.yaml``).

Apart from :mod:`diffusion_bunny.config` because the stages' own modules need these paths too and
the configuration imports the stages' settings: a module the configuration imports must not
import it back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, MutableMapping
from pathlib import Path


def project_root() -> Path | None:
    """The checkout this package runs from (editable install), else the nearest parent of the
    working directory that holds ``config/main.yaml``; None when neither exists."""
    here = Path(__file__).resolve().parents[2]
    if (here / "config" / "main.yaml").is_file():
        return here
    for parent in [Path.cwd(), *Path.cwd().parents]:
        if (parent / "config" / "main.yaml").is_file():
            return parent
    return None


#: Set by the Ray engine for its tasks: the workspace of the head (``bunny run``'s machine), so a
#: relative setting (``train.output_dir``, ``paths.output_dir``) means the same folder on every node.
WORKSPACE_ENV = "DIFFUSION_BUNNY_WORKSPACE"


def workspace_root() -> Path:
    """Where ``data/`` and ``config/local_*.yaml`` live: ``$DIFFUSION_BUNNY_WORKSPACE`` (a Ray task:
    the head's), else the checkout, else the working folder."""
    env = os.environ.get(WORKSPACE_ENV)
    if env:
        return Path(env)
    root = project_root()
    return root if root is not None else Path.cwd()


def local_model_path(name: str) -> Path:
    """A model setting's value (a hub id or a local folder) as a path: from the working folder,
    else from the workspace. A settings file's relative paths start from the workspace, but a
    stage kernel works in ``notebook/``: ``train.base_model: models/sd`` was not found there and
    was then looked up as the hub id ``models/sd``. A path found in neither is returned as it is
    (a hub id)."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    in_workspace = workspace_root() / path
    return in_workspace if in_workspace.exists() else path


#: Files and folders the operating system leaves beside a user's own (a zip made on a Mac holds
#: ``__MACOSX/``; Windows writes ``Thumbs.db`` and ``desktop.ini`` into folders it shows).
_CLUTTER = {"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "$recycle.bin"}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hex, read a MiB at a time: a reference folder holding a film,
    or a multi-gigabyte model file, is not read whole into memory. One function for every key that
    names a file by its content (references, latent caches, model files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_clutter(name: str) -> bool:
    """Whether a file or folder ``name`` is hidden or left by the operating system, not the
    user's: a reference pack unzipped on Linux held a character named ``__MACOSX``, and a
    ``Thumbs.db`` was a reference picture that "cannot be read"."""
    return name.startswith(".") or name.lower() in _CLUTTER


#: Environment variables naming a folder or file that the libraries a stage uses read (the
#: Hugging Face and torch caches, the workspace's own cache, cloud credentials files).
PATH_VARIABLES = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_TOKEN_PATH",
    "TRANSFORMERS_CACHE",
    "TORCH_HOME",
    "XDG_CACHE_HOME",
    "DIFFUSION_BUNNY_CACHE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def absolute_path_variables(
    environ: MutableMapping[str, str] | None = None,
    base: Path | None = None,
    names: Iterable[str] = PATH_VARIABLES,
) -> list[str]:
    """Make the relative values of ``names`` (:data:`PATH_VARIABLES`) absolute against ``base``
    (the working folder), in ``environ`` (``os.environ``), and return the names changed. A
    ``.env`` file's values are made absolute against its own folder (:func:`load_env_file
    <diffusion_bunny.secrets.load_env_file>`).

    Why: a stage runs in a kernel whose working folder is the notebooks' folder (papermill's way),
    and Ray's workers run in folders of their own, so ``HF_HOME=hfcache bunny run ...`` typed in
    the workspace was read as ``notebook/hfcache``: the models there were "not in the local
    Hugging Face cache", and a download would have gone into the checkout. Such a value means
    the folder where the command was typed, as ``--out`` and ``--characters`` do."""
    environ = os.environ if environ is None else environ
    changed = []
    for name in names:
        value = environ.get(name)
        if not value:
            continue
        path = os.path.expanduser(value)
        if not os.path.isabs(path):
            environ[name] = os.path.abspath(os.path.join(base, path) if base is not None else path)
            changed.append(name)
    return changed
