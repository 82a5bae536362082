"""A quiet start: the third-party lines a user can do nothing about, each dropped by its own narrow filter.

Each entry names the logger (or warning) and the start of the one message it drops; everything else those
libraries say still shows. What they are:
- Lightning's advert for its cloud logger, printed at every Trainer start;
- Lightning's "GPU available: ... / TPU available: ..." device inventory (the run's own lines say where
  it trains; a GPU left unused is still a warning of its own);
- Lightning's two "Restor... states from the checkpoint" lines: ours ("resuming stage X from ...") says it;
- torch's "No CUDA runtime is found, using CUDA_HOME=..." when a CPU-only machine has a CUDA folder (torch
  logs it when it loads its C++ extension helpers, e.g. while compiling the LAMB update);
- torch's FutureWarning that Lightning's own pytree helper uses `LeafSpec` (Lightning's to change, not ours).
"""

from __future__ import annotations

import logging
import warnings

DROPPED_LINES = {
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud logging", "GPU available:",
                                              "TPU available:", "Restoring states from the checkpoint path at",
                                              "Restored all states from the checkpoint at"),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_start() -> None:
    """Install the filters (once per process)."""
    for name, starts in DROPPED_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
