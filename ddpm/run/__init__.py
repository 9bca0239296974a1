"""A run folder: its paths, lock and write errors, its typed config.json, checkpoints, and loading a run to sample from."""
