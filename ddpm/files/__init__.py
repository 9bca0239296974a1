"""Files: atomic writes with normal permissions, and image decoding and folder scanning shared by training data and scoring."""
