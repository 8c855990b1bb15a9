"""Data: sources (random access), host-side transforms, and grain pipelines.

``toppax.input_pipeline`` is the import path the rest of toppax uses; it re-exports the
classification API from here. ``toppax.data.segmentation`` holds the segmentation sources and
the mmseg-style pipelines.
"""
