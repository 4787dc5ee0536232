"""Test support (processes, Flower homes, ports): not part of the shipped packages."""
