"""Leaf sequencing (Numba) and the MLC/linac machine model. Never imports torch."""
