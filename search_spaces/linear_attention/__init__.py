"""Linear-attention architecture search: genome, Flax model, MQAR and byte-LM tasks, checks."""
