"""Words for the lines users read."""


def plural(n, word):
    """'1 class', '3 classes', '2 files': a count and its noun."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {word}es" if word.endswith(("s", "sh", "ch", "x")) else f"{n} {word}s"
