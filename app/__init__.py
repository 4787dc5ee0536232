"""Flower entry points (ServerApp, ClientApp) and the task code both sides share."""
