"""PyTorch planning: geometry, BEV projection, dose engines, networks, optimizer, synthetic cases.

This package never imports pydicom, pynetdicom, SQLAlchemy or ``appliance``; it takes arrays
and plain settings and returns fluence maps and doses. The types it shares with the other
packages (errors, the Case, the machine model) live in the torch-free ``core``.
"""
