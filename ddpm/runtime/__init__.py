"""Where and how a command runs: the device, precision and compile policy, torchrun processes and the rank-0 protocol, FLOP and peak accounting."""
