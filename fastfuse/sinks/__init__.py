"""Bytes out: atomic writes, the safetensors file writer (``fuse_file``), ``verify`` and
``unfuse`` of what it wrote.
"""
