"""The pack's version, for the environment a trace and its audit rows record (which BiasMap measured them)."""

import functools
import importlib.metadata
import pathlib
import re

__all__ = ["pack_version"]

# The [project] table's version: the first such line of the pack's pyproject.toml, which ComfyUI's registry reads too.
_VERSION_LINE = re.compile(r'^version\s*=\s*"([^"]+)"', re.MULTILINE)


@functools.lru_cache(maxsize=1)
def pack_version() -> str:
    """BiasMap's version: from the pyproject.toml beside the engine (a pack in ComfyUI's custom_nodes, whose files
    are the code that runs), else from the installed distribution's metadata (pip), else ``unknown``."""
    pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        found = _VERSION_LINE.search(pyproject.read_text(encoding="utf-8"))
    except OSError:  # no such file: installed as a distribution
        found = None
    if found:
        return found.group(1)
    try:
        return importlib.metadata.version("biasmap")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
