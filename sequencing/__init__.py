"""Leaf sequencing (Numba) and deliverability checks on the machine model of ``core.machine``.

Never imports torch or ``pipeline``."""
