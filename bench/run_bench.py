#!/usr/bin/env python
"""pe-lightning benchmarks: training-step throughput (ours vs open_clip), the data pipeline, the CPU default.

    python bench/run_bench.py              # the device there is: step, openclip, data, embedded (read only)
    python bench/run_bench.py --device cpu --sections step,openclip --steps 5
    python bench/run_bench.py --device cuda --sections step,openclip,data --out /somewhere
    python bench/run_bench.py --sections embedded --embedded-run  # time `pe-lightning train stage=pretrain`
    python bench/run_bench.py model.vision.grad_checkpointing=true  # recipe overrides for our stage

Writes `<out>/<device kind>-<date>T<time>.json` and `.md` (rewritten after every measured row, so a run cut
short keeps what it measured) and prints the Markdown. bench/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench.common import environment, error_record  # noqa: E402
from bench.report import markdown, ratios  # noqa: E402

# run order: the headline rows first, then the profile (the map for the next change), then the rest
SECTIONS = ("step", "openclip", "profile", "video", "distill", "lang", "data", "variants", "embedded")

# per device: (preset, batch, resolution, precision, compile, warmup, steps, data workers)
DEFAULTS = {
    "cuda": dict(preset="PE-Core-B16-224", batch=256, resolution=224, precision="bf16-mixed", compile=True,
                 warmup=10, steps=30, drivers="lightning,loop,lightning-pbar", data_workers="0,2,4,8"),
    "cpu": dict(preset="tiny", batch=64, resolution=64, precision="32-true", compile=False,
                warmup=6, steps=10, drivers="lightning,loop", data_workers="0,1,2"),
}


class Context:
    """The run's settings plus `checkpoint()`, which rewrites the report files."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
        self.device = device
        self.preset = args.preset or d["preset"]
        self.batch = args.batch or d["batch"]
        self.resolution = args.resolution or d["resolution"]
        self.precision = args.precision or d["precision"]
        self.compile = d["compile"] if args.compile == "auto" else args.compile == "on"
        self.peer_compile = self.compile if args.compile != "auto" else device.type == "cuda"
        self.warmup = max(1, args.warmup if args.warmup is not None else d["warmup"])
        self.steps = max(1, args.steps if args.steps is not None else d["steps"])
        self.drivers = [x for x in (args.drivers or d["drivers"]).split(",") if x]
        self.peer = args.peer
        self.data_workers = [int(x) for x in (args.data_workers or d["data_workers"]).split(",") if x != ""]
        self.data_seconds = args.data_seconds
        self.data_train = args.data_train
        self.data_root = args.data_root
        self.embedded_run = args.embedded_run
        self.embedded_from = args.embedded_from
        self.overrides = list(args.overrides)
        self.variants = [x for x in args.variants.split(",") if x and x != "optimizer"]
        self.optimizer_costs = "optimizer" in args.variants.split(",")
        self.keep_stage = bool({"variants", "profile"} & set(args.sections.split(",")))
        self.stage_under_test = None
        self.peak_flops = 0.0
        self.report: dict = {}
        self.paths: tuple[Path, Path] | None = None
        self.current = ""

    def publish(self, section: dict) -> None:
        """Make `section` (still being filled) the current section's record, so checkpoints show its rows."""
        self.report["sections"][self.current] = section

    def checkpoint(self) -> None:
        if self.paths is None:
            return
        self.report["ratios"] = ratios(self.report)
        json_path, md_path = self.paths
        for path, text in ((json_path, json.dumps(self.report, indent=2, default=str)),
                           (md_path, markdown(self.report))):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--sections", default="step,openclip,video,distill,lang,data,embedded",
                   help=f"comma list of {', '.join(SECTIONS)} (embedded only reads a finished run unless "
                        "--embedded-run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (GPU 30, CPU 10)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps before the timed ones, the first one "
                                                            "compiles (GPU 10, CPU 6: first touches of memory are slow in a VM)")
    p.add_argument("--out", default=str(_ROOT / "bench" / "results"))
    p.add_argument("--preset", default=None, help="our model preset (GPU PE-Core-B16-224, CPU tiny)")
    p.add_argument("--batch", type=int, default=None, help="GPU 256, CPU 64")
    p.add_argument("--resolution", type=int, default=None, help="GPU 224, CPU 64")
    p.add_argument("--precision", default=None, help="Lightning precision (GPU bf16-mixed, CPU 32-true as the "
                                                     "CPU default run)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="model.compile for ours and the compiled open_clip row (auto: on GPU only)")
    p.add_argument("--drivers", default=None, help="step drivers: lightning,loop,lightning-pbar")
    p.add_argument("--variants", default="no-mask-reg,eager,timm-lamb,adamw,optimizer",
                   help="rows of the `variants` section: our step with one change, through the minimal loop "
                        "(no-mask-reg, eager, timm-lamb, adamw), and `optimizer`: the optimizer step alone")
    p.add_argument("--peer", default="auto", help="open_clip model: auto (GPU PE-Core-B-16, CPU tiny-sized), "
                                                  "an open_clip model name, or tiny")
    p.add_argument("--data-workers", default=None, help="comma list of loader worker counts (GPU 0,1,2,4,8; "
                                                        "CPU 0,1,2)")
    p.add_argument("--data-seconds", type=float, default=5.0, help="measuring time per worker count")
    p.add_argument("--data-train", type=int, default=4096, help="images in the bench's shapes world")
    p.add_argument("--data-root", default=str(_ROOT / "data" / "bench-shapes"))
    p.add_argument("--embedded-run", action="store_true",
                   help="run `pe-lightning train stage=pretrain run=bench-embedded` (about 10 min on 2 cores)")
    p.add_argument("--embedded-from", default=None, help="a finished run (dir or metrics.json) to report")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value for our stage")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"expected key=value recipe overrides, got {bad}")
    unknown = [s for s in args.sections.split(",") if s and s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[bench] --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    ctx = Context(args, device)
    env = environment(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M")
    ctx.paths = (out / f"{env['device_kind']}-{stamp}.json", out / f"{env['device_kind']}-{stamp}.md")
    ctx.report = {
        "environment": env,
        "config": {"preset": ctx.preset, "batch": ctx.batch, "resolution": ctx.resolution,
                   "precision": ctx.precision, "compile": ctx.compile, "warmup": ctx.warmup, "steps": ctx.steps,
                   "drivers": ctx.drivers, "sections": sections, "overrides": ctx.overrides},
        "sections": {},
    }
    print(f"[bench] {env['device_name']} | torch {env['torch']} | lightning {env['lightning']} | timm "
          f"{env['timm']} | open_clip {env['open_clip']} | sections {','.join(sections)}", flush=True)

    if {"step", "openclip", "video", "distill", "lang"} & set(sections):
        from pe_lightning.perf import matmul_peak_flops

        try:
            matmul_peak_flops(device, size=2048 if device.type == "cuda" else 512, repeats=3)  # clocks up
            dtype = torch.bfloat16 if (device.type == "cuda" or ctx.precision.startswith("bf16")) else torch.float32
            ctx.peak_flops = matmul_peak_flops(device, dtype=dtype)
            size = 8192 if device.type == "cuda" else 1024
            ctx.report["peak_matmul_flops"] = ctx.peak_flops
            ctx.report["peak_matmul_desc"] = f"{str(dtype).replace('torch.', '')} {size}^3, pe_lightning.perf"
        except Exception as err:
            ctx.report["peak_matmul_error"] = f"{type(err).__name__}: {err}"

    from bench.data_pipeline import bench_data
    from bench.distill_step import bench_distill
    from bench.embedded import bench_embedded
    from bench.lang_step import bench_lang
    from bench.openclip_peer import bench_openclip
    from bench.profile_step import bench_profile
    from bench.step import bench_step
    from bench.variants import bench_variants
    from bench.video_step import bench_video

    runners = {"step": bench_step, "openclip": bench_openclip, "data": bench_data, "variants": bench_variants,
               "profile": bench_profile, "video": bench_video, "distill": bench_distill,
               "lang": bench_lang, "embedded": bench_embedded}
    for name in sections:
        t0 = time.perf_counter()
        print(f"[bench] section {name} ...", flush=True)
        ctx.current = name
        ctx.report["sections"][name] = {"status": "running"}
        try:
            result = runners[name](ctx)
        except Exception as err:  # a failed section never loses the others' results
            result = error_record(err)
            print(f"[bench] section {name} FAILED: {result['error']}\n{traceback.format_exc()}", flush=True)
        result["section_s"] = time.perf_counter() - t0
        ctx.report["sections"][name] = result
        ctx.checkpoint()
    if hasattr(os, "getloadavg"):
        ctx.report["environment"]["load_average_end"] = list(os.getloadavg())
    ctx.checkpoint()
    print()
    print(markdown(ctx.report))
    print(f"[bench] wrote {ctx.paths[0]} and {ctx.paths[1]}")
    return 0 if all(s.get("status") in ("ok", "skipped") for s in ctx.report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
