"""Bytes in: one reader per file format behind one :class:`~fastfuse.formats.checkpoint.Checkpoint`.

Readers parse and validate (safetensors headers, the zip container of torch archives and the
torch object model in it, their restricted pickles) and hand out zero-copy arrays of a private
map. They know nothing of fusion: no key rules, no plans, no kernels.
"""
