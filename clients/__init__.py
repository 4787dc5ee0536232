"""Client side: Flower NumPyClients and the PyTorch training they wrap."""
