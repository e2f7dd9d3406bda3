"""The C++ CPU kernels' one extension: `torch.ops.quire_cpu.*` from csrc/paged_attention_cpu.cpp
(the paged-attention kernel, `cpu_attention`) and csrc/layers_cpu.cpp (RMSNorm with the fused
residual add, SiLU-and-mul, rotary: `cpu_layers`), sharing csrc/simd.h.

Build and cache: `load_extension()` compiles into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default under the user's cache directory) under a name keyed on the
CPU's vector capability (AVX-512 machines get `-mavx512f ...`, AVX2-class ones `-mavx2 -mfma`), and torch's loader reuses a
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
    flags = _vector_flags()
    return "quire_paged_attention_cpu_" + ("avx512" if "-mavx512f" in flags else "avx2" if flags else "base")


def _vector_flags() -> list[str]:
    # The vector ISA torch itself found: AVX-512 (16-lane fp32 FMAs and 32 vector registers
    # for the attention kernel's loops, csrc/simd.h) or AVX2+FMA (8 lanes), else the compiler's
    # baseline. Not -march=native: the build is cached by name, and the name records exactly
    # these flags.
    capability = torch.backends.cpu.get_cpu_capability()
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":
        return [*avx2, "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
    return avx2 if capability == "AVX2" else []


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
                               extra_cflags=["-O3", "-fopenmp", *_vector_flags()], extra_ldflags=["-fopenmp"],
                               verbose=False)
            for op in ("paged_attention", "write_kv", "write_kv_quantized", "rms_norm", "silu_and_mul", "rotate_qk"):
                getattr(torch.ops.quire_cpu, op)  # raises if registration failed
        except Exception as exc:  # a compiler error, no compiler, no ninja: all mean "unavailable"
            raise ExtensionUnavailable(f"the CPU kernels could not be built: {exc}") from exc
        _loaded["seconds"] = time.perf_counter() - began
        return _loaded["seconds"]
