"""What a new user meets first: the wheel's torch requirement, `import ahn_ops`, `ahn-merge` without the
[hf] extra, and `make demo` on a machine without a GPU."""

import importlib.util
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from packaging.requirements import Requirement

from .utils import REPO, setup_py


def _admits(requirement: str, version: str) -> bool:
    return Requirement(requirement).specifier.contains(version, prereleases=True)


# ------------------------------------------------------------------ the wheel's torch requirement


def test_torch_requirement_admits_only_the_build_torch():
    req = setup_py().torch_requirement
    assert req("2.14.1") == "torch===2.14.1"
    assert req("2.14.1+cu130") == "torch==2.14.1+cu130"
    # PyPI's 2.14.1: not the same release under another local label (2.14.1+cpu reports another
    # torch.__version__, which ahn_ops/_ext.py refuses), nor any other release
    for other in ("2.14.1+cpu", "2.14.1+cu126", "2.14.0", "2.14.2", "2.15.0", "2.4.0"):
        assert not _admits(req("2.14.1"), other), other
    for other in ("2.14.1", "2.14.1+cpu", "2.14.2+cu130"):
        assert not _admits(req("2.14.1+cu130"), other), other
    assert _admits(req("2.14.1"), "2.14.1") and _admits(req("2.14.1+cu130"), "2.14.1+cu130")


def test_install_requires_admits_the_installed_torch():
    # the pin is on the version pip sees (metadata), not on torch.__version__: PyPI's torch 2.14.1
    # reports 2.14.1+cu130 at run time, and `torch==2.14.1+cu130` would be unsatisfiable from PyPI
    build = setup_py()
    requires = build._install_requires()
    torch_req = Requirement(requires[0])
    assert torch_req.name == "torch"
    assert _admits(requires[0], metadata.version("torch")), (requires[0], metadata.version("torch"))
    assert set(build.DEPENDENCIES) <= set(requires)
    # what the library itself checks at load: the extension records the torch.__version__ it was built with
    from ahn_ops import _ext

    assert _ext.load_extension().TORCH_VERSION == torch.__version__


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps (Linux)")
def test_build_links_the_libstdcxx_torch_loaded():
    # setup.py hands CMake the libstdc++ file this process loaded with torch: a real shared library whose
    # soname is the one torch needs (test_build checks the built library's NEEDED and symbols)
    path = setup_py()._loaded_libstdcxx()
    assert path is not None and "/libstdc++.so" in path
    with open(path, "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_pyproject_leaves_the_dependencies_to_setup_py():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # a static list would make setuptools ignore setup.py's install_requires (and its torch pin)
    assert "dependencies" not in project and "dependencies" in project["dynamic"]
    assert {"transformers", "tqdm"} <= set(project["optional-dependencies"]["hf"])


# ------------------------------------------------------------------ import ahn_ops


def _stderr_of(code: str) -> str:
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_import_adds_no_warning_to_import_torch():
    # every warning shown (-W default); whatever torch itself prints (e.g. without numpy) is not ours
    assert _stderr_of("import ahn_ops") == _stderr_of("import torch")


# ------------------------------------------------------------------ ahn-merge without the [hf] extra


def test_merge_runs_without_transformers_and_tqdm_and_names_the_extra(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "ahn").mkdir()
    code = f"""
import sys
sys.modules["transformers"] = None  # as if not installed
sys.modules["tqdm"] = None
import ahn_ops.merge
rc = ahn_ops.merge.main(["--base", {str(tmp_path / "base")!r}, "--ahn", {str(tmp_path / "ahn")!r},
                         "--out", {str(tmp_path / "out")!r}])
print("rc", rc)
try:
    ahn_ops.merge.main(["--help"])
except SystemExit as e:
    print("help", e.code)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "rc 2" in r.stdout and "help 0" in r.stdout, r.stdout + r.stderr
    assert "ModuleNotFoundError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert 'pip install "ahn_ops[hf]"' in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_merge_missing_extra_error_is_an_import_error(monkeypatch):
    import ahn_ops.merge as merge

    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match=r'pip install "ahn_ops\[hf\]"'):
        merge._require_hf()


# ------------------------------------------------------------------ make demo on the CPU


def _demo(name):
    sys.path.insert(0, str(REPO / "python"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "python"))


def test_demo_on_cpu_shows_memory_and_no_timing_race(capsys):
    _demo("demo").main(["--device", "cpu", "--contexts", "64", "256", "--window", "16", "--sinks", "2",
                        "--decode-steps", "2"])
    out = capsys.readouterr().out
    assert "needs a GPU" in out and " ms" not in out, out
    rows = [line.split("|") for line in out.splitlines() if line.strip().split(" ")[0] in ("64", "256")]
    assert len(rows) == 2, out
    (ahn64, full64), (ahn256, full256) = ((float(r[1]), float(r[2])) for r in rows)
    assert ahn64 == ahn256 and full256 > 3 * full64  # constant vs growing with the context


def test_demo_model_on_cpu_shows_memory_and_no_timing_race(capsys):
    _demo("demo_model").main(["--device", "cpu", "--contexts", "64", "512", "--window", "16", "--sinks", "2",
                              "--hidden", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--vocab", "256",
                              "--decode-steps", "1"])
    out = capsys.readouterr().out
    assert "needs a GPU" in out and "prefill s" not in out and "decode ms" not in out, out
    rows = [line.split("|") for line in out.splitlines() if line.strip().split(" ")[0] in ("64", "512")]
    assert len(rows) == 2, out
    (base64, ahn64), (base512, ahn512) = (tuple(map(float, r[1].split())) for r in rows)
    assert ahn64 == ahn512 and base512 > 3 * base64
