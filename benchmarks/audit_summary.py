"""The Audit Log's summary of a paper-sized audit file: this checkout against another, interleaved in one process.

Audit Log makes its summary (``reductions_text``: the paper's reductions per profession, with their intervals, or,
where the checkout has it, ``reductions_report``: the same and the table it writes beside the file) over the whole
file again after every run, so its time is paid 3800 times over the paper's protocol (19 professions × 100 seeds,
guided and at λ = 0). Rows are
made as ``read_csv`` gives them back (text), with random IoUs; each repeat times both checkouts, alternating which
goes first; the first call of each (its caches empty) is reported apart. Needs no ComfyUI. Usage:

    python benchmarks/audit_summary.py OTHER_CHECKOUT [--repeats 9] [--seeds 100] [--subjects 19]
"""

import argparse
import random
import statistics
import time
from pathlib import Path

from ab_sampling import load_engine  # this folder

REPO = Path(__file__).resolve().parents[1]


def audit_file_rows(subjects: int, seeds: int) -> list[dict]:
    """An audit's rows as the file gives them back: every value text, a guided and a λ = 0 row per image."""
    rng = random.Random(0)
    run = {"steps": "50", "cfg": "7.0", "sampler": "euler", "scheduler": "normal", "denoise": "1.0", "q": "0.7",
           "add_noise": "True", "include_middle": "False", "model": "v1-5.safetensors", "demographic": "gender",
           "branch": "uncond", "soft_topk": "paper", "gate": "skip", "guided_stages": "all", "start": "0.0",
           "end": "1.0", "first_step": "0", "last_step": "49", "mask_size": "64x64"}
    rows = []
    for subject in range(subjects):
        for seed in range(seeds):
            base = rng.random()
            for scale, iou in (("0.0", base), ("100.0", base * rng.uniform(0.4, 0.8))):
                rows.append({**run, "seed": str(seed), "image": "0", "noise_index": "0", "semantic": f"job{subject}",
                             "generation_prompt": f"A photo of the face of a job{subject}", "guidance_scale": scale,
                             "iou": f"{iou:.6f}", "mbiou": f"{iou * 0.9:.6f}"})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--subjects", type=int, default=19)
    args = parser.parse_args()
    engines = {"this": load_engine(REPO, "biasmap_engine")[0],
               "other": load_engine(args.other.resolve(), "biasmap_other")[0]}
    rows = audit_file_rows(args.subjects, args.seeds)
    first, times = {}, {name: [] for name in engines}
    for repeat in range(args.repeats + 1):
        for name in (list(engines) if repeat % 2 == 0 else list(reversed(engines))):
            start = time.perf_counter()
            getattr(engines[name], "reductions_report", engines[name].reductions_text)(rows)
            (times[name] if repeat else first.setdefault(name, [])).append(time.perf_counter() - start)
    tables = ", ".join(name for name, engine in engines.items() if hasattr(engine, "reductions_report")) or "neither"
    print(f"reductions_text (reductions_report, text and table: {tables}) over {len(rows)} rows "
          f"({args.subjects} subjects × {args.seeds} seeds, guided and λ = 0); "
          f"medians of {args.repeats} interleaved repeats after a first call each\n")
    print("| checkout | first call s | later calls s (median) |")
    print("|---|--:|--:|")
    for name in engines:
        print(f"| {name} | {first[name][0]:.3f} | {statistics.median(times[name]):.3f} |")
    print(f"\nthis / other (later calls): {statistics.median(times['this']) / statistics.median(times['other']):.2f}")


if __name__ == "__main__":
    main()
