"""Which font the ``unicode-glyphs`` substrate draws with: GNU Unifont when it is installed, else
DejaVu Sans as matplotlib ships it, with a warning; how many BMP code points a font covers.

`choose_font` resolves the substrate's ``font`` setting (`arbor_substrates.glyphs`); `find_unifont`
looks for Unifont under `font_dirs`, the folders font packages and users put fonts in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from pathlib import Path

from arbor import ArborConfigError
from arbor_substrates.tokenizer import BMP_SIZE


def dejavu_sans() -> Path:
    """DejaVu Sans as shipped inside matplotlib (no system font, no download): the fallback font."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


class UnifontMissingWarning(UserWarning):
    """GNU Unifont is not installed; the glyphs are drawn with DejaVu Sans instead."""


#: How to get Unifont where `find_unifont` looks.
UNIFONT_INSTALL = (
    "install GNU Unifont (Debian/Ubuntu: apt install fonts-unifont; elsewhere the OpenType file "
    "from https://unifoundry.com/unifont/ into a font folder) or name a font file in substrate_settings.font"
)
# unifont.otf, unifont.ttf, unifont-15.1.05.otf: the BMP font. unifont_upper (planes 1+),
# unifont_csur (private use), unifont_jp and unifont_sample are other fonts of the family.
_UNIFONT_FILE = re.compile(r"unifont(-\d[\d.]*)?\.(otf|ttf)", re.IGNORECASE)
# The family's bitmap formats: FreeType draws them at their one pixel size only, not scaled.
_UNIFONT_BITMAP_FILE = re.compile(r"unifont(-\d[\d.]*)?\.(pcf|bdf|hex)(\.gz)?", re.IGNORECASE)


def font_dirs() -> list[Path]:
    """Where font packages and users put fonts: ``fonts/`` under ``$XDG_DATA_HOME`` and each of
    ``$XDG_DATA_DIRS`` (Linux: ``/usr/share/fonts``, ``/usr/local/share/fonts``), ``~/.fonts``,
    macOS's font folders and Windows's."""
    home = Path.home()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    data_dirs = (os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share").split(os.pathsep)
    dirs = [data_home / "fonts", home / ".fonts", *(Path(d) / "fonts" for d in data_dirs if d),
            Path("/Library/Fonts"), home / "Library" / "Fonts"]
    if os.name == "nt":
        windows = Path(os.environ.get("WINDIR", "C:\\Windows")) / "Fonts"
        local = os.environ.get("LOCALAPPDATA")
        dirs += [windows, *([Path(local) / "Microsoft" / "Windows" / "Fonts"] if local else [])]
    return dirs


@functools.lru_cache(maxsize=8)
def _scan_unifont(dirs: tuple[Path, ...]) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """``(scalable, bitmap)`` Unifont files under ``dirs``; scalable ones best first."""
    scalable, bitmap = set(), set()
    for root in dirs:
        for folder, _, files in os.walk(root):  # a missing folder yields nothing
            for name in files:
                if _UNIFONT_FILE.fullmatch(name):
                    scalable.add(Path(folder) / name)
                elif _UNIFONT_BITMAP_FILE.fullmatch(name):
                    bitmap.add(Path(folder) / name)
    # OpenType first (Unifont's main release format), an unversioned name before versioned
    # ones, then the path: the same files give the same choice.
    best = sorted(scalable, key=lambda p: (p.suffix.lower() != ".otf", "-" in p.name, str(p)))
    return tuple(best), tuple(sorted(bitmap))


def find_unifont(dirs: list[Path] | None = None) -> Path | None:
    """The GNU Unifont file (OpenType or TrueType) found under ``dirs`` (default: `font_dirs`), or None."""
    found, _ = _scan_unifont(tuple(font_dirs() if dirs is None else dirs))
    return found[0] if found else None


@functools.lru_cache(maxsize=16)
def _bmp_coverage(path: str, size: int, mtime_ns: int) -> int:
    from matplotlib.ft2font import FT2Font

    return sum(1 for code, glyph in FT2Font(path).get_charmap().items() if code < BMP_SIZE and glyph)


def bmp_coverage(font_path: Path | str) -> int:
    """How many of the 65,536 BMP code points the font's cmap maps to a glyph (glyph 0, the
    "missing glyph" box, does not count)."""
    stat = os.stat(font_path)
    return _bmp_coverage(os.fspath(font_path), stat.st_size, stat.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class FontChoice:
    """The font the glyphs are drawn with, and why."""

    path: Path
    #: "GNU Unifont", "DejaVu Sans", or the file's name for any other font.
    name: str
    #: BMP code points with a glyph (`bmp_coverage`).
    coverage: int
    #: The one-line warning when Unifont was wanted (no ``font`` setting) but is not installed.
    fallback: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.path.name}), glyphs for {self.coverage:,} of the {BMP_SIZE:,} BMP code points"


def _font_choice(path: Path, fallback: str | None = None) -> FontChoice:
    if path == dejavu_sans():
        name = "DejaVu Sans"
    elif _UNIFONT_FILE.fullmatch(path.name):
        name = "GNU Unifont"
    else:
        name = path.name
    return FontChoice(path, name, bmp_coverage(path), fallback)


def choose_font(font: str | None = None, recorded_sha256: str | None = None,
                dirs: list[Path] | None = None) -> FontChoice:
    """The font the ``font`` setting names.

    A file path is that file; ``"unifont"`` is GNU Unifont found under ``dirs``
    (default: `font_dirs`), an error when there is none; ``"dejavu"`` is DejaVu
    Sans. None: Unifont when it is installed, else DejaVu Sans, and the choice's
    ``fallback`` holds the warning to give. With ``recorded_sha256`` (the hash a
    model's first build wrote) and no ``font`` setting, the one of the two whose
    bytes have that hash, so a model keeps the font it was built with.
    """
    if font == "dejavu":
        return _font_choice(dejavu_sans())
    if font == "unifont":
        unifont = find_unifont(dirs)
        if unifont is None:
            searched = ", ".join(os.fspath(d) for d in (font_dirs() if dirs is None else dirs))
            raise ArborConfigError("substrate_settings.font", font,
                                   f"GNU Unifont is not installed (searched {searched}); {UNIFONT_INSTALL}")
        return _font_choice(unifont)
    if font is not None:
        path = Path(font)
        if not path.is_file():
            raise ArborConfigError(
                "substrate_settings.font", font,
                'must be the path of a TrueType/OpenType font file (no such file), "unifont" or "dejavu"',
            )
        return _font_choice(path)
    unifont, dejavu = find_unifont(dirs), dejavu_sans()
    if recorded_sha256 is not None:
        for candidate in (unifont, dejavu):
            if candidate is not None and sha256_file(candidate) == recorded_sha256:
                return _font_choice(candidate)
    if unifont is not None:
        return _font_choice(unifont)
    _, bitmaps = _scan_unifont(tuple(font_dirs() if dirs is None else dirs))
    bitmap_note = (f"; found only {os.fspath(bitmaps[0])}, a bitmap format that cannot be scaled to the bitmap size"
                   if bitmaps else "")
    coverage = bmp_coverage(dejavu)
    return _font_choice(dejavu, (
        f"unicode-glyphs: GNU Unifont is not installed{bitmap_note}, so glyphs are drawn with DejaVu Sans, which has "
        f"{coverage:,} of the {BMP_SIZE:,} BMP code points (Unifont: about 57,000; the rest get pseudo-random "
        f"bitmaps); to match PGT, {UNIFONT_INSTALL}"
    ))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
