"""Client assembly: the Flower NumPyClient every SuperNode runs and the PyTorch training
(single process or DDP) it wraps; each protection's client half lives in protections/."""
