"""The errors a user can cause and fix (a typo, a missing file, a stage run too early).

The command line prints these as one clear line (set PE_DEBUG=1 for the traceback); anything else is a bug
and keeps its traceback.
"""

from pe_lightning.callback_loader import CallbackError
from pe_lightning.config import RecipeError
from pe_lightning.data.shards import DataError
from pe_lightning.models.checkpoint import CheckpointError
from pe_lightning.pipeline import PipelineError

USER_ERRORS = (RecipeError, PipelineError, CallbackError, CheckpointError, DataError, FileNotFoundError)
