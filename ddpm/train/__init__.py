"""Training: the options, the configured loss, the training state, the monitor and the loop."""
