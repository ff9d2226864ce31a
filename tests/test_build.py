"""The compiled extension: it loads, registers torch.ops.ahn, and fails with a clear message."""

import os
import sys
import types

import pytest
import torch

import ahn_ops
from ahn_ops import _ext


def test_extension_loads_and_registers_ops():
    ext = _ext.load_extension()
    assert ext.TORCH_VERSION == torch.__version__
    assert isinstance(_ext.has_cuda_kernels(), bool)
    assert hasattr(torch.ops.ahn, "decode_step")
    schema = str(torch.ops.ahn.decode_step.default._schema)
    assert "Tensor(f!) state" in schema and "str kind, bool overlap_prev=False) -> Tensor" in schema
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ahn::decode_step", "CPU")
    if _ext.has_cuda_kernels():
        assert ext.CUDA_ARCHS
        assert torch._C._dispatch_has_kernel_for_dispatch_key("ahn::decode_step", "CUDA")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dynamic symbols (Linux)")
def test_extension_shares_the_process_libstdcxx():
    """The library links the shared libstdc++ (torch's) and carries no copy of its own: a statically linked
    one (a toolchain adding -static-libstdc++) keeps separate locale / iostream state, and the first
    TORCH_CHECK message with a number in it crashed the process."""
    import shutil
    import subprocess

    so = _ext.load_extension().__file__
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("binutils (nm, readelf) not installed")
    needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in needed, f"{so} does not link libstdc++.so.6:\n{needed}"
    defined = subprocess.run(["nm", "-D", "-C", "--defined-only", so], capture_output=True, text=True,
                             check=True).stdout
    own = [line for line in defined.splitlines()
           if "std::ios_base::Init::Init" in line or "std::locale::classic" in line or "std::codecvt<" in line]
    assert not own, f"{so} defines libstdc++'s own symbols (a static copy):\n" + "\n".join(own[:5])


def test_missing_extension_raises_clear_import_error():
    with pytest.raises(ImportError, match=r"missing.*pip install --no-build-isolation -e \."):
        _ext.load_extension("ahn_ops._C_not_built")


def test_extension_that_fails_to_load_raises_clear_import_error(monkeypatch, tmp_path):
    bad = tmp_path / "ahn_bad_ext.abi3.so"
    bad.write_bytes(b"\x7fELF not really a library")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"failed to load under torch .*pip install --no-build-isolation -e \."):
        _ext.load_extension("ahn_bad_ext")


def test_extension_built_for_another_torch_raises(monkeypatch):
    fake = types.ModuleType("ahn_fake_ext")
    fake.TORCH_VERSION, fake.WITH_CUDA, fake.CUDA_ARCHS = "2.0.0+cpu", 0, ""
    monkeypatch.setitem(sys.modules, "ahn_fake_ext", fake)
    with pytest.raises(ImportError, match=r"built against torch 2\.0\.0\+cpu.*pip install --no-build-isolation"):
        _ext.load_extension("ahn_fake_ext")


def test_package_exposes_extension_loader():
    assert ahn_ops._ext.load_extension() is _ext.load_extension()


def test_decode_switches_are_set_then_restored(monkeypatch):
    # the CUDA decode op parses its debug switches once; decode_switches sets them, has the op read them
    # again, and puts the environment back (their effect on the kernels: tests/ops/test_decode_cuda.py)
    monkeypatch.delenv("AHN_DECODE_PDL", raising=False)
    monkeypatch.setenv("AHN_DECODE_LAZY", "8")
    with _ext.decode_switches(AHN_DECODE_PDL="0", AHN_DECODE_LAZY="0"):
        assert os.environ["AHN_DECODE_PDL"] == "0" and os.environ["AHN_DECODE_LAZY"] == "0"
    assert "AHN_DECODE_PDL" not in os.environ and os.environ["AHN_DECODE_LAZY"] == "8"
    assert _ext.reread_decode_switches() is None
