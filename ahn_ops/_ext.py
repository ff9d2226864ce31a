"""Loads ahn_ops._C, the compiled library behind ``torch.ops.ahn``.

The library is built against one torch version (C++ ABI) and refuses to load under another;
``load_extension`` turns every way that can fail into an ``ImportError`` that says how to
rebuild. ``decode_switches`` sets the CUDA decode op's debug / tuning switches for a block (tests and
benchmarks; the list is in README.md, "Debug / tuning switches").
"""

import contextlib
import importlib
import os
from typing import Iterator

import torch
from packaging.version import Version

EXTENSION = "ahn_ops._C"
REBUILD_HINT = (
    "Rebuild it for the installed torch from the ahn_ops checkout with "
    "`pip install --no-build-isolation -e .` (or `make build`)."
)

_loaded = {}


def load_extension(name: str = None):
    """Import the compiled extension (registering the ``torch.ops.ahn`` kernels) and check it.

    Args:
        name: module to import; default ``ahn_ops._C`` (``EXTENSION``).

    Returns:
        The extension module. Attributes: ``TORCH_VERSION`` (str, the torch it was built
        against), ``WITH_CUDA`` (int, 1 when csrc/cuda/*.cu were compiled in), ``WITH_SM90`` (int, 1 when
        the sm_90a prefill kernels were: the CUTLASS headers were found and sm_90a was a target),
        ``CUDA_ARCHS`` (str, e.g. ``"80,90a"``).

    Raises:
        ImportError: the module is missing, fails to load (undefined symbol: built against
            another torch), or records another torch version than ``torch.__version__``.

    Example:
        >>> from ahn_ops._ext import load_extension
        >>> ext = load_extension()
        >>> hasattr(torch.ops.ahn, "decode_step")
        True
    """
    name = name or EXTENSION
    if name in _loaded:
        return _loaded[name]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise ImportError(f"ahn_ops: cannot import {name}: {e}. {REBUILD_HINT}") from e
        raise ImportError(
            f"ahn_ops: the compiled extension {name} is missing (not built, or built for another "
            f"Python). {REBUILD_HINT}"
        ) from e
    except (ImportError, OSError, RuntimeError) as e:
        raise ImportError(
            f"ahn_ops: the compiled extension {name} failed to load under torch {torch.__version__}; "
            f"it was probably built against another torch. {REBUILD_HINT}\nCause: {e}"
        ) from e
    built = getattr(module, "TORCH_VERSION", None)
    if built is None or Version(built) != Version(torch.__version__):
        raise ImportError(
            f"ahn_ops: the compiled extension {name} was built against torch {built}, but torch "
            f"{torch.__version__} is installed. {REBUILD_HINT}"
        )
    _loaded[name] = module
    return module


def reread_decode_switches() -> None:
    """Read the debug / tuning switches of the CUDA decode op (``AHN_DECODE_*``, ``AHN_OPS_POISON``; listed in
    csrc/cuda/ahn_decode.cu and README.md) from the environment again. The op parses them once, on its first
    call; a no-op without the CUDA kernels."""
    load_extension().reread_decode_switches()


@contextlib.contextmanager
def decode_switches(**env: str) -> Iterator[None]:
    """Run the block with these switches set in the environment and read by the CUDA decode op, then put
    the environment back (and read it again). For tests and benchmarks that compare switches in one process.

    Example:
        >>> from ahn_ops._ext import decode_switches
        >>> with decode_switches(AHN_DECODE_PDL="0"):
        ...     pass  # torch.ops.ahn.decode_step without programmatic dependent launch here
    """
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        reread_decode_switches()
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reread_decode_switches()


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels (csrc/cuda/*.cu).

    Raises ImportError as ``load_extension`` does. Being built with them does not mean a GPU
    is present: see ``torch.cuda.is_available()``.
    """
    return bool(load_extension().WITH_CUDA)


def has_sm90_kernels() -> bool:
    """Whether the extension was built with the sm_90a prefill kernels (``torch.ops.ahn.prefill_fwd_sm90``).

    Raises ImportError as ``load_extension`` does."""
    return bool(getattr(load_extension(), "WITH_SM90", 0))
