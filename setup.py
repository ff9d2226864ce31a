"""Builds ahn_ops: the Python package plus ahn_ops/_C.abi3.so, the torch.ops.ahn kernels.

CMake (find_package(Torch)) and ninja compile csrc/: the C++ CPU kernels always, and the
CUDA kernels csrc/cuda/*.cu when torch has CUDA and nvcc is found. Build against the torch
you run with; the library refuses to load under another torch version:

    pip install --no-build-isolation -e .        # development (what `make setup` runs)
    python setup.py build_ext --inplace          # rebuild in place after editing csrc/
    pip wheel --no-build-isolation --no-deps .   # a wheel for this torch
    pip install .                                # works, but downloads a torch to build with

Environment:
    AHN_OPS_NO_CUDA=1         CPU kernels only, even where torch has CUDA and nvcc is found
    AHN_OPS_CUDA_ARCHS=80;90a GPU targets (default: sm_80 and sm_90a), ';' or ',' separated
    AHN_OPS_CUTLASS_INCLUDE   the CUTLASS / CuTe headers of the sm_90a kernels (default: those of the
                              installed nvidia-cutlass package; without them the sm_90a kernels are not built)
    AHN_OPS_BUILD_TYPE        CMake build type (default Release)
    MAX_JOBS                  parallel compile jobs (default: the number of cores)
    CUDA_HOME                 the CUDA toolkit (default: the nvcc on PATH, then /usr/local/cuda)

The package's torch requirement is set here, not in pyproject.toml: a wheel requires exactly the
torch it was built against (``torch_requirement``), the only one its library loads under.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90a"
# Besides torch (torch_requirement); the [hf] and other extras stay in pyproject.toml.
# numpy: torch runs without it but warns on import ("Failed to initialize NumPy") when it is missing
DEPENDENCIES = ["packaging", "safetensors", "einops", "numpy"]
# Only where no torch is importable, i.e. for commands that compile nothing (`setup.py --version`).
LOOSE_TORCH_REQUIREMENT = "torch>=2.4"


def torch_requirement(version):
    """The requirement on torch of a wheel built against the torch distribution ``version``.

    ``version`` is the version pip sees (``importlib.metadata.version("torch")``), which is not
    always ``torch.__version__``: PyPI's torch 2.14.1 reports 2.14.1+cu130 at run time. ahn_ops/_ext.py
    loads the library only under the ``torch.__version__`` recorded at build time, local label
    included, and one torch distribution version (on one platform) reports one ``torch.__version__``;
    so the requirement admits that one distribution version and no other:

        >>> torch_requirement("2.14.1")          # PyPI
        'torch===2.14.1'
        >>> torch_requirement("2.14.1+cu130")    # download.pytorch.org
        'torch==2.14.1+cu130'

    ``==2.14.1`` would also admit 2.14.1+cpu (PEP 440 ignores a candidate's local label when the
    specifier has none), a torch the library refuses; ``===`` compares the whole version string.
    With a local label, ``==`` compares it strictly. The one torch left out that would load is the
    same build under another name (download.pytorch.org's 2.14.1+cu130 for PyPI's 2.14.1).
    """
    from packaging.version import Version

    v = Version(version)
    return f"torch=={v}" if v.local else f"torch==={v}"


def _torch_distribution_version():
    """The version pip sees of the torch this build compiles against; None where there is none."""
    try:
        import torch
    except ImportError:
        return None
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # a torch on sys.path that pip does not know (a source build)
        return torch.__version__


def _install_requires():
    version = _torch_distribution_version()
    return [LOOSE_TORCH_REQUIREMENT if version is None else torch_requirement(version), *DEPENDENCIES]


def _tool(module, attr, name):
    """The pip-installed build tool if there is one (it matches the build env), else PATH's."""
    try:
        mod = __import__(module)
        exe = Path(getattr(mod, attr)) / name
        if exe.exists():
            return str(exe)
    except Exception:
        pass
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"ahn_ops: building needs `{name}`: pip install {module}")
    return exe


def _nvcc():
    """Path of nvcc, or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    exe = shutil.which("nvcc")
    if exe:
        return exe
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _cuda_config(torch):
    """(nvcc, reason): nvcc is the real compiler (not a wrapper script) or None when the CUDA
    kernels are not built, and reason says why."""
    from packaging.version import Version

    if os.environ.get("AHN_OPS_NO_CUDA", "0") not in ("", "0"):
        return None, "AHN_OPS_NO_CUDA is set"
    if not torch.version.cuda:
        return None, f"torch {torch.__version__} has no CUDA"
    if not list((ROOT / "csrc" / "cuda").glob("*.cu")):
        return None, "no csrc/cuda/*.cu"
    nvcc = _nvcc()
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME)"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"release (\d+\.\d+)", version)
    if version is None:
        return None, f"cannot read the version of {nvcc}"
    if Version(version[1]).major != Version(torch.version.cuda).major:
        return None, f"nvcc {version[1]} does not match torch's CUDA {torch.version.cuda}"
    # nvcc on PATH may be a wrapper script; its dry run names the toolkit's bin folder.
    dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    here = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, re.M)
    if here and (Path(here[1].strip()) / "nvcc").exists():
        nvcc = str(Path(here[1].strip()) / "nvcc")
    return str(Path(nvcc).resolve()), f"nvcc {version[1]} at {Path(nvcc).resolve()}"


def _pip_cuda_dirs(kind):
    """include or lib folders of the pip nvidia-* packages (cu13: nvidia/cu13/include)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(str(p) for loc in spec.submodule_search_locations for p in Path(loc).glob(f"*/{kind}"))


def _link_gaps(toolkit_dirs, pip_dirs, links, pattern, rename=lambda name: name):
    """Links in folder `links` to whatever the pip nvidia-* folders have and the toolkit lacks:
    the toolkit's own files keep precedence, and no header mixes two CUDA releases."""
    links.mkdir(parents=True, exist_ok=True)
    for old in links.iterdir():
        old.unlink()
    have = {p.name for d in toolkit_dirs if d.is_dir() for p in d.iterdir()}
    for pip_dir in pip_dirs:
        for item in Path(pip_dir).glob(pattern):
            name = rename(item.name)
            if name not in have and not (links / name).exists():
                (links / name).symlink_to(item)
    return str(links)


def _cuda_gaps(cuda_home, temp):
    """(include folder, library folder) that fill the gaps of a toolkit without cuBLAS and
    friends from the pip nvidia-* packages, whose libraries torch loads at run time anyway.
    ATen/cuda/CUDAContext.h includes cublas_v2.h; torch's cmake config wants libcudart.so and
    finds only unversioned names, hence lib<name>.so links to lib<name>.so.<N>."""
    home = Path(cuda_home)
    include = _link_gaps([home / "include", home / "targets/x86_64-linux/include"], _pip_cuda_dirs("include"),
                         Path(temp) / "cuda-include-gaps", "*")
    lib = _link_gaps([home / "lib64", home / "lib", home / "targets/x86_64-linux/lib"], _pip_cuda_dirs("lib"),
                     Path(temp) / "cuda-lib-gaps", "lib*.so.*", lambda name: name.split(".so")[0] + ".so")
    return include, lib


def _cutlass_include():
    """(folder of the CUTLASS / CuTe headers or None, why): AHN_OPS_CUTLASS_INCLUDE, else the nvidia-cutlass
    package's (found without importing it)."""
    import importlib.util

    env = os.environ.get("AHN_OPS_CUTLASS_INCLUDE")
    if env:
        ok = (Path(env) / "cute" / "tensor.hpp").exists()
        return (env, f"AHN_OPS_CUTLASS_INCLUDE={env}") if ok else (None, f"no cute/tensor.hpp under {env}")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None, "nvidia-cutlass not installed (pip install --no-deps nvidia-cutlass)"
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    if not (inc / "cute" / "tensor.hpp").exists():
        return None, f"no cute/tensor.hpp under {inc}"
    return str(inc), f"CUTLASS headers at {inc}"


def _loaded_libstdcxx():
    """The libstdc++ this process has loaded (torch's, after ``import torch``): the library links that file, so
    that it shares the C++ runtime with torch even where the compiler's own libstdc++ is a static archive
    only (a toolchain built so linked a copy into _C.abi3.so, and formatting a TORCH_CHECK message crashed).
    None off Linux or where none is loaded."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[], py_limited_api=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        # One CMake build folder per (Python, torch), kept across `pip install -e`, build_ext
        # and `pip wheel` (setuptools gives each a fresh temporary one): rebuilds are incremental.
        key = hashlib.sha1(f"{os.path.abspath(sys.executable)}|{torch.__file__}|{torch.__version__}".encode()).hexdigest()[:10]
        temp = ROOT / "build" / f"cmake-{key}"
        temp.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("AHN_OPS_BUILD_TYPE", "Debug" if self.debug else "Release")
        jobs = os.environ.get("MAX_JOBS") or str(len(os.sched_getaffinity(0)))
        nvcc, why = _cuda_config(torch)
        print(f"ahn_ops: CUDA kernels {'ON' if nvcc else 'OFF'} ({why}), {jobs} jobs", flush=True)

        args = [
            f"-S{ROOT}", f"-B{temp}", "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR', 'ninja')}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DAHN_OPS_OUTPUT_DIR={out_file.parent}",
            f"-DAHN_OPS_TORCH_VERSION={torch.__version__}",
            f"-DAHN_OPS_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DAHN_OPS_LIBSTDCXX={_loaded_libstdcxx() or ''}",
        ]
        env = dict(os.environ)
        if nvcc:
            cuda_home = str(Path(nvcc).parent.parent)
            archs = os.environ.get("AHN_OPS_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                f"-DAHN_OPS_CUDA_ARCHS={archs.replace(',', ';')}",
            ]
            cutlass, why90 = _cutlass_include()
            if "90a" not in archs.replace(",", ";").split(";"):
                cutlass, why90 = None, f"sm_90a is not among AHN_OPS_CUDA_ARCHS={archs}"
            print(f"ahn_ops: sm_90a kernels {'ON' if cutlass else 'OFF'} ({why90})", flush=True)
            args.append(f"-DAHN_OPS_CUTLASS_INCLUDE={cutlass or ''}")
            include_gaps, lib_gaps = _cuda_gaps(cuda_home, temp)
            args += [f"-DAHN_OPS_CUDA_EXTRA_INCLUDES={include_gaps}", f"-DCMAKE_LIBRARY_PATH={lib_gaps}"]
            # torch's cmake otherwise probes the GPU to pick its arch list; ours replaces it.
            env["TORCH_CUDA_ARCH_LIST"] = "8.0"
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        subprocess.run([cmake, *args], check=True, env=env)
        subprocess.run([cmake, "--build", str(temp), "-j", jobs], check=True, env=env)


# Guarded so that tests can import torch_requirement; pip and `python setup.py` run this as __main__.
if __name__ == "__main__":
    setup(
        install_requires=_install_requires(),
        ext_modules=[CMakeExtension("ahn_ops._C")],
        cmdclass={"build_ext": CMakeBuild},
        options={"bdist_wheel": {"py_limited_api": "cp39"}},
    )
