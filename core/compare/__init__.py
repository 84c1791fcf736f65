"""`vlbridge compare`: train (or reuse) N assemblies on one dataset with one budget and seed policy,
evaluate them the same way, and write one table and one plot. `vlbridge demo` is one configuration
of it, on the offline world. Importing this package imports no torch."""

from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec

__all__ = ["CompareConfig", "EvalSet", "RunSpec"]
