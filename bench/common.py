"""What every bench section shares: the environment record, step timing, peak memory, synthetic batches."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import re
import subprocess
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------
# environment
def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_kind(device: torch.device) -> str:
    """A file-name slug: 'nvidia-h200', 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "cuda"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device),
        "device_kind": device_kind(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "timm": _version("timm"),
        "open_clip": _version("open_clip_torch"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "argv": sys.argv[1:],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    return env


# ----------------------------------------------------------------------------------------------------------
# timing and memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Window:
    """Elapsed time of a window of queued device work: CUDA events on GPU (no host synchronisation until
    `stop`), the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._t0 = 0.0
        self._e0 = self._e1 = None

    def start(self) -> None:
        if self.device.type == "cuda":
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e1 = torch.cuda.Event(enable_timing=True)
            self._e0.record()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds between start() and now, once the device has finished the work queued in between."""
        if self.device.type == "cuda":
            self._e1.record()
            self._e1.synchronize()
            return self._e0.elapsed_time(self._e1) / 1000.0
        return time.perf_counter() - self._t0


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory over a window. GPU: torch.cuda.max_memory_allocated (peak reset at start). CPU: the peak
    resident set size of the whole process, sampled every 5 ms by a thread (freed memory stays resident in
    the heap, so it covers what earlier rows and sections left behind; the first row's figure minus
    `baseline`, the RSS before the model was built, is in the JSON as `rss_delta_gib`)."""

    def __init__(self, device: torch.device, baseline: int = 0):
        self.device = device
        self.baseline = baseline
        self._peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(0.005)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def stop(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30,
                    "mem_kind": "torch.cuda.max_memory_allocated during the timed steps"}
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        return {"peak_mem_gib": self._peak / 2**30, "rss_delta_gib": (self._peak - self.baseline) / 2**30,
                "mem_kind": "process peak RSS during the timed steps"}


def free_memory(device: torch.device) -> None:
    """Collect garbage and empty the CUDA cache. (On CPU, freed memory is deliberately not handed back to the
    OS: in a VM whose memory is populated lazily, touching fresh pages costs seconds per step.)"""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def sync_watch(device: torch.device) -> Iterator[list]:
    """Record host<->device synchronisations inside the block (torch.cuda.set_sync_debug_mode('warn')) as
    'site (function) via op-site' strings, where site is the innermost frame in our code (pe_lightning/,
    callbacks/, bench/) and op-site the frame that ran the synchronising op. A no-op list on CPU."""
    found: list[str] = []
    if device.type != "cuda":
        yield found
        return

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower():
            return
        stack = traceback.extract_stack()[:-1]
        ours = None
        for marker in ("/pe_lightning/", "/callbacks/", "/bench/"):
            ours = next((f for f in reversed(stack) if marker in f.filename), None)
            if ours is not None:
                break
        where = f"{_short(ours.filename)}:{ours.lineno} ({ours.name})" if ours is not None else "?"
        found.append(f"{where} via {_short(filename)}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _short(path: str) -> str:
    for marker in ("site-packages/", "pe-lightning/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def autocast(device: torch.device, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def compile_counters() -> dict:
    """torch._dynamo's counters: graphs compiled and graph breaks so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover
        return {}
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "break_reasons": sorted(counters["graph_break"])[:5]}


# ----------------------------------------------------------------------------------------------------------
# synthetic data
def synthetic_batch(batch: int, resolution: int, context_length: int, device: torch.device, seed: int = 0,
                    vocab: int = 49408) -> dict:
    """An image-text batch as the data module yields it: images float [B,3,S,S] in the normalised range,
    token ids [B, ctx] = SOT, random words, EOT (the highest id), zero padding."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, resolution, resolution, generator=g).clamp_(-1, 1)
    sot, eot = vocab - 2, vocab - 1
    tokens = torch.zeros(batch, context_length, dtype=torch.long)
    lengths = torch.randint(4, context_length - 1, (batch,), generator=g)
    words = torch.randint(1, sot, (batch, context_length), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = sot
        tokens[i, 1:n] = words[i, 1:n]
        tokens[i, n] = eot
    return {"image": images.to(device), "text": tokens.to(device)}


# ----------------------------------------------------------------------------------------------------------
# running a measured loop
def time_loop(step: Callable[[int], Any], device: torch.device, warmup: int, steps: int,
              baseline_rss: int = 0, watch_syncs: int = 2) -> dict:
    """Run `step(i)` `warmup` times (the first timed alone: compile), then `steps` times timed as one window
    (CUDA events; no host synchronisation inside). Then `watch_syncs` more steps with the sync detector on."""
    out: dict[str, Any] = {}
    synchronize(device)
    t0 = time.perf_counter()
    step(0)
    synchronize(device)
    out["first_step_s"] = time.perf_counter() - t0
    for i in range(1, warmup):
        step(i)
    synchronize(device)
    out["warmup_s"] = time.perf_counter() - t0
    graphs_before = compile_counters().get("unique_graphs", 0)
    mem = PeakMemory(device, baseline_rss)
    mem.start()
    window = Window(device)
    window.start()
    for i in range(warmup, warmup + steps):
        step(i)
    elapsed = window.stop()
    out.update(mem.stop())
    out["timed_steps"] = steps
    out["step_s"] = elapsed / steps
    out["recompiles_in_timed_steps"] = compile_counters().get("unique_graphs", 0) - graphs_before
    if watch_syncs and device.type == "cuda":
        with sync_watch(device) as found:
            for i in range(warmup + steps, warmup + steps + watch_syncs):
                step(i)
        synchronize(device)
        out["host_syncs_per_step"] = len(found) / watch_syncs
        out["host_sync_sites"] = sorted(set(found))[:8]
    return out


def error_record(err: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:]}


def steps_table(rows: list[dict], columns: list[str], cells: Callable[[dict], list[str]]) -> list[str]:
    """A report's Markdown table of timed steps: the step's name, then `cells(row)` under `columns`, then the
    time of one step, of the first step (compilation, allocation) and the peak memory; a failed row says why."""
    columns = [*columns, "step ms", "1st step s", "peak mem GiB"]
    lines = ["| step | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('name')} | failed: {str(r.get('error', ''))[:60]} |" + " |" * (len(columns) - 1))
            continue
        timing = [f"{r['step_ms']:,.1f}", f"{r.get('first_step_s', 0):.1f}", f"{r.get('peak_mem_gib', 0):.2f}"]
        lines.append(f"| {r['name']} | " + " | ".join([*cells(r), *timing]) + " |")
    return lines
