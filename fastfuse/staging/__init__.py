"""Moving a checkpoint into another memory (a CUDA device) with every byte read and moved once:
``transfer_plan`` (pure: where each result lives in one allocation, which file bytes go where,
which fusion moves follow) and ``pipeline`` (parallel reads into bounded reused staging buffers,
uploads overlapped with the reads, then the moves), for any :class:`~fastfuse.staging.pipeline.Destination`.
"""
