"""PyTorch planning: geometry, BEV projection, dose engines, networks, optimizer, synthetic cases.

This package never imports pydicom, pynetdicom, SQLAlchemy or ``appliance``; it takes arrays
and plain settings and returns fluence maps and doses. Importing the package itself does not
import torch (``pipeline.errors`` and ``pipeline.case`` are torch-free so that ``sequencing``
and the DICOM edges can use them).
"""
