"""The two memories: the experiment history (TensorStore) and the cognition base."""
