"""The C++ CPU kernels' one extension: `torch.ops.quire_cpu.*` from csrc/paged_attention_cpu.cpp
(the paged-attention kernel, `cpu_attention`) and csrc/layers_cpu.cpp (RMSNorm with the fused
residual add, SiLU-and-mul, rotary: `cpu_layers`), sharing csrc/vec8.h.

Build and cache: `load_extension()` compiles into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default under the user's cache directory) under a name keyed on the
CPU's vector capability (AVX2-class machines get `-mavx2 -mfma`), and torch's loader reuses a
cached build whose sources are unchanged (it hashes the sources; ninja's dependency files catch
a changed header). A build takes ~15-25 s, a cached load ~0.2 s. It needs a C++ compiler and
ninja (the `ninja` package puts one beside the interpreter; it is found there when not on
PATH). A failed build raises `ExtensionUnavailable`; `select_backend` then falls back to the
torch reference with one warning, and the model keeps its torch layers.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "paged_attention_cpu.cpp", CSRC / "layers_cpu.cpp")

_lock = threading.Lock()
_loaded: dict[str, float] = {}  # "seconds": how long the (first) build or load took in this process


class ExtensionUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded (no compiler, no ninja, a compile error)."""


def extension_name() -> str:
    """The cache key of the build: the kernels' name plus the vector flags they are compiled with."""
    return "quire_paged_attention_cpu_" + ("avx2" if _vector_flags() else "base")


def _vector_flags() -> list[str]:
    # AVX2+FMA where torch itself found at least AVX2: 8-wide fp32 FMAs for the inner loops.
    # Not -march=native: the build is cached by name, and the name records exactly these flags.
    capability = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2", "-mfma", "-mf16c"] if capability in ("AVX2", "AVX512") else []


def _ensure_ninja_on_path() -> None:
    """torch's loader runs `ninja` from PATH; a venv's ninja (the `ninja` package) sits beside
    the interpreter, which is not on PATH when the venv is not activated."""
    if shutil.which("ninja"):
        return
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if shutil.which("ninja", path=folder):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return


def is_loaded() -> bool:
    """Whether this process has the kernels loaded (`load_extension` succeeded)."""
    return "seconds" in _loaded


def load_seconds() -> float:
    """Seconds the first build or load took in this process (0.0 before it)."""
    return _loaded.get("seconds", 0.0)


def load_extension() -> float:
    """Build (first time on this machine) or load (cached) the kernels into this process, once.
    Returns the seconds it took the first time in this process (0.0 if already loaded);
    ExtensionUnavailable when they cannot be built or loaded."""
    with _lock:
        if is_loaded():
            return 0.0
        began = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            _ensure_ninja_on_path()
            cpp_extension.load(name=extension_name(), sources=[str(s) for s in SOURCES], is_python_module=False,
                               extra_cflags=["-O3", "-fopenmp-simd", *_vector_flags()], verbose=False)
            for op in ("paged_attention", "rms_norm", "silu_and_mul", "rotate_qk"):
                getattr(torch.ops.quire_cpu, op)  # raises if registration failed
        except Exception as exc:  # a compiler error, no compiler, no ninja: all mean "unavailable"
            raise ExtensionUnavailable(f"the CPU kernels could not be built: {exc}") from exc
        _loaded["seconds"] = time.perf_counter() - began
        return _loaded["seconds"]
