"""The experiments behind the course's chapters (``python -m course <chapter> --help``).

Each module holds the functions a chapter's notebook calls, plus ``add_parser`` and ``main``
for its command, which runs the same experiment at any scale and on any device; ``common``
holds what they share. The library (``minimoe``) knows nothing of this package.
"""
