"""Server-side checks of plaintext updates (shape, finiteness) before aggregation."""
