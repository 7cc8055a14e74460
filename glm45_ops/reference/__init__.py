"""Pure-torch references: the numerical definition of every op, and its CPU kernel."""
