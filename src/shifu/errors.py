"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """Something the user can fix: a bad config, a missing file, a missing key. Exits with code 2."""

    exit_code = 2


class TeacherError(UserError):
    """The teacher refused in a way retrying cannot fix (bad key, no balance, unknown model). Exits with code 3."""

    exit_code = 3
