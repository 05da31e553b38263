"""An arbor plugin adding the ``loss-slope`` trigger (see `arbor_strategy_example.loss_slope`) and the
``fade-in`` init scheme, whose training state goes into checkpoints (see `arbor_strategy_example.fade_in`).

arbor finds this module through the entry point in ``pyproject.toml``::

    [project.entry-points.arbor]
    loss-slope = "arbor_strategy_example"
"""

import arbor_plugins
from arbor_strategy_example import fade_in
from arbor_strategy_example.fade_in import FadeInInit, FadeInSettings
from arbor_strategy_example.loss_slope import LossSlopeSettings, LossSlopeState, LossSlopeTrigger

__all__ = ["FadeInInit", "FadeInSettings", "LossSlopeSettings", "LossSlopeState", "LossSlopeTrigger",
           "arbor_load_state", "arbor_register", "arbor_state_dict"]
__version__ = "0.1.0"


@arbor_plugins.hookimpl
def arbor_register(registry):
    registry.register("trigger", "loss-slope", LossSlopeTrigger())
    registry.register("init_scheme", "fade-in", FadeInInit())


@arbor_plugins.hookimpl
def arbor_state_dict(model):
    """Gates still opening go into the checkpoint (the weights do not say how far they are)."""
    return fade_in.state_dict(model)


@arbor_plugins.hookimpl
def arbor_load_state(model, state):
    """A resumed run gets its gates back, opened as far as they were."""
    fade_in.load_state(model, state)
