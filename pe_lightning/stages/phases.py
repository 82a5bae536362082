"""Progressive resolution and batch size as a schedule over samples seen (PE_REFERENCE.md s.6).

PE pretrains at low resolution first and raises it in steps; the batch grows too. The paper's ladders:

- B/14-L/14 (patch 14): 98 -> 154 -> 224 -> 336 (98/154/224/336 = 7/11/16/24 patches per side); the ablation
  used batch 32K -> 64K.
- G/14: 98 -> 154 -> 224 -> 336 -> 448, global batch 131K, 86B samples seen (58B for B/L).

Per-phase sample counts are **not published**. An illustrative schedule (numbers are our choice):

    >>> total = 58_000_000_000
    >>> schedule = PhaseSchedule([
    ...     Phase(until_samples=20_000_000_000, resolution=98, batch_size=65_536),
    ...     Phase(until_samples=35_000_000_000, resolution=154, batch_size=65_536),
    ...     Phase(until_samples=50_000_000_000, resolution=224, batch_size=65_536),
    ...     Phase(until_samples=None, resolution=336, batch_size=65_536),  # None: until total_samples
    ... ], total_samples=total, patch_size=14, chunk_size=256)
    >>> schedule.at(25_000_000_000)
    (1, Phase(until_samples=35000000000, resolution=154, batch_size=65536))

Conventions:
- Samples seen are **global** (summed over ranks), like the lr schedule, and `Phase.batch_size` is the
  **global** batch (what the paper reports, portable across GPU counts); `local_batch_size(world_size)`
  gives the per-process batch. With `world_size` given, the schedule checks that every phase's batch splits
  into whole chunks on every rank.
- Phase i is active for samples_seen in [until_{i-1}, until_i) (until_{-1} = 0). The stage picks the phase
  from the counter at the *start* of a step, so a step can run past a boundary by at most one batch.
  At or past total_samples, `at` returns the last phase.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional

__all__ = ["Phase", "PhaseSchedule"]


@dataclass(frozen=True)
class Phase:
    """Train at `resolution` (pixels per side) with global batch `batch_size` until `until_samples`
    samples have been seen. `until_samples=None` on the last phase means "until total_samples"."""

    until_samples: Optional[int]
    resolution: int
    batch_size: int

    def local_batch_size(self, world_size: int = 1) -> int:
        """Per-process batch size. Raises if the global batch does not split evenly over `world_size`."""
        if world_size < 1 or self.batch_size % world_size:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly over world_size {world_size}"
            )
        return self.batch_size // world_size


class PhaseSchedule:
    """An ordered list of `Phase`s covering [0, total_samples), validated at construction.

    Args:
        phases: `Phase`s (a recipe's `train.phases` entries, built by the stage).
        total_samples: samples seen at the end of the stage.
        patch_size: if given, every resolution must be a multiple of it.
        chunk_size: if given, every batch size must be a multiple of chunk_size * world_size (the loader
            builds batches from fixed-size chunks on each rank).
        world_size: number of processes the global batch is split over (default 1).

    Raises ValueError naming the offending phase for: no phases, non-positive resolution/batch, until not
    strictly increasing, a phase other than the last with until=None, the last phase ending before or after
    total_samples, a resolution not a multiple of the patch size, a batch not a multiple of the chunk size.
    """

    def __init__(
        self,
        phases: Iterable[Phase],
        total_samples: int,
        patch_size: Optional[int] = None,
        chunk_size: Optional[int] = None,
        world_size: int = 1,
    ) -> None:
        total_samples = int(total_samples)
        if total_samples <= 0:
            raise ValueError(f"PhaseSchedule: total_samples must be > 0, got {total_samples}")
        items = list(phases)
        bad = [p for p in items if not isinstance(p, Phase)]
        if bad:
            raise TypeError(f"PhaseSchedule takes Phase objects, got {bad[0]!r}")
        if not items:
            raise ValueError("PhaseSchedule: at least one phase is required")
        if world_size < 1:
            raise ValueError(f"PhaseSchedule: world_size must be >= 1, got {world_size}")
        n = len(items)
        fixed: list[Phase] = []
        prev = 0
        for i, ph in enumerate(items):
            where = f"phase {i} ({ph})"
            last = i == n - 1
            until = ph.until_samples
            if until is None:
                if not last:
                    raise ValueError(f"{where}: until_samples=None is only allowed on the last phase")
                until = total_samples
            until = int(until)
            if until <= prev:
                raise ValueError(
                    f"{where}: until_samples must be greater than the previous phase's ({prev}); "
                    "phases must be sorted and non-empty"
                )
            if last and until != total_samples:
                raise ValueError(
                    f"{where}: the last phase must end at total_samples={total_samples} (got {until}); "
                    "set its until_samples to None to fill up to the total"
                )
            if not last and until >= total_samples:
                raise ValueError(
                    f"{where}: ends at {until} >= total_samples={total_samples}, leaving later phases empty"
                )
            if ph.resolution <= 0:
                raise ValueError(f"{where}: resolution must be > 0")
            if ph.batch_size <= 0:
                raise ValueError(f"{where}: batch_size must be > 0")
            if patch_size is not None and ph.resolution % patch_size:
                raise ValueError(
                    f"{where}: resolution {ph.resolution} is not a multiple of the patch size {patch_size}"
                )
            unit = (chunk_size or 1) * world_size
            if ph.batch_size % unit:
                what = f"chunk size {chunk_size}" if chunk_size else "1"
                raise ValueError(
                    f"{where}: batch_size {ph.batch_size} is not a multiple of {what} x world size "
                    f"{world_size} = {unit}"
                )
            fixed.append(replace(ph, until_samples=until))
            prev = until
        self.phases: tuple[Phase, ...] = tuple(fixed)
        self.total_samples = total_samples
        self.patch_size, self.chunk_size, self.world_size = patch_size, chunk_size, world_size
        self._bounds = [p.until_samples for p in self.phases]

    def at(self, samples_seen: int) -> tuple[int, Phase]:
        """(index, phase) active after `samples_seen` global samples; the last phase at or past the total."""
        if samples_seen < 0:
            raise ValueError(f"samples_seen must be >= 0, got {samples_seen}")
        i = min(bisect.bisect_right(self._bounds, samples_seen), len(self.phases) - 1)
        return i, self.phases[i]

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The samples-seen counts at which each phase ends (the last equals total_samples)."""
        return tuple(self._bounds)

    @property
    def steps(self) -> int:
        """Global batches from 0 to total_samples (a phase's last batch may run past its end: the next phase
        then starts there), as the stage counts them."""
        seen = steps = 0
        for until, phase in zip(self._bounds, self.phases):
            n = max(0, -(-(until - seen) // phase.batch_size))  # ceil
            seen, steps = seen + n * phase.batch_size, steps + n
        return steps

    @property
    def max_resolution(self) -> int:
        return max(p.resolution for p in self.phases)

    def __len__(self) -> int:
        return len(self.phases)

    def __iter__(self) -> Iterator[Phase]:
        return iter(self.phases)

    def __getitem__(self, i: int) -> Phase:
        return self.phases[i]

    def __repr__(self) -> str:
        return f"PhaseSchedule({list(self.phases)!r}, total_samples={self.total_samples})"
