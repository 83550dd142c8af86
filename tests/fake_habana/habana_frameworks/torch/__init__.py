"""The bridge's package: records what the script did with it."""

import os

CALLS: list[tuple[str, dict]] = []  # (kernel, its arguments) in call order
LAZY_MODE_AT_IMPORT = os.environ.get("PT_HPU_LAZY_MODE")  # the real bridge reads it once, at import


def record(name: str, **arguments) -> None:
    CALLS.append((name, arguments))
