"""The pack inside a real ComfyUI server: it boots, lists its nodes, and runs the shipped workflows.

Needs ``COMFYUI_PATH`` (a ComfyUI v0.8.0 checkout whose requirements are installed in this interpreter). The server
runs as a subprocess (``main.py --cpu`` on a free loopback port) that loads the pack through a symlink in a
temporary ``custom_nodes`` folder named by an ``--extra-model-paths-config`` YAML, so nothing is copied into
ComfyUI. This process never imports ComfyUI: the random checkpoint is written by a child process too.
One server boot serves the whole module (about 1 min on 2 CPU cores, most of it sampling with random weights).
"""

import asyncio
import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp  # ComfyUI's own HTTP library: installed with its requirements
import pytest

from biasmap_engine import BiasMapTrace

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"
sys.path.insert(0, str(SUPPORT))
import workflow_api  # noqa: E402

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH is not set: the real ComfyUI server tests (boot with the pack, shipped workflows end "
                "to end) did NOT run; set it to a ComfyUI v0.8.0 checkout to run them", allow_module_level=True)

PACK_NAME = "biasmap"
NODE_IDS = ("BiasMapGuidedKSampler", "BiasMapGuidedKSamplerAdvanced", "BiasMapAttributionMap",
            "BiasMapEntanglementIoU", "BiasMapSaveTrace", "BiasMapLoadTrace", "BiasMapAuditPrompts", "BiasMapAuditLog")
CHECKPOINT = "biasmap_random_tiny_sd15.safetensors"
BOOT_TIMEOUT_S = 90
PROMPT_TIMEOUT_S = 180
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))

# Loopback only, and never through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(base: str, path: str, timeout: float = 10):
    with _HTTP.open(base + path, timeout=timeout) as response:
        return json.load(response)


def _post(base: str, path: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    """``(HTTP status, JSON body)``; a 400 from /prompt carries the validation errors."""
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(text)
        except json.JSONDecodeError:
            return err.code, {"error": text}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _write_checkpoint(path: Path, log: Path) -> None:
    """A random tiny SD15 checkpoint with a VAE, written by a child process (it imports ComfyUI)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import comfy_models; "
            "comfy_models.write_random_sd15_checkpoint(sys.argv[2], 'tiny', with_vae=True)")
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-c", code, str(SUPPORT), str(path)], cwd=str(SUPPORT),
                              env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH}, stdout=out, stderr=subprocess.STDOUT,
                              timeout=300)
    assert done.returncode == 0 and path.is_file(), f"writing the random checkpoint failed:\n{_tail(log)}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Boot ComfyUI once for the module; yield its base URL, /object_info, log and folders; kill it by PID."""
    root = Path(COMFYUI_PATH).resolve()
    if not (root / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH!r} holds no main.py")
    tmp = tmp_path_factory.mktemp("comfyui")
    folders = {name: tmp / name for name in ("checkpoints", "custom_nodes", "out", "temp", "input", "user")}
    for folder in folders.values():
        folder.mkdir()
    (folders["custom_nodes"] / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    _write_checkpoint(folders["checkpoints"] / CHECKPOINT, tmp / "checkpoint.log")
    config = tmp / "extra_model_paths.yaml"
    config.write_text(f"biasmap:\n  base_path: {tmp}\n  checkpoints: {folders['checkpoints']}\n"
                      f"  custom_nodes: {folders['custom_nodes']}\n")

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--extra-model-paths-config", str(config), "--output-directory", str(folders["out"]),
               "--temp-directory", str(folders["temp"]), "--input-directory", str(folders["input"]),
               "--user-directory", str(folders["user"]), "--disable-api-nodes"]
    started = time.monotonic()
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=str(root), stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        object_info = None
        while object_info is None:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode} while booting:\n{_tail(log)}")
            if time.monotonic() - started > BOOT_TIMEOUT_S:
                pytest.fail(f"ComfyUI did not answer /object_info within {BOOT_TIMEOUT_S} s:\n{_tail(log)}")
            try:
                object_info = _get(base, "/object_info", timeout=30)
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(1)
        print(f"ComfyUI answered /object_info after {time.monotonic() - started:.1f} s")
        yield {"base": base, "object_info": object_info, "log": log, "out": folders["out"], "pid": process.pid,
               "pack": folders["custom_nodes"] / PACK_NAME}
    finally:
        if process.poll() is None:
            process.terminate()  # this PID only; main.py starts no children
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
        (folders["checkpoints"] / CHECKPOINT).unlink(missing_ok=True)  # 465 MB; pytest keeps old temp folders


def test_comfyui_boots_with_the_pack_and_lists_its_nodes(server):
    text = server["log"].read_text(errors="replace")
    pack_dir = str(server["pack"])  # ComfyUI names a pack by the path it found it at (the symlink, unresolved)
    failures = [line for line in text.splitlines()
                if ("Cannot import" in line or "IMPORT FAILED" in line)
                and (pack_dir in line or f"custom_nodes.{PACK_NAME}" in line)]
    assert not failures, "the pack failed to import:\n" + "\n".join(failures) + "\n" + _tail(server["log"], 120)
    assert any(pack_dir in line and "seconds" in line for line in text.splitlines()), \
        f"no load-time line for the pack in the log:\n{_tail(server['log'])}"

    info = server["object_info"]
    missing = [node for node in NODE_IDS if node not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{_tail(server['log'])}"
    for node in NODE_IDS:
        assert info[node]["category"] == "BiasMap", (node, info[node]["category"])
        module = info[node]["python_module"]
        assert module == f"custom_nodes.{PACK_NAME}", (node, module)


def _run_prompt(server, api: dict, outputs: list[str] | None = None) -> dict:
    """Queue ``api`` (only the output nodes ``outputs``, as "Queue Selected Output Nodes" does) and wait for it."""
    body = {"prompt": api, "client_id": "biasmap-tests"} | ({"partial_execution_targets": outputs} if outputs else {})
    status, answer = _post(server["base"], "/prompt", body)
    assert status == 200 and not answer.get("node_errors"), (status, json.dumps(answer, indent=1))
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + PROMPT_TIMEOUT_S
    while time.monotonic() < deadline:
        entry = _get(server["base"], f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        time.sleep(1)
    pytest.fail(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT_S} s:\n{_tail(server['log'])}")


def _errors(entry: dict) -> str:
    parts = []
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            parts.append(f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                         f"{data.get('exception_message')}\n" + "".join(data.get("traceback", [])))
    return "\n".join(parts) or json.dumps(entry.get("status"), indent=1)


def test_shipped_workflows_run_end_to_end(server):
    assert WORKFLOWS, f"no workflows in {REPO / 'workflows'}"
    typed = set()  # the generation prompts the graphs feed their samplers
    for path in WORKFLOWS:
        graph = json.loads(path.read_text())
        for node in graph["nodes"]:
            if node["type"] in server["object_info"]:  # the JSON's sockets as the node's schema has them now
                info = server["object_info"][node["type"]]
                assert [o["name"] for o in node.get("outputs", [])] == list(info["output_name"]), (path.name, node)
            if node["type"] == "CheckpointLoaderSimple":  # the frontend offers to download a missing model from it
                models = node["properties"]["models"]
                assert [(m["name"], m["directory"]) for m in models] == [(node["widgets_values"][0], "checkpoints")]
                assert models[0]["url"].startswith("https://") and models[0]["url"].endswith(models[0]["name"])
            if node["type"] == "BiasMapSaveTrace":
                assert node["mode"] == workflow_api.MODE_MUTED  # shipped muted: a trace a run adds up over an audit
                node["mode"] = 0
        api = _small(workflow_api.ui_to_api(graph, server["object_info"]), steps=2)

        for node in api.values():
            text = api[node["inputs"]["positive"][0]]["inputs"]["text"] if "positive" in node["inputs"] else None
            if node["class_type"].startswith("BiasMapGuidedKSampler") and isinstance(text, str):  # not a link
                typed.add(text)
        # Samplers side by side compare one picture: one seed feeds them, so changing it cannot part them. It comes
        # from the frontend's Primitive, which draws "randomize" within the seed's own range: ComfyUI's Int node
        # draws negative numbers half the time, which the samplers refuse.
        # So does one attribution prompt: a word's map is its share of the attention over the prompt's words, so a
        # word added to one sampler's prompt alone would move the other's maps.
        for name in ("seed", "attribution_prompt"):
            values = [n["inputs"][name] for n in api.values() if n["class_type"] == "BiasMapGuidedKSampler"]
            feeds = {_source(graph, n, name) for n in graph["nodes"] if n["type"] == "BiasMapGuidedKSampler"}
            shared = len(values) < 2 or values.count(values[0]) == len(values) and feeds == {"PrimitiveNode"}
            assert shared, (path.name, name, values, feeds)

        started = time.monotonic()
        entry = _run_prompt(server, api)
        print(f"{path.name}: {entry['status']['status_str']} in {time.monotonic() - started:.1f} s")
        assert entry["status"]["status_str"] == "success", f"{path.name} failed:\n{_errors(entry)}"
        outputs = entry["outputs"]

        ious = [node_id for node_id, node in api.items() if node["class_type"] == "BiasMapEntanglementIoU"]
        assert ious, f"{path.name} has no Entanglement IoU node"
        for node_id in ious:
            text = outputs.get(node_id, {}).get("text")
            assert text and all(isinstance(t, str) and t.strip() for t in text), (path.name, node_id, outputs)
            assert "IoU" in text[0], (path.name, node_id, text)

        saves = [node_id for node_id, node in api.items() if node["class_type"] == "SaveImage"]
        assert saves, f"{path.name} has no SaveImage node"
        for node_id in saves:
            images = outputs.get(node_id, {}).get("images")
            assert images, (path.name, node_id, outputs)
            for image in images:
                assert image["type"] == "output", image
                file = server["out"] / image["subfolder"] / image["filename"]
                assert file.is_file() and file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", file

        # The map nodes show their pictures themselves: the workflows link no Preview Image to them.
        pictured = [node_id for node_id, node in api.items()
                    if node["class_type"] in ("PreviewImage", "BiasMapAttributionMap", "BiasMapEntanglementIoU")]
        assert all(outputs.get(node_id, {}).get("images") for node_id in pictured), (path.name, outputs)
        shown_twice = [node_id for node_id, node in api.items() if node["class_type"] == "PreviewImage"
                       and api[node["inputs"]["images"][0]]["class_type"].startswith("BiasMap")]
        assert not shown_twice, (path.name, shown_twice)
        # The report reaches the page through ComfyUI's Preview as Text, the one node its frontend shows text of.
        previewed = [outputs[node_id]["text"][0] for node_id, node in api.items() if node["class_type"] == "PreviewAny"]
        assert sum("mBIoU" in text for text in previewed) == len(ious), f"{path.name}: a report is not previewed"
        compared = [node_id for node_id in ious if "baseline" in api[node_id]["inputs"]]  # λ = 100 against λ = 0
        assert compared or "discover" not in path.name, f"{path.name}: λ = 100 is not compared with λ = 0"
        assert all("\nagainst the baseline (" in outputs[node_id]["text"][0] for node_id in compared), path.name

    audit = server["out"] / "biasmap" / "audit.csv"
    with open(audit, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert [(r["seed"], r["demographic"], r["semantic"]) for r in rows] == [("42", "gender", "doctor")], rows
    traces = sorted((server["out"] / "biasmap").glob("trace_*_.safetensors"))
    assert len(traces) == 1, traces
    run = BiasMapTrace.load(str(traces[0])).run
    assert run["seed"] == 42 and run["prompt_id"] == rows[0]["prompt_id"] != "", (run, rows)  # the server's id
    # Read from the graph ComfyUI ran: the sampler gets conditioning, not text.
    assert rows[0]["generation_prompt"] == run["generation_prompt"] and run["generation_prompt"] in typed, (run, typed)
    # The Advanced sampler's SIGMAS come from BasicScheduler, which the graph names; so is the checkpoint.
    assert (rows[0]["scheduler"], rows[0]["denoise"], rows[0]["model"]) == ("normal", "1.0", CHECKPOINT), rows[0]
    assert (rows[0]["width"], rows[0]["height"]) == ("64", "64"), rows[0]


def _source(graph: dict, node: dict, name: str) -> str:
    """The type of the node whose link feeds ``node``'s input ``name``, or "widget" for its own."""
    link = next((i.get("link") for i in node.get("inputs", []) if i["name"] == name), None)
    if link is None:
        return "widget"
    origin = next(entry[1] for entry in graph["links"] if entry[0] == link)
    return next(n["type"] for n in graph["nodes"] if n["id"] == origin)


def _convert(server, name: str) -> dict:
    return workflow_api.ui_to_api(json.loads((REPO / "workflows" / name).read_text()), server["object_info"])


def _small(api: dict, steps: int = 1) -> dict:
    """A workflow's API graph on the test checkpoint, at 64² and ``steps`` steps, whichever sampler it has."""
    workflow_api.override(api, "CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    workflow_api.override(api, "EmptyLatentImage", width=64, height=64, batch_size=1)
    workflow_api.override(api, "BiasMapGuidedKSampler", steps=steps)
    return workflow_api.override(api, "BasicScheduler", steps=steps)


def test_a_concept_missing_from_the_attribution_prompt_is_rejected_before_running(server):
    """The pack's validate_inputs runs in the server's validation: HTTP 400 naming the node and the word."""
    api = _convert(server, "biasmap_audit_advanced.json")
    workflow_api.override(api, "CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    workflow_api.override(api, "BiasMapGuidedKSamplerAdvanced", demographic="race")
    status, answer = _post(server["base"], "/prompt", {"prompt": api, "client_id": "biasmap-tests"})
    assert status == 400, (status, answer)
    sampler = next(i for i, node in api.items() if node["class_type"] == "BiasMapGuidedKSamplerAdvanced")
    assert sampler in answer.get("node_errors", {}), json.dumps(answer, indent=1)
    assert "race" in json.dumps(answer["node_errors"][sampler]), json.dumps(answer, indent=1)


def test_a_word_the_map_nodes_ask_for_and_the_attribution_prompt_lacks_stops_the_sampler_before_it_samples(server):
    # The map nodes cannot see the attribution prompt when the prompt is queued; the sampler reads their words from
    # the graph ComfyUI runs (its hidden prompt) and refuses before its first step.
    api = _small(_convert(server, "biasmap_discover_and_mitigate.json"))
    workflow_api.override(api, "BiasMapAttributionMap", word="gendre")
    page = _PageText(server["base"], "biasmap-tests")
    try:
        entry = _run_prompt(server, api)
        time.sleep(1)  # the events go out while the prompt runs; the history may come first
    finally:
        page.close()
    assert entry["status"]["status_str"] == "error"
    (error,) = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert error["node_type"] == "BiasMapGuidedKSampler", _errors(entry)
    # Its node's text says so too, rather than still telling of the run before.
    assert page.texts[error["node_id"]] == [f"stopped: {error['exception_message'].rstrip()}"]
    # Named by the title the workflow gave it (the page shows titles, not ids), with its id.
    assert error["exception_message"].startswith('Attribution Map "Where is the demographic concept'), _errors(entry)
    assert re.search(r'" \(node \d+\) asks for word', error["exception_message"]), _errors(entry)
    assert "asks for word 'gendre', which is not a word of this sampler's attribution prompt" in (
        error["exception_message"]), _errors(entry)
    assert not [data for kind, data in entry["status"]["messages"] if kind == "execution_success"]
    # Queued without that node (Queue Selected Output Nodes on the Save Image), the map does not run: no refusal.
    save = next(node_id for node_id, node in api.items() if node["class_type"] == "SaveImage")
    entry = _run_prompt(server, api, outputs=[save])
    assert entry["status"]["status_str"] == "success", _errors(entry)
    assert list(entry["outputs"]) == [save], entry["outputs"]


class _PageText:
    """The texts ComfyUI sends a page to write on its nodes (the binary "progress text" event, 3), heard as the page
    hears them: on a websocket of the client id the prompts are queued with."""

    def __init__(self, base: str, client_id: str):
        self.texts: dict[str, list[str]] = {}  # node id → every text sent, in order
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._url = base.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), f"no websocket at {self._url}"

    async def _listen(self):
        async with aiohttp.ClientSession() as session, session.ws_connect(self._url) as socket_:
            self._socket = socket_
            self._ready.set()
            async for message in socket_:
                if message.type == aiohttp.WSMsgType.BINARY and int.from_bytes(message.data[:4], "big") == 3:
                    length = int.from_bytes(message.data[4:8], "big")
                    node_id = message.data[8:8 + length].decode()
                    self.texts.setdefault(node_id, []).append(message.data[8 + length:].decode())

    def close(self):
        asyncio.run_coroutine_threadsafe(self._socket.close(), self._loop).result(10)
        self._thread.join(10)


def test_the_nodes_write_what_the_console_says_on_the_page_without_a_preview_as_text(server):
    # The page shows no console: the samplers' guidance counts and notes, the figures and the map's window are
    # written on each node (as Get Image Size writes a size), replaced by the next run's, to the queuing page only.
    api = _small(_convert(server, "biasmap_discover_and_mitigate.json"), steps=2)
    page, other_page = _PageText(server["base"], "biasmap-tests"), _PageText(server["base"], "another-page")
    try:
        entry = _run_and_hear(server, api, page)
        # A concept typed in markup, a map of one step and stage over an image of another shape, and a cfg that is
        # not a number (a NaN the notes name).
        tagged = {"attribution_prompt": "A photo of the face of a doctor and <i>gender</i>",
                  "demographic": "<i>gender</i>"}
        workflow_api.override(api, "BiasMapGuidedKSampler", **tagged)
        api["90"] = {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1, "color": 0}}
        api["11"]["inputs"] |= {"stages": "down_1", "first_step": 1, "last_step": 1, "image": ["90", 0]}
        api["15"]["inputs"]["image"] = ["90", 0]
        api["6"]["inputs"]["cfg"] = float("nan")
        changed = _run_and_hear(server, api, page)
    finally:
        page.close()
        other_page.close()
    assert other_page.texts == {}  # what one page queued is written on its nodes, not on another page's
    first, second = entry.pop("heard"), changed.pop("heard")
    assert set(first) == set(second) == {i for i, node in api.items() if node["class_type"].startswith("BiasMap")}
    assert first["5"] == ["no guidance applied (λ = 0): recording only"]  # λ = 0, and no note
    report = entry["outputs"]["16"]["text"][0].splitlines()
    (guidance,) = [line for line in report if line.startswith("guidance over (evaluation, image) pairs: ")]
    assert first["6"] == [guidance]  # λ = 100: its counts, as the report of its trace gives them
    (means,) = [line for line in entry["outputs"]["15"]["text"][0].splitlines() if line.startswith("mIoU ")]
    assert first["15"] == [f"'gender' and 'doctor': {means}\nno guidance applied (λ = 0): recording only"]
    (means,) = [line for line in report if line.startswith("mIoU ")]
    (against,) = [line.split("): ", 1)[1] for line in report if line.startswith("against the baseline (")]
    assert first["16"] == [f"'gender' and 'doctor': {means}\nagainst the baseline: {against}\n{guidance}"]
    assert first["11"] == first["12"] == ["the map of 'gender': all stages, all steps"]

    (sampler,) = second["6"]
    assert sampler.splitlines()[0].startswith("guidance over (evaluation, image) pairs: ")
    assert "\nnote: " in sampler and "NaN" in sampler, sampler
    (drawn,) = second["11"]
    stretched = "the image is 96×64, a shape other than the decoded latent's (64×64)"
    assert drawn.startswith("the map of '&lt;i&gt;gender&lt;/i&gt;': down_1, step 1 of 0–1\n" + stretched), drawn
    assert f"\npicture: {stretched}" in second["15"][0]
    assert second["16"][0].startswith("'&lt;i&gt;gender&lt;/i&gt;' and 'doctor': mIoU n/a")  # a NaN image
    assert "image(s) 0 of the batch hold NaN or inf in the maps of '&lt;i&gt;gender&lt;/i&gt;'" in second["12"][0]


def _run_and_hear(server, api: dict, page: "_PageText") -> dict:
    """Run ``api`` as :func:`_run_prompt` does; its history entry, with the texts ``page`` heard under "heard"."""
    page.texts.clear()
    entry = _run_prompt(server, api)
    assert entry["status"]["status_str"] == "success", _errors(entry)
    expected = {i for i, node in api.items() if node["class_type"].startswith("BiasMap")}
    deadline = time.monotonic() + 10  # the events go out while the prompt runs; the history may come first
    while expected - set(page.texts) and time.monotonic() < deadline:
        time.sleep(0.2)
    return entry | {"heard": dict(page.texts)}


def test_an_audit_prompt_saved_before_audit_log_had_a_step_window_still_logs_its_rows(server):
    # API prompts carry no defaults: one without the inputs added since would lose the node, and ComfyUI would run
    # the rest (the sampler) and log nothing, answering 200 with the node's errors beside the prompt id.
    api = _small(_convert(server, "biasmap_audit_advanced.json"), steps=2)
    log = next(i for i, node in api.items() if node["class_type"] == "BiasMapAuditLog")
    workflow_api.override(api, "BiasMapAuditLog", filename="biasmap/before_steps")
    del api[log]["inputs"]["first_step"], api[log]["inputs"]["last_step"]
    page = _PageText(server["base"], "biasmap-tests")
    try:
        entry = _run_prompt(server, api)
        deadline = time.monotonic() + 10  # the events go out while the prompt runs; the history may come first
        while log not in page.texts and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        page.close()
    assert entry["status"]["status_str"] == "success", _errors(entry)
    # On the node: where the rows went and the file's figures, the summary output less its rows.
    summary, (said,) = entry["outputs"][log]["text"][0], page.texts[log]
    assert said.startswith("1 row(s) appended to output/biasmap/before_steps.csv\n"), said
    assert summary.startswith(said + "\n") and summary[len(said) + 1:].startswith("label,"), (said, summary)
    with open(server["out"] / "biasmap" / "before_steps.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert [(r["first_step"], r["last_step"]) for r in rows] == [("0", "1")], rows  # every step of the two


def test_the_professions_workflow_walks_its_plan_one_queued_run_at_a_time_and_refuses_a_run_past_it(server):
    api = _small(_convert(server, "biasmap_audit_professions.json"))
    workflow_api.override(api, "BiasMapAuditLog", filename="biasmap/plan_walk")
    workflow_api.override(api, "BiasMapAuditPrompts", subjects="doctor\nnurse", seeds=2, first_seed=5)
    for run in range(4):  # what "increment" sends, one queued prompt after another
        workflow_api.override(api, "BiasMapAuditPrompts", run=run)
        entry = _run_prompt(server, api)
        assert entry["status"]["status_str"] == "success", _errors(entry)
    with open(server["out"] / "biasmap" / "plan_walk.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    # Seed by seed: both subjects at seed 5, then at seed 6; the prompt read through the node that made it.
    assert [(r["semantic"], r["seed"], r["demographic"]) for r in rows] == [
        ("doctor", "5", "gender"), ("nurse", "5", "gender"), ("doctor", "6", "gender"), ("nurse", "6", "gender")]
    assert [r["generation_prompt"] for r in rows[:2]] == ["A photo of the face of a doctor",
                                                         "A photo of the face of a nurse"]
    assert rows[1]["attribution_prompt"] == "A photo of the face of a nurse and gender"
    workflow_api.override(api, "BiasMapAuditPrompts", run=4)
    status, answer = _post(server["base"], "/prompt", {"prompt": api, "client_id": "biasmap-tests"})
    plan = next(i for i, node in api.items() if node["class_type"] == "BiasMapAuditPrompts")
    assert status == 400, answer
    assert "the pass is complete; set run back to 0" in json.dumps(answer["node_errors"][plan]), answer
