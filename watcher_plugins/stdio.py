"""Keeping a worker process's stdout for its own protocol lines."""

from __future__ import annotations

import os
import sys
from typing import IO, BinaryIO, Literal, TextIO, overload


@overload
def claim_stdout(binary: Literal[False] = False) -> TextIO: ...
@overload
def claim_stdout(binary: Literal[True]) -> BinaryIO: ...


def claim_stdout(binary: bool = False) -> IO:
    """Keep a private copy of file descriptor 1 for our own lines and point fd 1 at stderr, so that
    whatever a library prints (Python's print, or native code such as CatBoost's and LightGBM's C++
    writing to fd 1) lands on stderr and never mixes into the protocol. Returns the private stream:
    unbuffered bytes, or line-buffered UTF-8 text."""
    sys.stdout.flush()
    private_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if binary:
        return os.fdopen(private_fd, "wb", buffering=0)
    return os.fdopen(private_fd, "w", buffering=1, encoding="utf-8")
