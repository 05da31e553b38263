"""The ``unicode-glyphs`` substrate: what a token looks like, compressed by PCA.

PGT's "visual Unicode" substrate (Bochkov 2025), built like this:

1. Token texts: from the tokenizer named by the ``tokenizer`` setting (a
   ``tokenizer.json`` file or a directory holding one; each id decoded alone),
   or by default from the code-point vocabulary of `arbor_substrates.tokenizer`
   (id ``i`` is ``chr(i)``; with ``vocab_size`` below 65,536 the first
   ``vocab_size`` code points). Special tokens, the code-point tokenizer's
   reserved placeholders and ids the tokenizer does not have get no text.
2. Rendering: each text drawn in grey levels into a ``size`` x ``size`` bitmap
   (32 x 32 by default) with the font the ``font`` setting chooses (see
   `choose_font`): by default GNU Unifont, as PGT used, when it is installed
   (``apt install fonts-unifont`` on Debian and Ubuntu puts it where it is
   found), else DejaVu Sans as shipped with matplotlib, with a
   `UnifontMissingWarning` saying so. The baseline sits so the font's ascent
   and descent fit; the text is centred horizontally and drawn smaller when
   wider than the bitmap. Whitespace inside a text is drawn as a space.
3. No glyph: a text that has a character the font lacks (not in its cmap), or
   that draws nothing (no text, whitespace only, invisible characters), gets a
   pseudo-random bitmap instead, seeded by a hash of its id and text, so such
   tokens stay distinct from each other and from every glyph. How many tokens
   this hit is logged and kept on the module (``no_glyph`` and ``blank``).
   A font's coverage (`bmp_coverage`) is how many of the 65,536 BMP code points
   its cmap has a glyph for: GNU Unifont 15 has 57,086, DejaVu Sans 5,367, so
   with DejaVu most of the BMP gets pseudo-random bitmaps.
4. Pixels ordered from the centre outwards: by distance from the bitmap's
   centre, then by angle counter-clockwise from the positive x axis (y up).
   PCA does not depend on the order of its features; the order is PGT's and
   fixes the layout of ``bitmap_vectors`` for anything else reading them.
5. PCA to ``width`` components (default: the hidden size), fitted on the
   tokens that have a glyph: eigenvectors of the covariance in float64, each
   signed so its largest-magnitude entry is positive. Components the glyphs
   do not vary along (beyond ``size * size``, or beyond the number of glyphs)
   are zero columns. Every row, pseudo-random ones too, is its bitmap minus
   the glyphs' mean, projected, L2-normalised, times ``scale``.

Characters drawn alike get equal rows: Latin A, Greek Alpha and Cyrillic A
look the same to the model (about 600 BMP code points share a bitmap with
another one in DejaVu Sans), as in PGT's substrate.

The result is cached on disk, keyed by a hash of the token texts, the font
file's bytes, ``size``, ``width`` and the rules above, in ``$ARBOR_CACHE_DIR/glyphs``
(default ``$XDG_CACHE_HOME/arbor/glyphs``, else ``~/.cache/arbor/glyphs``); a
65,536-token vocabulary at 32 x 32 and hidden size 1,024 takes under half a
minute on two CPU cores the first time, and 256 MB of disk. The first build writes ``font_sha256`` and
``texts_sha256`` into ``config.substrate_settings``; a later build (after
``from_pretrained``, say) whose font or texts hash differently stops with an
error instead of quietly giving the trained model other embeddings. Without a
``font`` setting, a later build takes whichever of Unifont and DejaVu Sans has
the recorded hash, so installing Unifont does not change a model built before.

Renders with Pillow and reads font tables with matplotlib (both dependencies of arbor-lm).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from arbor import ArborConfigError
from arbor_plugins import StrictSettings, Substrate
from arbor_substrates.fonts import (  # noqa: F401  (the font choice; still importable from here)
    UNIFONT_INSTALL,
    FontChoice,
    UnifontMissingWarning,
    bmp_coverage,
    choose_font,
    dejavu_sans,
    find_unifont,
    font_dirs,
    sha256_file,
)
from arbor_substrates.frozen import FrozenEmbedding, check_untied, lift_width
from arbor_substrates.tokenizer import BMP_SIZE, codepoint_text, is_reserved_token

logger = logging.getLogger(__name__)

#: Part of every cache key: bump it when rendering, ordering or PCA change.
GLYPH_RULES_VERSION = 1
_CHUNK = 8192  # rows per block in the PCA sums: bounds the temporary copies


class GlyphSettings(StrictSettings):
    #: Font: a TrueType/OpenType file, ``"unifont"`` (GNU Unifont, an error when it is not installed),
    #: ``"dejavu"`` (matplotlib's DejaVu Sans), or None: Unifont when installed, else DejaVu Sans
    #: with a warning. `choose_font` resolves it; `bmp_coverage` counts a font's code points.
    font: str | None = None
    #: ``tokenizer.json`` (or a directory with one) giving token texts; None: code points.
    #: Saved configs keep paths as given, so absolute paths travel best (font too).
    tokenizer: str | None = None
    #: Side of the square bitmap, in pixels.
    size: int = Field(32, ge=4, le=256)
    #: PCA components (None: the hidden size). Hidden growth records it here.
    width: int | None = Field(None, ge=1)
    #: Length of every row (rows are L2-normalised, then scaled).
    scale: float = Field(1.0, gt=0)
    #: Read and write the on-disk cache.
    cache: bool = True
    #: Written by the first build; a rebuild with other font bytes or texts is an error.
    font_sha256: str | None = None
    texts_sha256: str | None = None


def _require_rendering() -> None:
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"substrate 'unicode-glyphs' renders with matplotlib and Pillow, which are not installed ({exc}); "
            'install them with: pip install matplotlib "pillow>=9.1"'
        ) from None


def cache_dir() -> Path:
    """Where glyph matrices are cached: ``$ARBOR_CACHE_DIR/glyphs``, else the user cache."""
    root = os.environ.get("ARBOR_CACHE_DIR")
    if root:
        return Path(root) / "glyphs"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arbor" / "glyphs"


def texts_digest(texts: list[str | None]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=True).encode()).hexdigest()


# ------------------------------------------------------------------- texts
def token_texts(vocab_size: int, tokenizer: str | None = None) -> list[str | None]:
    """Per id, the text to render (None: no text; the id gets a pseudo-random bitmap)."""
    if tokenizer is None:
        return [codepoint_text(i) for i in range(vocab_size)]
    from tokenizers import Tokenizer

    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ArborConfigError(
            "substrate_settings.tokenizer", tokenizer,
            "must be a tokenizer.json file or a directory holding one (no such file)",
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust loader raises a bare Exception on a bad file
        raise ArborConfigError("substrate_settings.tokenizer", tokenizer, f"must be a tokenizers JSON file ({exc})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    largest = max(vocab.values(), default=-1)
    if largest >= vocab_size:
        raise ArborConfigError(
            "vocab_size", vocab_size, f"must be > {largest}, the largest id of the tokenizer {os.fspath(path)}"
        )
    special = {i for i, added in tok.get_added_tokens_decoder().items() if added.special}
    ids = sorted(i for token, i in vocab.items() if i not in special and not is_reserved_token(token))
    texts: list[str | None] = [None] * vocab_size
    for i, text in zip(ids, tok.decode_batch([[i] for i in ids], skip_special_tokens=False)):
        texts[i] = text or None
    return texts


# --------------------------------------------------------------- rendering
class _Renderer:
    """Draws texts into ``size`` x ``size`` grey bitmaps with one font."""

    def __init__(self, font_path: Path, size: int):
        from matplotlib.ft2font import FT2Font

        self.path, self.size = str(font_path), size
        self.cmap = set(FT2Font(self.path).get_charmap())
        self._fonts: dict[int, Any] = {}
        # The largest font size whose ascent + descent fits the bitmap's height.
        points = size
        while points > 1 and sum(self.font(points).getmetrics()) > size:
            points -= 1
        self.points = points

    def font(self, points: int):
        if points not in self._fonts:
            from PIL import ImageFont

            # The basic layout engine: no shaping library, so the same pixels wherever Pillow runs.
            self._fonts[points] = ImageFont.truetype(self.path, points, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[points]

    def drawable(self, text: str) -> bool:
        return all(c.isspace() or ord(c) in self.cmap for c in text)

    def render(self, text: str) -> np.ndarray:
        from PIL import Image, ImageDraw

        text = "".join(" " if c.isspace() else c for c in text)  # a newline would start a second line
        points = self.points
        length = self.font(points).getlength(text)
        if length > self.size:  # too wide: a smaller font, centred the same way
            points = max(1, int(points * self.size / length))
            while points > 1 and self.font(points).getlength(text) > self.size:
                points -= 1
        font = self.font(points)
        ascent, descent = font.getmetrics()
        baseline = (self.size - ascent - descent) // 2 + ascent
        image = Image.new("L", (self.size, self.size))
        ImageDraw.Draw(image).text((self.size / 2, baseline), text, fill=255, font=font, anchor="ms")
        return np.asarray(image)


def hashed_pattern(token_id: int, text: str | None, size: int) -> np.ndarray:
    """A pseudo-random black/white bitmap for a token with no glyph, seeded by its id and text."""
    seed = hashlib.sha256(f"{token_id}\0{text}".encode("utf-8", "surrogatepass")).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
    return (rng.random((size, size)) < 0.5).astype(np.uint8) * 255


def render_bitmaps(texts: list[str | None], font_path: Path, size: int) -> tuple[np.ndarray, list[int], list[int]]:
    """``(bitmaps, no_glyph, blank)``: uint8 ``(n, size, size)`` bitmaps, and the ids that got a
    pseudo-random pattern because the font lacks a character / the text draws nothing."""
    renderer = _Renderer(font_path, size)
    bitmaps = np.zeros((len(texts), size, size), dtype=np.uint8)
    no_glyph, blank = [], []
    for i, text in enumerate(texts):
        if text is not None and not renderer.drawable(text):
            no_glyph.append(i)
        else:
            bitmap = renderer.render(text) if text is not None and not text.isspace() else None
            if bitmap is not None and bitmap.any():
                bitmaps[i] = bitmap
                continue
            blank.append(i)
        bitmaps[i] = hashed_pattern(i, text, size)
    return bitmaps, no_glyph, blank


# ------------------------------------------------------------ ordering, PCA
def centre_out_order(size: int) -> torch.Tensor:
    """Indices of the row-major pixels of a ``size`` x ``size`` bitmap, from the centre outwards:
    by distance from the centre, then by angle counter-clockwise from the positive x axis (y up)."""
    keys = []
    for row in range(size):
        for col in range(size):
            dx, dy = 2 * col - (size - 1), (size - 1) - 2 * row  # doubled offsets: exact integers
            keys.append((dx * dx + dy * dy, math.atan2(dy, dx) % (2 * math.pi), row * size + col))
    return torch.tensor([index for _, _, index in sorted(keys)], dtype=torch.long)


def bitmap_vectors(bitmaps: np.ndarray) -> torch.Tensor:
    """``(n, size * size)`` float32 in [0, 1], pixels in centre-out order."""
    n, size, _ = bitmaps.shape
    flat = torch.from_numpy(np.ascontiguousarray(bitmaps)).reshape(n, size * size)
    return flat[:, centre_out_order(size)].to(torch.float32) / 255.0


def _principal_axes(sample: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(variances, axes)`` of the centred ``sample``, largest first; float64, axes as columns.

    With fewer rows than features the ``rows x rows`` Gram matrix is decomposed
    instead of the covariance (same axes, a smaller eigenproblem).
    """
    rows, features = sample.shape
    if rows < features:
        centred = (sample - centre).to(torch.float64)
        values, vecs = torch.linalg.eigh(centred @ centred.T)
        axes = centred.T @ vecs
        axes = axes / axes.norm(dim=0, keepdim=True).clamp_min(1e-300)
    else:
        cov = torch.zeros(features, features, dtype=torch.float64)
        for block in sample.split(_CHUNK):
            centred = block - centre
            cov += (centred.T @ centred).to(torch.float64)
        values, axes = torch.linalg.eigh(cov)
    return values.flip(0), axes.flip(1)  # eigh sorts ascending


def principal_rows(vectors: torch.Tensor, components: int, fit: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``vectors`` centred and projected on the first ``components`` principal axes of the
    rows ``fit`` selects (default: all), L2-normalised; float32 ``(n, components)``.

    Axes along which the fitted rows do not vary (beyond their rank, or beyond
    the number of features) give zero columns: their directions would be
    arbitrary. Sums run over blocks in float32, accumulated in float64; the
    eigendecomposition is float64.
    """
    n, features = vectors.shape
    sample = vectors if fit is None else vectors[fit]
    mean = torch.zeros(features, dtype=torch.float64)
    for block in sample.split(_CHUNK):
        mean += block.sum(0, dtype=torch.float64)
    centre = (mean / max(len(sample), 1)).to(torch.float32)
    values, axes = _principal_axes(sample, centre)
    k = min(components, int((values > values[0].clamp_min(0) * 1e-10).sum()) if len(values) else 0)
    axes = axes[:, :k]
    # An eigenvector's sign is arbitrary: make each one's largest-magnitude entry positive.
    signs = torch.sign(axes[axes.abs().argmax(0), torch.arange(k)])
    axes = (axes * torch.where(signs == 0, torch.ones_like(signs), signs)).to(torch.float32)
    out = torch.zeros(n, components, dtype=torch.float32)
    for start, block in zip(range(0, n, _CHUNK), vectors.split(_CHUNK)):
        out[start : start + len(block), :k] = (block - centre) @ axes
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------- caching
#: Matrices built in this process, by cache key (the last few only).
_MEMORY: OrderedDict[str, tuple[torch.Tensor, dict[str, list[int]]]] = OrderedDict()
_MEMORY_SIZE = 2


def clear_memory_cache() -> None:
    """Forget matrices held in this process (the disk cache stays)."""
    _MEMORY.clear()


def _remember(key: str, value: tuple[torch.Tensor, dict[str, list[int]]]) -> None:
    _MEMORY[key] = value
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)


def _load(path: Path) -> tuple[torch.Tensor, dict[str, list[int]]] | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            info = json.loads(handle.metadata()["info"])
            return handle.get_tensor("matrix"), info
    except Exception as exc:  # a truncated or foreign file: recompute (and overwrite) it
        logger.warning("ignoring unreadable glyph cache file %s (%s)", path, exc)
        return None


def _store(path: Path, matrix: torch.Tensor, info: dict[str, list[int]]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside its final name, then renamed: a reader never sees half a file.
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(handle)
        save_file({"matrix": matrix.contiguous()}, tmp, metadata={"info": json.dumps(info)})
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write the glyph cache %s (%s); the matrix will be recomputed next time", path, exc)


def glyph_matrix(texts: list[str | None], font_path: Path, size: int, width: int, *, font_sha256: str,
                 texts_sha256: str, cache: bool = True) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """The unit-row ``(len(texts), width)`` float32 glyph matrix and ``{"no_glyph": ids, "blank": ids}``,
    from memory, the disk cache, or computed (then cached)."""
    key = hashlib.sha256(json.dumps(
        {"rules": GLYPH_RULES_VERSION, "font": font_sha256, "texts": texts_sha256, "size": size, "width": width}
    ).encode()).hexdigest()[:32]
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    path = cache_dir() / f"{key}.safetensors"
    found = _load(path) if cache and path.is_file() else None
    if found is None:
        bitmaps, no_glyph, blank = render_bitmaps(texts, font_path, size)
        # The axes describe real glyphs: pseudo-random patterns (most of the BMP with a small font)
        # would otherwise pull them towards noise. They are projected like the rest.
        glyph = torch.ones(len(texts), dtype=torch.bool)
        glyph[no_glyph + blank] = False
        fit = glyph if int(glyph.sum()) >= 2 else None
        found = principal_rows(bitmap_vectors(bitmaps), width, fit), {"no_glyph": no_glyph, "blank": blank}
        if no_glyph or blank:
            logger.warning(
                "unicode-glyphs: %d of %d tokens have a character %s lacks and %d draw nothing; "
                "they get pseudo-random bitmaps", len(no_glyph), len(texts), font_path.name, len(blank),
            )
        if cache:
            _store(path, *found)
    _remember(key, found)
    return found


# --------------------------------------------------------------- substrate
class GlyphEmbedding(FrozenEmbedding):
    def __init__(self, config: Any, settings: GlyphSettings, width: int, font: FontChoice):
        self.settings, self.font, self.font_path = settings, font, font.path
        #: Ids that got a pseudo-random bitmap: the font lacks a character / the text draws nothing.
        self.no_glyph: list[int] = []
        self.blank: list[int] = []
        self._warned = False
        super().__init__(config, width)

    def compute(self) -> torch.Tensor:
        s = self.settings
        # Said here, not in build(): a model on the meta device draws nothing. Once per model
        # (the weight init fills the matrix again); Python's filters keep it to once per process.
        if self.font.fallback is not None and not self._warned:
            self._warned = True
            warnings.warn(self.font.fallback, UnifontMissingWarning, stacklevel=2)
        logger.info("unicode-glyphs: drawing with %s", self.font.describe())
        texts = token_texts(self.vocab_size, s.tokenizer)
        digests = {"font_sha256": sha256_file(self.font_path), "texts_sha256": texts_digest(texts)}
        recorded = self.config.substrate_settings or {}
        for field, digest in digests.items():
            if recorded.get(field) not in (None, digest):
                what = f"font file {os.fspath(self.font_path)}" if field == "font_sha256" else "token texts"
                raise ArborConfigError(
                    f"substrate_settings.{field}", recorded[field],
                    f"this model's glyphs were built from a {what} with this hash, but it now hashes to "
                    f"{digest}; the embeddings would differ. Use the original font/tokenizer, or remove "
                    f"{field} from substrate_settings to accept new embeddings",
                )
        if any(recorded.get(field) is None for field in digests):
            self.config.substrate_settings = {**recorded, **digests}
        matrix, info = glyph_matrix(texts, self.font_path, s.size, self.width, cache=s.cache, **digests)
        self.no_glyph, self.blank = list(info["no_glyph"]), list(info["blank"])
        return matrix * s.scale

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, font={self.font_path.name} ({self.font.coverage:,} BMP code points), "
                f"size={self.settings.size}")


class UnicodeGlyphSubstrate(Substrate):
    description = "frozen: each token's text rendered as a bitmap, PCA to the hidden size (PGT visual Unicode)"
    frozen = True
    Settings = GlyphSettings

    def default_tokenizer(self, settings: BaseModel):
        """Without a ``tokenizer`` setting, token ids are code points: the code-point tokenizer."""
        if getattr(settings, "tokenizer", None) is not None:
            return None
        from arbor_substrates.tokenizer import build_codepoint_tokenizer

        return build_codepoint_tokenizer()

    def describe(self, settings: BaseModel) -> str:
        """The description, with the font these settings draw with here and its coverage."""
        _require_rendering()
        font = choose_font(settings.font, settings.font_sha256)
        missing = "; GNU Unifont is not installed" if font.fallback else ""
        return f"{self.description}; font: {font.describe()}{missing}"

    def build(self, config: Any, settings: BaseModel) -> GlyphEmbedding:
        check_untied(config, "unicode-glyphs")
        _require_rendering()
        width = lift_width(config, settings, "unicode-glyphs")
        font = choose_font(settings.font, settings.font_sha256)  # the recorded hash keeps a model's font
        if settings.tokenizer is None and config.vocab_size > BMP_SIZE:
            logger.info("unicode-glyphs: ids from %d up have no code point and get pseudo-random bitmaps", BMP_SIZE)
        return GlyphEmbedding(config, settings, width, font)
