"""Test support shared by the test modules (and, for processes, the benchmarks): not part of
the shipped packages. Test modules import helpers from here, never from each other or from
conftest.py (which holds only fixtures)."""
