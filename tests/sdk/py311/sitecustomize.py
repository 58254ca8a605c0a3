"""Loaded only when the SDK test runs on Python < 3.12.

leap0 declares Python >= 3.10 but types `network_policy` with
`typing.TypedDict`, which pydantic refuses to build a schema for before 3.12.
Aliasing it to `typing_extensions.TypedDict` (the same class on 3.12+) lets the
unmodified SDK run on Debian 12's Python 3.11.
"""

import sys

if sys.version_info < (3, 12):
    import typing

    import typing_extensions

    typing.TypedDict = typing_extensions.TypedDict
