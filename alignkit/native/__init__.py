"""Native kernels of the decode step, compiled on first use with the machine's C compiler.

``decode.c`` holds the work a bf16 decode step (:meth:`alignkit.decode.FastDecoder.step`)
does between its products, each a call per layer where PyTorch takes several operations,
each a pass over memory and a few microseconds of dispatch:

- :func:`decode_attention`: RoPE on the new token's query and key heads, its key and
  value written into the cache, and each query head attending over its key/value head's
  filled slots (some ten operations in PyTorch);
- :func:`add_rms_norm`: the residual add and the RMSNorm after it, into the next
  product's bf16 input (the composite ``rms_norm`` runs seven);
- :func:`silu_mul`: silu(gate) x up (two, the first on a strided half).

At batch 32 on the embedded model they take a decode step from ~48 to ~36 ms and a
whole ``generate`` call ~33% faster, at batch 1 ~32% (docs/benchmarks.md).

The source is compiled once per machine and compiler (``FLAGS``: ``-O3 -march=native
-fno-trapping-math -fopenmp``) into ``native/`` of alignkit's cache (``$ALIGNKIT_CACHE``,
default ``~/.cache/alignkit``) and loaded with :mod:`ctypes`. Its OpenMP loops must run
on the OpenMP runtime torch loaded, or two thread pools would contend for the cores; the
library is used only when its parallel regions resolve to the same runtime as torch's.
Without a C compiler, with a build that fails, or with ``ALIGNKIT_NATIVE=0`` in the
environment, :func:`library` is None and the decode step stays in PyTorch (a warning
says why, once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared")

_POINTER, _INT, _FLOAT, _THREADS = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "decode_attention": [_POINTER, _INT] + [_POINTER] * 6 + [_INT] * 6 + [_FLOAT, _THREADS],
    "add_rms_norm": [_POINTER, _POINTER, _INT, _POINTER, _POINTER, _INT, _INT, _FLOAT, _THREADS],
    "silu_mul": [_POINTER, _POINTER, _INT, _INT, _THREADS],
}


def cache_dir() -> Path:
    from alignkit.models import cache_root

    return cache_root() / "native"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _machine() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in text.splitlines() if line.startswith(wanted)}))


def build(compiler: str, flags: tuple[str, ...] = FLAGS, directory: Path | None = None) -> Path:
    """Compile ``decode.c`` with ``compiler`` and ``flags`` (cached); the shared library's path.

    The file name hashes the source, the flags, the compiler's version and the CPU, so a
    change of any of them builds anew. Written under a temporary name, then renamed: a
    concurrent build or an interrupted one never leaves a partial library in place.
    """
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), version.encode(), _machine().encode()])
    ).hexdigest()[:20]
    directory = directory or cache_dir()
    target = directory / f"decode-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", partial, "-lm"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


class _SymbolInfo(ctypes.Structure):  # dladdr's Dl_info
    _fields_ = [
        ("file", ctypes.c_char_p),
        ("base", ctypes.c_void_p),
        ("name", ctypes.c_char_p),
        ("address", ctypes.c_void_p),
    ]


def openmp_provider(library: ctypes.CDLL) -> str | None:
    """The file whose ``GOMP_parallel`` ``library``'s parallel regions call (None: unknown).

    The dynamic linker resolves it by soname among the libraries already loaded, so a
    library built with ``-fopenmp`` after torch runs on torch's runtime; other copies in
    the process (scikit-learn ships its own) do not matter.
    """
    try:
        address = ctypes.cast(library.GOMP_parallel, ctypes.c_void_p).value
        dl = ctypes.CDLL(None)
        if not hasattr(dl, "dladdr"):  # glibc before 2.34 kept it in libdl
            dl = ctypes.CDLL("libdl.so.2")
    except (AttributeError, OSError):
        return None
    info = _SymbolInfo()
    if not dl.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.file:
        return None
    return os.path.realpath(info.file.decode())


def torch_openmp_provider() -> str | None:
    """The file whose ``GOMP_parallel`` torch's own parallel regions call (None: unknown)."""
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.exists():
            try:
                return openmp_provider(ctypes.CDLL(str(path)))
            except OSError:
                return None
    return None


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, signature in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = signature, None
    return library


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (the reason warned once)."""
    if os.environ.get("ALIGNKIT_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return _unavailable("no C compiler (cc, gcc or $CC) found")
    try:
        path = build(compiler)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        return _unavailable(f"compiling {SOURCE.name} failed: {detail.strip()[:300]}")
    try:
        loaded = load(path)
    except OSError as error:
        return _unavailable(f"loading {path} failed: {error}")
    ours, torchs = openmp_provider(loaded), torch_openmp_provider()
    if ours is None or ours != torchs:
        return _unavailable(f"its OpenMP runtime {ours} is not torch's ({torchs})")
    return loaded


def _unavailable(reason: str) -> None:
    warnings.warn(
        f"alignkit's native decode kernels are off ({reason}); decoding in PyTorch",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def decode_attention(
    kernels: ctypes.CDLL,
    qkv: torch.Tensor,  # (n, >= (heads + 2 kv_heads) x D) bf16, rows contiguous
    cos: torch.Tensor,  # (n, D) fp32, contiguous
    sin: torch.Tensor,  # (n, D) fp32, contiguous
    keys: torch.Tensor,  # (n, kv_heads, capacity, D) bf16, contiguous
    values: torch.Tensor,  # same
    keep: torch.Tensor,  # (n, slot + 1) bool, contiguous
    out: torch.Tensor,  # (n, heads x D) bf16, contiguous
    heads: int,
    slot: int,
    scale: float,
) -> None:
    """One layer's attention of a decode step into ``out``; the new key and value at ``slot``.

    The cache slot ``slot`` of every row is written (the rotated key, the value); each
    query head attends over the slots its row keeps, up to and including ``slot``.
    """
    n, kv_heads, capacity, head_dim = keys.shape
    kernels.decode_attention(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
        values.data_ptr(), keep.data_ptr(), out.data_ptr(), n, heads, kv_heads, head_dim,
        slot, capacity, scale, torch.get_num_threads(),
    )  # fmt: skip


def add_rms_norm(
    kernels: ctypes.CDLL,
    hidden: torch.Tensor,  # (n, H) fp32, contiguous: updated in place
    delta: torch.Tensor | None,  # (n, H) bf16, rows contiguous, or None
    weight: torch.Tensor,  # (H,) fp32, contiguous
    out: torch.Tensor,  # (n, H) bf16, contiguous
    eps: float,
) -> torch.Tensor:
    """``hidden += delta``, then ``out`` = its RMSNorm times ``weight``, in fp32 rounded once."""
    n, size = hidden.shape
    kernels.add_rms_norm(
        hidden.data_ptr(), None if delta is None else delta.data_ptr(),
        0 if delta is None else delta.stride(0), weight.data_ptr(), out.data_ptr(), n, size,
        eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def silu_mul(kernels: ctypes.CDLL, gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = silu(gate) x up for ``gate_up`` (n, 2 I) bf16 contiguous, gate first; (n, I)."""
    n, inner = out.shape
    kernels.silu_mul(gate_up.data_ptr(), out.data_ptr(), n, inner, torch.get_num_threads())
    return out
