"""The serving engine: one thread owns the model; requests join and leave between decode steps."""
