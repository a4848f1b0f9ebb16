"""Output: result tables as files (Parquet/CSV with metadata), resumable
sweeps, and figures (``edge_plot``: edge circuits and faithfulness curves)."""

from . import edge_plot, plot, sweep, tables

__all__ = ["edge_plot", "plot", "sweep", "tables"]
