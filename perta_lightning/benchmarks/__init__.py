"""The benchmarks: each a folder implementing :class:`~perta_lightning.benchmarks.base.Benchmark`, all listed by
name in :mod:`perta_lightning.benchmarks.registry`."""
