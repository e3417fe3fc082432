"""The engine as a package: what its modules export, and that only its host adapter reaches ComfyUI."""

import ast
import importlib
import itertools
import json
import pkgutil
import re
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


@pytest.mark.parametrize("name", _MODULES)
def test_no_name_a_package_exports_hides_one_of_its_modules(name):
    # `import biasmap_engine.soft_topk as m` would give a function of that name, not the module, as it once did.
    parent, _, short = name.rpartition(".")
    assert getattr(importlib.import_module(parent), short) is importlib.import_module(name)


def test_the_readmes_engine_section_names_every_name_the_engine_exports():
    # A notebook user reads the README's table, not __all__: a name added to the package is added there too.
    readme = (Path(biasmap_engine.__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The engine, for notebooks"):readme.index("## How it hooks ComfyUI")]
    named = set(re.findall(r"`(?:[A-Za-z_]\w*\.)?([A-Za-z_]\w*)", section))
    assert [name for name in biasmap_engine.__all__ if name not in named] == []


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


def test_the_nodes_reach_comfyui_through_the_host_adapter_and_its_node_api_alone():
    # A node pack's own modules: comfy_api (the V3 schema) and folder_paths (where files go), as ComfyUI's nodes use
    # them; comfy, its executor and its server are read in biasmap_engine.host, so that the nodes stay thin.
    root = Path(biasmap_engine.__file__).parents[1]
    reached = {}
    for path in sorted([root / "__init__.py", *(root / "nodes").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            reached.update({name.split(".")[0]: path.name for name in names})
    assert {"comfy_api", "folder_paths"} <= reached.keys()
    assert not reached.keys() & {"comfy", "comfy_execution", "comfy_extras", "execution", "nodes", "server"}, reached
    looked_up = [path.name for path in (root / "nodes").glob("*.py")  # ComfyUI's modules found without an import
                 if re.search(r"sys\.modules|importlib", path.read_text(encoding="utf-8"))]
    assert looked_up == []


def test_the_shipped_workflows_name_this_pack_and_its_version_on_each_of_its_nodes():
    # The frontend finds the pack of a node missing from a user's install by its cnr_id (ComfyUI Manager's registry).
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    root = Path(biasmap_engine.__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ours = [node for path in sorted((root / "workflows").glob("*.json"))
            for node in json.loads(path.read_text(encoding="utf-8"))["nodes"] if node["type"].startswith("BiasMap")]
    assert len(ours) >= 10
    assert {(node["properties"].get("cnr_id"), node["properties"].get("ver")) for node in ours} == {
        (project["name"], project["version"])}


def test_the_version_rows_record_is_the_one_the_registry_reads_from_pyproject():
    # Rows record which BiasMap measured them; the pack in custom_nodes runs its own files, whatever pip installed.
    from biasmap_engine.version import pack_version

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    root = Path(biasmap_engine.__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert pack_version() == project["version"]


def test_the_package_declares_no_accelerator_so_comfyuis_page_flags_no_device_as_unsupported():
    # A GPU classifier lists the only devices supported: the page would warn on a Mac or a CPU, where the pack runs.
    tomllib = pytest.importorskip("tomllib")
    root = Path(biasmap_engine.__file__).parents[1]
    classifiers = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["classifiers"]
    assert [c for c in classifiers if c.startswith("Environment :: GPU")] == []


def test_each_shipped_workflow_has_the_thumbnail_comfyuis_template_browser_asks_for():
    # The browser asks for /api/workflow_templates/<pack>/<name>.jpg: without one, a 404 and a blank card.
    root = Path(biasmap_engine.__file__).parents[1]
    workflows = sorted((root / "workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        thumbnail = path.with_suffix(".jpg").read_bytes()
        assert thumbnail[:3] == b"\xff\xd8\xff" and len(thumbnail) < 100_000  # a JPEG, small enough for a card


def test_no_two_nodes_of_a_shipped_workflow_overlap_where_it_places_them():
    # As the page draws a node: its title bar (30 px) above its position, its size below. Nodes that grow when they
    # show a picture are stored at the size they grow to (checked on ComfyUI v0.8.0's page at 512²).
    root = Path(biasmap_engine.__file__).parents[1]
    for path in sorted((root / "workflows").glob("*.json")):
        boxes = {node["id"]: (node["pos"][0], node["pos"][1] - 30, node["pos"][0] + node["size"][0],
                              node["pos"][1] + node["size"][1])
                 for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]}
        overlapping = [(a, b) for a, b in itertools.combinations(boxes, 2)
                       if boxes[a][0] < boxes[b][2] and boxes[b][0] < boxes[a][2]
                       and boxes[a][1] < boxes[b][3] and boxes[b][1] < boxes[a][3]]
        assert overlapping == [], f"{path.name}: nodes {overlapping} overlap"


def test_the_discovery_workflows_attribution_maps_draw_their_legend():
    root = Path(biasmap_engine.__file__).parents[1]
    graph = json.loads((root / "workflows" / "biasmap_discover_and_mitigate.json").read_text(encoding="utf-8"))
    maps = [node for node in graph["nodes"] if node["type"] == "BiasMapAttributionMap"]
    # legend: the widget after scale ("each image"), before blend
    assert len(maps) == 2 and all(node["widgets_values"][8:] == ["each image", True, "uniform"] for node in maps)
