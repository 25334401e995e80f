"""The one base class of the errors a user can cause and fix.

A `UserError` (bad path, option value, weights file, dataset, cache) carries one short message
that names the input and the fix. The `spot-fast` command prints that message and exits with
code 2, without a traceback; Python callers catch it like any exception. Library code raises a
subclass where the error enters (`DatasetError`, `WeightsError`, `CheckpointMismatch`, ...).
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the input and the fix."""
