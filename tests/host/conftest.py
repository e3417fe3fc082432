"""Host tests: the real ComfyUI (v0.8.0), found through COMFYUI_PATH, with random-weight models built from its classes."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = ("HOST TESTS SKIPPED: COMFYUI_PATH is not set; point it at a ComfyUI v0.8.0 checkout "
               "(see README, 'Pointing the tests at a ComfyUI checkout') to run them")

import comfy_models  # from tests/support (tests/conftest.py), before ComfyUI's own `tests` package could shadow it


def pytest_report_header(config):
    return SKIP_REASON if not COMFYUI_PATH else f"host tests against ComfyUI at {COMFYUI_PATH}"


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    for item in items:
        if Path(item.fspath).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI booted in-process (CPU unless CUDA is there), its temporary folder (node previews) a test's own."""
    comfy_models.boot_comfy(COMFYUI_PATH)
    import comfy.model_management
    import folder_paths

    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("comfyui-temp")))

    return comfy


@pytest.fixture(scope="session")
def kernel_slack():
    """Factor for tolerances between runs that batch differently or use another attention kernel.

    On the CPU such runs agree to fp32 rounding (oneDNN's kernels, too, may block by batch size); on a GPU cuBLAS and
    cuDNN pick kernels by batch size and layout, so they agree to fp32 rounding, amplified over the sampling steps.
    """
    import torch

    return 100.0 if torch.cuda.is_available() else 1.0


@pytest.fixture
def full_fp32():
    """TF32 off on CUDA (cuDNN enables it by default): finite differences need plain fp32 convolutions."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def gpu_batching(monkeypatch):
    """Guided evaluations run one batched CFG pass with autograd, as on a GPU, whatever device the tests run on."""
    import biasmap_engine.host.session as session

    monkeypatch.setattr(session, "_branches_apart", lambda device: False)


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack imported the way ComfyUI's loader imports a custom-node folder."""
    spec = importlib.util.spec_from_file_location("biasmap_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["biasmap_pack"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sd15(comfy):
    """A tiny SD1.5-shaped model and CLIP built inside inference mode, as ComfyUI's loaders make them."""
    import torch

    with torch.inference_mode():
        return comfy_models.tiny_sd15(0)


@pytest.fixture(scope="session")
def prompts(sd15):
    """Positive and negative CONDITIONING of the paper's prompt for the tiny SD1.5 model."""
    import torch

    _, clip = sd15
    with torch.inference_mode():
        return comfy_models.paper_prompts(clip)
