"""One folder per protection (or update transform): its server half (a strategy wrapper),
its client half, and the wire format they share. Imports only `core` and `protections.base`."""
