"""Benchmarks: scripts that print side-by-side measurements. Run each from the repository root
as a module, e.g. `python -m benchmarks.secure_aggregation` (README says what each measures)."""
