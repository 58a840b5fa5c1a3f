"""See and shape the experts: `moelm experts` (what each MoE layer's experts do on a data file: record.py, the
report and its plots: report.py, plots.py) and `moelm prune` (fewer experts per layer, from a report: prune.py),
applied to an unchanged model."""
