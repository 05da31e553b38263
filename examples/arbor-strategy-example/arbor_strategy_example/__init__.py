"""An arbor plugin adding the ``loss-slope`` trigger (see `arbor_strategy_example.loss_slope`).

arbor finds this module through the entry point in ``pyproject.toml``::

    [project.entry-points.arbor]
    loss-slope = "arbor_strategy_example"
"""

import arbor_plugins
from arbor_strategy_example.loss_slope import LossSlopeSettings, LossSlopeState, LossSlopeTrigger

__all__ = ["LossSlopeSettings", "LossSlopeState", "LossSlopeTrigger", "arbor_register"]
__version__ = "0.1.0"


@arbor_plugins.hookimpl
def arbor_register(registry):
    registry.register("trigger", "loss-slope", LossSlopeTrigger())
