"""Output: result tables as files (Parquet/CSV with metadata), resumable
sweeps, and figures."""

from . import plot, sweep, tables

__all__ = ["plot", "sweep", "tables"]
