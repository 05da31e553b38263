"""The model layer: `ArborConfig`, the decoder as a function (`arbor.model.modeling`), attention
backends and the checks on checkpoint files.

It imports nothing from `arbor.growth`, `arbor.training` or `arbor.cli`: growth, freezing and
LoRA are added to the model one layer up, in `arbor.growth.growable.ArborForCausalLM`, the
class ``arbor.ArborForCausalLM`` names.
"""
