"""Homomorphic secure aggregation (BFV through TenSEAL): keys and payload format, the server's
encrypted sum, and the client's encryption and decryption."""
