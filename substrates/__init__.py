"""Built-in embedding substrates, registered through the ``arbor`` entry point
group exactly like a third-party plugin's.

* ``learned``: an ordinary trainable embedding matrix.
* ``binary``: frozen; the token id's bits lifted to the hidden size (PGT "16-bit").
* ``unicode-glyphs``: frozen; each token's text rendered as a bitmap, PCA to the
  hidden size (PGT "visual Unicode").

`arbor_substrates.tokenizer` has the code-point tokenizer these substrates pair with.
"""

from arbor_plugins import hookimpl
from arbor_substrates.binary import BinarySubstrate
from arbor_substrates.glyphs import UnicodeGlyphSubstrate
from arbor_substrates.learned import LearnedSubstrate


@hookimpl
def arbor_register(registry):
    registry.register("substrate", "learned", LearnedSubstrate())
    registry.register("substrate", "binary", BinarySubstrate())
    registry.register("substrate", "unicode-glyphs", UnicodeGlyphSubstrate())
