"""The DSpark drafter service: the draft model (parallel backbone, sequential Markov head, confidence
head), its DeepSpec-compatible checkpoint format, and the per-session draft engine that turns cached
target features into proposals."""
