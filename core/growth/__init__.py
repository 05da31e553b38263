"""The growth layer: everything that changes a model's parameters while it trains.

- `arbor.growth.operators`: the exact resize operators (``insert_layers``, ``widen_mlp``,
  ``add_heads``, ``widen_hidden``);
- `arbor.growth.step`: `GrowthStep`, the one transaction every growth goes through;
- `arbor.growth.growable`: ``arbor.ArborForCausalLM``, the model with its growth methods
  (``model.grow()``, ``grow_depth`` ...);
- `arbor.growth.optim`: carrying an optimizer over a growth step;
- `arbor.growth.freezing` and `arbor.growth.lora`: what trains after a step;
- `arbor.growth.export`: a grown, uneven model written as a plain Llama checkpoint.

It builds on `arbor.model`, `arbor.plugins` and `arbor.compat`; `arbor.training` and
`arbor.cli` build on it.
"""
