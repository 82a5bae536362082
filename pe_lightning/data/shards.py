"""Shard lists, dataset sizes and raw tar reading (webdataset conventions).

- `expand_shards(urls)`: a path, a directory (its `*.tar`), a glob, a brace list (`/d/{00000..00331}.tar`),
  or several of these joined by `::` (webdataset's separator). Local shards must exist (checked up front);
  `pipe:` and `scheme://` URLs are passed through to webdataset's `gopen` unchecked.
- `discover_size(shards, explicit)`: samples in a source, from (1) the recipe key `size`, (2) `sizes.json`
  beside the shards ({shard file name: count}, webdataset's convention), (3) img2dataset / video2dataset's
  per-shard `<shard>_stats.json` (`successes`). Never guessed.
- `iter_tar_samples(url, on_error)`: raw samples {"__key__", "__url__", ext: bytes} grouped by key the way
  webdataset does (`base_plus_ext`: the key is everything before the first dot of the file name, so
  `0001.mask.png` has extension `mask.png`). A broken archive never raises: the reader reports
  `tar_error` / `missing_shard` through `on_error` and stops that shard.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import braceexpand

from pe_lightning.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "SkipSample",
    "ResolvedSource",
    "expand_shards",
    "discover_size",
    "resolve_sources",
    "iter_tar_samples",
    "is_remote",
]


class DataError(UserError, RuntimeError):
    """A data problem found at start (missing shard, empty pattern, unknown size, no usable samples)."""


class SkipSample(Exception):
    """Raised by a decoder for a sample that must be skipped; `reason` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_shards(urls: str | Sequence[str], what: str = "urls") -> list[str]:
    """Expand a shard spec into a list of shard paths; raise `DataError` naming the path and the fix."""
    if isinstance(urls, (list, tuple)):
        parts = [str(u) for u in urls]
    else:
        if urls is None or str(urls).strip() in ("", "???"):
            raise DataError(f"{what}: no shards given (got {urls!r}); set it to a path, glob or brace list "
                            "such as /data/cc3m/{00000..00331}.tar")
        parts = str(urls).split("::")
    out: list[str] = []
    for part in parts:
        part = os.path.expandvars(os.path.expanduser(part.strip()))
        if not part:
            continue
        for url in braceexpand.braceexpand(part):
            if is_remote(url):
                out.append(url)
            elif os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar")))
                if not found:
                    raise DataError(f"{what}: directory {url} holds no *.tar shards; point it at the shards "
                                    f"(e.g. {url}/{{00000..00099}}.tar) or generate/download them first")
                out.extend(found)
            elif _GLOB_CHARS.search(url):
                found = sorted(glob.glob(url))
                if not found:
                    raise DataError(f"{what}: pattern {url!r} matched no files; check the path (relative paths "
                                    f"are taken from {os.getcwd()}) or generate/download the shards first")
                out.extend(found)
            else:
                out.append(url)
    if not out:
        raise DataError(f"{what}: {urls!r} expands to no shards")
    missing = [u for u in out if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{what}: {len(missing)} of {len(out)} shards not found: {', '.join(missing[:3])}{more}; "
                        "fix the path / brace range, or generate/download the missing shards")
    return out


def _shard_stem(url: str) -> str:
    name = os.path.basename(url)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def discover_size(shards: Sequence[str], explicit: Optional[int] = None, what: str = "source") -> tuple[int, str]:
    """(samples, how it was found). Raises `DataError` naming the three ways to provide it."""
    if explicit is not None:
        if int(explicit) <= 0:
            raise DataError(f"{what}: size must be > 0, got {explicit}")
        return int(explicit), "recipe key `size`"
    sizes_cache: dict[str, Optional[dict]] = {}
    total, unresolved, hows = 0, [], set()
    for url in shards:
        d = os.path.dirname(url) if not is_remote(url) else None
        n = None
        if d is not None:
            if d not in sizes_cache:
                p = os.path.join(d, "sizes.json")
                try:
                    with open(p) as f:
                        sizes_cache[d] = json.load(f)
                except FileNotFoundError:
                    sizes_cache[d] = None
                except (OSError, ValueError) as e:
                    raise DataError(f"{what}: cannot read {p}: {e}") from e
            table = sizes_cache[d]
            if table is not None:
                for k in (os.path.basename(url), url, os.path.relpath(url, d)):
                    if k in table:
                        n, _ = int(table[k]), hows.add("sizes.json")
                        break
            if n is None:
                p = os.path.join(d, _shard_stem(url) + "_stats.json")
                if os.path.isfile(p):
                    try:
                        with open(p) as f:
                            n = int(json.load(f)["successes"])
                        hows.add("*_stats.json")
                    except (OSError, ValueError, KeyError, TypeError) as e:
                        raise DataError(f"{what}: {p} has no readable 'successes' count: {e}") from e
        if n is None:
            unresolved.append(url)
        else:
            total += n
    if unresolved:
        where = os.path.dirname(unresolved[0]) or "."
        raise DataError(
            f"{what}: cannot tell how many samples {len(unresolved)} of {len(shards)} shards hold "
            f"(first: {unresolved[0]}). Provide one of: (1) sizes.json in {where} mapping shard file name -> "
            "sample count (webdataset convention), (2) img2dataset/video2dataset per-shard <shard>_stats.json "
            "files with 'successes', or (3) the recipe key `size` on this source (e.g. data.train.0.size=N)")
    if total <= 0:
        raise DataError(f"{what}: sizes add up to {total} samples; nothing to train on")
    return total, " + ".join(sorted(hows))


@dataclass
class ResolvedSource:
    """One source after expansion: its shards, mixing weight and size (samples per pass)."""

    name: str
    shards: list[str]
    weight: float
    size: int


def resolve_sources(sources: Sequence[Any], what: str = "data.train") -> list[ResolvedSource]:
    """SourceConfig-like objects (attributes urls/weight/size) -> ResolvedSource, with all checks done."""
    out = []
    if not sources:
        raise DataError(f"{what}: no sources given")
    for i, s in enumerate(sources):
        label = f"{what}[{i}] ({s.urls})"
        shards = expand_shards(s.urls, what=label)
        w = float(getattr(s, "weight", 1.0))
        if not w > 0:
            raise DataError(f"{label}: weight must be > 0, got {w}")
        size, how = discover_size(shards, getattr(s, "size", None), what=label)
        log.info("%s: %d shards, %d samples (%s), weight %g", label, len(shards), size, how, w)
        out.append(ResolvedSource(name=str(s.urls), shards=shards, weight=w, size=size))
    return out


def _base_plus_ext(path: str) -> tuple[Optional[str], Optional[str]]:
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", path)
    if not m:
        return None, None
    return m.group(1), m.group(2)


OnError = Callable[[str, str], None]


def iter_tar_samples(url: str, on_error: OnError) -> Iterator[dict]:
    """Raw samples of one shard, grouped by key. Errors go to `on_error(reason, detail)`, never raised."""
    remote = is_remote(url)
    try:
        if remote:
            import webdataset as wds

            f = wds.gopen(url, "rb")
        else:
            f = open(url, "rb")
    except OSError as e:
        on_error("missing_shard", f"{url}: {e}")
        return
    current: Optional[dict] = None
    try:
        try:
            tf = tarfile.open(fileobj=f, mode="r|*")
            for ti in tf:
                if not ti.isreg():
                    continue
                name = ti.name
                base = os.path.basename(name)
                if base.startswith("__") and base.endswith("__"):
                    continue
                key, ext = _base_plus_ext(name)
                if key is None:
                    continue
                data = tf.extractfile(ti).read()
                tf.members = []  # stream mode: do not accumulate TarInfo objects
                ext = ext.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if ext in current:  # duplicate member: keep the first, like a skipped broken member
                    on_error("tar_error", f"{url}: duplicate member {name}")
                    continue
                current[ext] = data
            clean = True
            if not remote:
                # tarfile ends silently at a truncated or corrupt header; a valid archive ends in zero blocks
                fd = os.open(url, os.O_RDONLY)
                try:
                    block = os.pread(fd, 512, tf.offset)
                finally:
                    os.close(fd)
                clean = len(block) == 512 and block == bytes(512)
            if not clean:
                current = None  # the last sample may be incomplete
                on_error("tar_error", f"{url}: archive ends in a truncated or corrupt header at byte {tf.offset}")
        except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as e:
            current = None
            on_error("tar_error", f"{url}: {type(e).__name__}: {e}")
        if current is not None:
            yield current
    finally:
        f.close()


def read_lines(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]
