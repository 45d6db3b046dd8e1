"""Evaluation of chain-of-thought compression: benchmarks, generation through the rollout workers, statistics."""
