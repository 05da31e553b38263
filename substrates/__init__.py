"""Built-in embedding substrates, registered through the ``arbor`` entry point
group exactly like a third-party plugin's."""

from arbor_plugins import hookimpl
from arbor_substrates.learned import LearnedSubstrate


@hookimpl
def arbor_register(registry):
    registry.register("substrate", "learned", LearnedSubstrate())
