"""The one base class of the errors a user can cause and fix (a typo, a missing file, a stage run too early).

Every module's user-facing error subclasses `UserError` (RecipeError, PipelineError, CallbackError,
CheckpointError, DataError, ...). The command line prints these as one clear line (set PE_DEBUG=1 for the
traceback); anything else is a bug and keeps its traceback. This module imports nothing of the project, so
every module can import it.
"""


class UserError(Exception):
    """A problem in the user's input (recipe, paths, data, weights) with a message that names the fix."""


# FileNotFoundError from a path the user gave is also reported as one line.
USER_ERRORS = (UserError, FileNotFoundError)
