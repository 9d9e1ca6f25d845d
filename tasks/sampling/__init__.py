"""Sampling from a model: the backends (one module each, chosen by `backend` in params) and the
seeded, resumable batch loop every stage that samples uses (tasks.sampling.generate)."""
