"""Bottom layer: the task code and wire formats every other layer imports (config schema,
data, models, training loop, evaluation, the results contract). Imports nothing above it."""
