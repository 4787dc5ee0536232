"""Server side: Flower strategies, the wrappers stacked on them, and the factory."""
