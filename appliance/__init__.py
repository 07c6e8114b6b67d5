"""The DICOM node: networking, scheduling, worker, CLI, DICOM input and output."""

__version__ = "0.1.0"
