"""Pure-torch references: the numerical definition of every op, and its CPU kernel."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints: the number of ``b``-sized blocks (scale blocks, tiles) covering ``a``."""
    return -(-a // b)
