"""No compiled code from the Hub when bitsandbytes is imported (icu_peft.offline)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

from icu_peft import offline


@pytest.fixture
def fake_kernels(monkeypatch):
    """A `kernels` module whose get_kernel records what it was asked for."""
    asked = []
    module = types.ModuleType("kernels")
    module.get_kernel = lambda repo_id, *a, **k: asked.append(repo_id) or f"kernel {repo_id}"
    monkeypatch.setitem(sys.modules, "kernels", module)
    return module, asked


def _fake_bnb(tmp_path, monkeypatch, name):
    """A package that, like bitsandbytes' CPU backend, asks kernels for its hub kernel at import."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(textwrap.dedent(f'''
        from kernels import get_kernel
        try:
            GOT = get_kernel("{offline.HUB_KERNEL}", version=1)
        except Exception as e:
            GOT = type(e).__name__
        OTHER = get_kernel("someone/else")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_the_hub_kernel_is_refused_at_import_and_get_kernel_restored(tmp_path, monkeypatch, fake_kernels):
    kernels, asked = fake_kernels
    real = kernels.get_kernel
    monkeypatch.delenv(offline.ALLOW_ENV, raising=False)
    _fake_bnb(tmp_path, monkeypatch, "fake_bnb_a")
    mod = offline.import_refusing_hub_kernel("fake_bnb_a")
    assert mod.GOT == "HubKernelRefused" and asked == ["someone/else"]  # other kernels pass through
    assert mod.OTHER == "kernel someone/else"
    assert kernels.get_kernel is real


def test_the_environment_variable_lets_it_fetch(tmp_path, monkeypatch, fake_kernels):
    _, asked = fake_kernels
    monkeypatch.setenv(offline.ALLOW_ENV, "1")
    _fake_bnb(tmp_path, monkeypatch, "fake_bnb_b")
    mod = offline.import_refusing_hub_kernel("fake_bnb_b")
    assert mod.GOT == f"kernel {offline.HUB_KERNEL}" and asked == [offline.HUB_KERNEL, "someone/else"]


def test_loading_a_4bit_model_opens_no_connection(tiny_model_dir):
    """In a fresh process (bitsandbytes not imported yet): load the tiny model in NF4 with every socket
    connection recorded. (bitsandbytes asks for the hub kernel only on CPUs with AVX512-BF16; elsewhere this
    holds trivially.)"""
    code = textwrap.dedent(f'''
        import socket
        tried = []
        real = socket.create_connection
        socket.create_connection = lambda *a, **k: tried.append(a[0]) or real(*a, **k)
        from icu_peft.models import load_base_model
        load_base_model({str(tiny_model_dir)!r}, quantize=True)
        import sys
        assert "bitsandbytes" in sys.modules
        print("connections", tried)
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "connections []" in out.stdout
