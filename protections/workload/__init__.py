"""Capability-scaled local work: the client scales its steps, the server records them."""
