"""Names, shapes and options: the fusion rules (pure data), the options, and the planner that
turns key names and shapes into a :class:`~fastfuse.planning.planner.Plan` (or an error).
Planning never sees bytes, files or kernels.
"""
