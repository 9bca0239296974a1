"""Training sets (image folders, class folders, CIFAR-10) and the deterministic batch stream."""
