"""Plain-PyTorch reference implementations: readable ground truth and the fallback backend."""
