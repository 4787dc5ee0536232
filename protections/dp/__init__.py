"""Differential privacy: client-level DP (server_fixed, client_fixed, adaptive), local DP and
DP-SGD, with their accountant and private sampling."""
