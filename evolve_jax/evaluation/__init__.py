"""Evaluation plumbing shared by search spaces: population batching across devices."""
