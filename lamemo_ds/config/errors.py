"""The one exception type of a user input that cannot work (besides a bad config value).

`lamemo` prints it as one line, `lamemo COMMAND: error: MESSAGE`, and exits 2 (cli.py); the
message names the bad value and the fix. It is raised before anything is written or started.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # the exit code of a config error, a UserError or a refused checkpoint


class UserError(ValueError):
    """A path, flag or combination of inputs the command cannot use; the message says why and
    what to do instead."""
