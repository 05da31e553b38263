"""The training layer: the `Trainer` (`arbor.training.trainer`), data and tokenizers, training
checkpoints, the transformers `GrowthCallback`, FLOP counting, pre-flight checks and plots.

It builds on `arbor.growth`, `arbor.model` and `arbor.plugins`; only `arbor.cli` builds on it.
"""
