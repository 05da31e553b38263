"""Built-in growth strategies: triggers, insertion policies, init schemes and
freeze policies, registered through the ``arbor`` entry point group exactly
like a third-party plugin's."""

from arbor_plugins import hookimpl


@hookimpl
def arbor_register(registry):
    """No strategies are built in yet; growth components arrive with the growth operators."""
