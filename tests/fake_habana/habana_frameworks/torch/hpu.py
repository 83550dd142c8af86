def is_available() -> bool:
    return True


def synchronize() -> None:
    pass


def max_memory_allocated() -> int:
    return 0
