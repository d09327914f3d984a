"""Experiments shared by the notebooks and the command line (``python -m minimoe ...``).

Each module holds the functions a chapter's notebook calls, plus ``add_parser`` and ``main``
for its command, which runs the same experiment at any scale and on any device.
"""
