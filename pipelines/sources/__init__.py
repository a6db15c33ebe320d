"""Readers of real scans for ingest: NIfTI, DICOM series (de-identified) and fastMRI HDF5.

See :mod:`pipelines.sources.base` for what a reader provides. Readers never import Ray, Zarr or
MLflow: they turn files into canonical volumes read slab by slab, or quarantine them with a reason.
"""
