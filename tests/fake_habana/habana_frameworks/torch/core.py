from habana_frameworks.torch import record


def mark_step() -> None:
    record("mark_step")
