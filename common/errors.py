"""The one kind of error a user can fix: `UserError`. The `tidal` command prints it as one line
(`tidal: <kind>: <message>`, exit code 2, no traceback; `--debug` adds it). Its subclasses say
what was wrong: a config value (`ConfigError`), a data row (`DataError`), labels and feedback
folders (`FeedbackError`), a check before Ray starts (`PreflightError`). Everything else is
tidal's own fault and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (config, data, files, arguments); the message names it and the fix."""

    kind = "error"  # what the CLI prints before the message
