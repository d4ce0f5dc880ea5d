"""Evaluation: batched generation, scorers and continual-learning metrics."""
