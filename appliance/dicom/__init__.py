"""The appliance's DICOM objects, one module per object (as highdicom lays out an IOD), each with
its enumerated values, its writer or reader, and round-trip tests.

==========================  ==========================================================================
module                      holds
==========================  ==========================================================================
``common``                  DS formatting, patient/study copy, value-length checks, atomic saving
``uids``                    UID checks (received and written) and new UIDs
``rtplan``                  RT Plan writer (plan-level enums, prescription, fraction scheme)
``rtplan_beam``             the RT Plan's VMAT beam: enums, input checks, control-point encoding
``rtplan_reader``           RT Plan reader (ours or a clinical export) into plain arrays
``rtdose``                  RT Dose enums, writer and reader
==========================  ==========================================================================

Nothing is re-exported here: import from the module that owns a name.
"""
