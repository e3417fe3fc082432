"""What BiasMap needs to know about ComfyUI's conditioning entries: which run on the whole latent, which carry
a ControlNet, under which hook groups they run. Entries are the dicts of a processed CONDITIONING list, as
calc_cond_batch receives them.
"""

import struct
import weakref

import torch

__all__ = ["attached_modules", "control_models", "covers_image", "hook_groups"]


def covers_image(entries, x, timestep) -> bool:
    """Whether one of a branch's conditioning entries runs on the whole latent at this step.

    As ComfyUI's ``get_area_and_mult`` decides: an entry outside its timestep range is skipped, and one with an area
    smaller than the latent runs on a crop. Only entries with a timestep range read σ on the host.
    """
    if not entries:
        return False
    height, width = x.shape[-2:]
    for entry in entries:  # a "default" entry (hook keyframes) runs on the whole latent wherever no other one does
        if not _in_range(entry, timestep):
            continue
        area = entry.get("area")  # (sizes…, offsets…) in latent pixels, resolved by ComfyUI before sampling
        if area is None:
            return True
        size, offset = area[:len(area) // 2], area[len(area) // 2:]
        if not any(offset) and size[-2] >= height and size[-1] >= width:
            return True
    return False


def control_models(conds):
    """The modules of the ControlNets (and their chained predecessors) attached to ``conds``' entries."""
    seen = []
    for entries in conds:
        for entry in entries or []:
            control = entry.get("control")
            while control is not None:
                for module in (getattr(control, "control_model", None), getattr(control, "t2i_model", None)):
                    if isinstance(module, torch.nn.Module) and all(module is not m for m in seen):
                        seen.append(module)
                control = getattr(control, "previous_controlnet", None)
    return seen


def attached_modules(conds) -> list:
    """The modules other than ControlNets that ``conds``' entries bring into the U-Net's pass, as ComfyUI's
    ``get_additional_models`` finds them: GLIGEN (its gated attention runs as a patch in every transformer block)
    and the entries' ``additional_models``."""
    seen = []
    for entries in conds:
        for entry in entries or []:
            gligen = entry.get("gligen")
            others = entry.get("additional_models", [])  # a list, or one model, as get_models_from_cond takes it
            for patcher in ([gligen[1]] if gligen else []) + (others if isinstance(others, list) else [others]):
                module = getattr(patcher, "model", patcher)  # a ModelPatcher, or the module itself
                if isinstance(module, torch.nn.Module) and all(module is not m for m in seen):
                    seen.append(module)
    return seen


def hook_groups(conds, timestep) -> list[list]:
    """``conds`` split by hook group (Create Hook LoRA and the like; no hooks is a group too), in ComfyUI's order,
    leaving out the entries that do not run at this step (outside their timestep range).

    ComfyUI's calc_cond_batch runs each group in turn, patching that group's weights into the model in place, so a
    backward after the call goes through the weights of the group that ran last. Each part keeps ``conds``' layout
    (one list per CFG branch, None where ``conds`` has None), with only that group's entries.
    """
    parts: dict = {}  # keyed as ComfyUI keys them (hooked_to_run)
    for branch, entries in enumerate(conds):
        for entry in entries or []:
            if _in_range(entry, timestep):
                part = parts.setdefault(entry.get("hooks"), [None if other is None else [] for other in conds])
                part[branch].append(entry)
    return list(parts.values())


def _in_range(entry, timestep) -> bool:
    """Whether an entry runs at this step as far as its timestep range goes (ComfyUI's ``get_area_and_mult``).

    As ComfyUI compares them: σ in its tensor's dtype against the entry's bound. Only entries with a range read σ, on
    the host, and once per evaluation (_sigma_on_host), however many entries and questions there are.
    """
    if "timestep_start" not in entry and "timestep_end" not in entry:
        return True
    sigma, dtype = _sigma_on_host(timestep)
    if "timestep_start" in entry and _beyond(sigma, dtype, entry["timestep_start"], above=True):
        return False
    return not ("timestep_end" in entry and _beyond(sigma, dtype, entry["timestep_end"], above=False))


_last_sigma: tuple = (None, None)  # (weak reference to an evaluation's timestep tensor, what _sigma_on_host gave)


def _sigma_on_host(timestep: torch.Tensor) -> tuple[float, torch.dtype]:
    """σ of the evaluation as a Python number (exact), and its tensor's dtype."""
    global _last_sigma
    seen, answer = _last_sigma
    if seen is None or seen() is not timestep:
        answer = timestep.reshape(-1)[0].tolist(), timestep.dtype  # the one read on the host
        _last_sigma = (weakref.ref(timestep), answer)
    return answer


def _beyond(sigma: float, dtype: torch.dtype, bound: float, above: bool) -> bool:
    """σ > bound (``above``) or σ < bound, the bound rounded to σ's dtype as a tensor comparison rounds it."""
    if dtype == torch.float32:  # ComfyUI's sigmas: in plain Python
        bound = struct.unpack("f", struct.pack("f", bound))[0]
        return sigma > bound if above else sigma < bound
    value = torch.tensor(sigma, dtype=dtype)  # on the host, from the number read
    return bool(value > bound) if above else bool(value < bound)
