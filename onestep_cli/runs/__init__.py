"""The run directory: its files, its checkpoints and its lock, and the networks of a run rebuilt from its config."""
