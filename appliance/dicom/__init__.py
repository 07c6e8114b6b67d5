"""The appliance's DICOM objects, one module per object (as highdicom lays out an IOD), each with
its enumerated values, its writer or reader, and round-trip tests.

==========================  ==========================================================================
module                      holds
==========================  ==========================================================================
``common``                  DS formatting, patient/study copy, Image Plane and Image Pixel modules,
                            value-length checks, atomic saving
``uids``                    UID checks (received and written) and new UIDs
``case_loader``             a folder of CT + RT Structure Set -> ``core.case.Case`` (scan, choice, checks)
``ct``                      CT series: geometry on the canonical grid, volume in HU, patient position;
                            the slice writer
``ct_pixels``               transfer syntaxes a CT is accepted in; one slice's pixels decoded to HU
``rtstruct``                RT Structure Set enums and writer; its referenced frames, series, images
                            and contour points read back
``structures``              the ROIs that map to planning roles, rasterised (PTV and body checks)
``rasterise``               closed planar polygons -> boolean masks (even-odd rule)
``rtplan``                  RT Plan writer (plan-level enums, prescription, fraction scheme)
``rtplan_beam``             the RT Plan's VMAT beam: enums, input checks, control-point encoding
``rtplan_reader``           RT Plan reader (ours or a clinical export) into plain arrays
``rtdose``                  RT Dose enums, writer and reader
==========================  ==========================================================================

Nothing is re-exported here: import from the module that owns a name.
"""
