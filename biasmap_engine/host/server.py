"""What the nodes read of ComfyUI's server and executor while a prompt runs: the server, the running prompt's
context, its queued output nodes, and whether saved files may carry the workflow."""

import sys

__all__ = ["executing_context", "metadata_disabled", "prompt_server", "queued_outputs"]


def prompt_server():
    """The server this ComfyUI runs, or None where it runs none (a script, a test): looked up, not imported, since
    importing ComfyUI's server module loads all of ComfyUI and would start a web app in a process without one."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def executing_context():
    """The executor's context of the node running now (prompt id, node id, list index), or None outside it."""
    from comfy_execution.utils import get_executing_context

    return get_executing_context()


def queued_outputs() -> list[str] | None:
    """The output nodes queued with the prompt running now, from the server's queue: "Queue Selected Output Nodes"
    queues some of a graph's. None outside a server (ComfyUI's executor called directly) or where the queue does not
    hold the prompt: then every node of the graph is taken as run, which checks more, never less."""
    server, context = prompt_server(), executing_context()
    if context is None or server is None:
        return None
    running, _ = server.prompt_queue.get_current_queue_volatile()
    # A queue item is (number, prompt_id, prompt, extra_data, outputs_to_execute, ...), as main.py's worker reads it.
    return next((list(item[4]) for item in running if item[1] == context.prompt_id), None)


def metadata_disabled() -> bool:
    """Whether ComfyUI runs with --disable-metadata, under which its savers leave the workflow out of their files."""
    from comfy.cli_args import args

    return args.disable_metadata
