"""The engine as a package: what its modules export, and that only its host adapter reaches ComfyUI."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import biasmap_engine

_MODULES = [info.name for info in pkgutil.walk_packages(biasmap_engine.__path__, "biasmap_engine.")]


@pytest.mark.parametrize("name", ["biasmap_engine", *_MODULES])
def test_every_name_a_module_exports_exists(name):
    module = importlib.import_module(name)
    assert [n for n in getattr(module, "__all__", []) if not hasattr(module, n)] == []


def test_the_engine_outside_its_host_adapter_imports_nothing_of_comfyui():
    pure = [n for n in _MODULES if not n.startswith("biasmap_engine.host")]
    code = ("import importlib, sys\n"
            f"for name in {pure!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'comfy_extras', "
            "'folder_paths', 'nodes', 'server')))")
    root = Path(biasmap_engine.__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": ""})
    assert pure and out.stdout.strip() == "[]"
