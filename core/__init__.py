"""The types every package shares, without torch, pydicom or SQLAlchemy.

- ``core.errors``: the project's exceptions (one base class, a subclass per kind of failure);
- ``core.case``: the planning case (CT in HU on its grid, masks by role, prescription, patient
  position, the DICOM references of the inputs);
- ``core.machine``: the linac, MLC and arc (Millennium 120, TrueBeam-like limits, the BEV grid);
- ``core.request``: what to plan (the CT series and RT Structure Set chosen, as files and UIDs) and
  the one rule that chooses them.

Imports flow ``core <- sequencing <- pipeline <- appliance`` and ``core <- storage``; this package
imports only numpy.
"""
