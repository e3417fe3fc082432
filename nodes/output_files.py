"""Files the nodes write: names typed by users (and shared in workflows) checked before anything is written, and
shown back as the user typed them."""

import os
import re

import folder_paths

__all__ = ["inside", "name_in", "output_path"]


def output_path(name: str, what: str, example: str) -> str:
    """``name`` as a path inside ComfyUI's output folder; a path that leaves it is refused, as ComfyUI's savers refuse
    it, but with a message that says what to type. A backslash separates folders on every system, as on Windows: a
    shared workflow writes to the same place wherever it runs."""
    # A folder ("biasmap/"), or a name Windows trims to nothing, would write a hidden ".csv"; ".csv" would be one too.
    last = name.replace("\\", "/").rsplit("/", 1)[-1].rstrip(" .")
    if not last or last.startswith("."):
        raise ValueError(f"the {what} '{name}' names no file (a folder, or a name that is empty or starts with a dot): "
                         f"add a file name, e.g. {example}")
    problem = _unportable(name)
    if problem:
        raise ValueError(f"the {what} '{name}' {problem}, e.g. {example}")
    output_dir = os.path.abspath(folder_paths.get_output_directory())
    path = os.path.abspath(os.path.join(output_dir, name.replace("\\", "/")))
    if not inside(path, output_dir):
        raise ValueError(f"the {what} '{name}' would be written outside ComfyUI's output folder: give a path inside "
                         f"it, e.g. {example}")
    return path


# Names no file can have on Windows (devices), with any extension; and a name's length in bytes that leaves room,
# within the 255 bytes of a file name, for Save Trace's counter and extension and for the partial file of Audit Log's
# table (.NAME_reductions.csv.<32 hex digits>.partial, 57 bytes more).
_DEVICES = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(\..*)?", re.IGNORECASE)
_LONGEST_NAME = 190


def _unportable(name: str) -> str | None:
    """Why ``name`` is no file name on some system, or None: a workflow is shared, and a name that fails only when the
    node runs costs the run. Outside an absolute path's start (a drive, C:), as Windows reads it."""
    parts = re.split(r"[/\\]", os.path.splitdrive(name)[1] if os.name == "nt" else name)
    if any(ord(c) < 32 or c in '<>:"|?*' for part in parts for c in part):
        return ("holds a character that file names cannot hold on every system (<>:\"|?* or a control character): "
                "use letters, digits, - and _")
    if any(_DEVICES.fullmatch(part.rstrip(" .")) for part in parts):
        return "names a Windows device (CON, NUL, AUX, PRN, COM1, LPT1…), where nothing is saved: choose another name"
    if any(len(part.encode()) > _LONGEST_NAME for part in parts):
        return f"has a folder or file name longer than {_LONGEST_NAME} bytes: shorten it"
    return None


def name_in(path: str, folder: str) -> str:
    """A file's name as the user sees it: its path from ``folder``, with "/" on every system (not the server's own
    path)."""
    return os.path.relpath(path, folder).replace(os.sep, "/")


def inside(path: str, root: str) -> bool:
    """Whether ``path`` lies in the folder ``root`` (both absolute and normalised; in the system's case: on Windows,
    BiasMap/trace is in biasmap)."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath((path, root)) == root
    except ValueError:  # Windows: another drive
        return False
