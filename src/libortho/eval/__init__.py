"""Evaluation: perplexity, the experiments, benchmarks."""
