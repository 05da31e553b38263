"""Checks on checkpoint directories before transformers loads them.

transformers reports a tensor whose shape disagrees with the config in a log
table and then raises a generic error; a grown model makes such mismatches a
real possibility (a config edited by hand, a half-copied directory), so arbor
checks first and names the tensor and both shapes in the error itself. It also
checks that the weight files hold exactly the tensors the model loads: transformers
initialises a missing one at random and drops an extra one, with a log line at most,
and the model then runs, wrong.

Checkpoints arbor writes also carry ``checksums.json``: the SHA-256 of every
file in the directory. safetensors checks its header but not the tensor bytes,
so a flipped bit in a weight loads silently; with the checksums it is found,
and the file is named, before anything is loaded.

And they carry their own modeling code (`write_remote_code`): ``modeling_arbor.py``,
a copy of `arbor.model.remote_code`, named in ``config.json``'s ``auto_map``, and for
a frozen substrate its embedding matrix in ``substrate.safetensors``, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads the
model where arbor is not installed. arbor itself reads neither file.

Last, the rule for a directory a checkpoint is written into by ``arbor grow``/``arbor export``
(`check_output_directory`): never the source or a directory around or inside it, never a run
directory, and an overwrite replaces only a directory holding nothing but files arbor writes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from arbor.model import remote_code


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not have the shapes its config describes."""


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be parsed (damaged, truncated, not what its name says); names the file."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def checkpoint_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Tensor name → shape for the safetensors weights in ``directory`` (None if there are none)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointReadError(f"{index}: cannot be read: {_first_line(exc)}") from None
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(directory / file, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as exc:  # noqa: BLE001 - the Rust reader raises its own error type; name the file
            raise CheckpointReadError(f"{directory / file}: cannot be read: {_first_line(exc)}") from None
    return shapes


def read_config(directory: str | os.PathLike, config_class):
    """``config_class.from_pretrained(directory)``, with an unreadable ``config.json`` named in one line."""
    try:
        return config_class.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointReadError(f"{Path(directory) / 'config.json'}: cannot be read: {_first_line(exc)}") from None


class CheckpointKeysError(CheckpointMismatchError):
    """A checkpoint lacks tensors its model needs, or holds tensors its model has no place for."""


def _names(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (and {len(keys) - limit} more; {len(keys)} in all)" if len(keys) > limit else shown


def _ignored(key: str, patterns) -> bool:
    """Whether ``key`` matches one of a transformers ``_keys_to_ignore_on_*`` pattern lists."""
    return any(re.search(pattern, key) for pattern in patterns or ())


def _tied_groups(model) -> list[set[str]]:
    """Groups of state-dict keys that name one tensor (tied weights): a save writes only one of them.

    The identity of the tensors is the fact; the class's ``_tied_weights_keys`` (target -> source)
    is added for a transformers version that ties only at load time, when the config asks for it.
    """
    by_tensor: dict[int, set[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), set()).add(key)
    groups = [keys for keys in by_tensor.values() if len(keys) > 1]
    declared = getattr(type(model), "_tied_weights_keys", None)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if isinstance(declared, dict) and getattr(text_config, "tie_word_embeddings", False):
        groups += [{target, source} for target, source in declared.items()]
    return groups


def check_checkpoint_keys(directory: str | os.PathLike, model, found: dict[str, tuple[int, ...]]) -> None:
    """Raise `CheckpointKeysError` if the tensors ``found`` in ``directory`` are not those ``model``
    (built from the checkpoint's config, on the meta device) loads.

    transformers initialises a missing tensor at random and drops an unexpected one, with a log
    line at most: the model then runs, silently wrong. A tensor that is legitimately absent is not
    missing: one of a tied group when another member is saved, a non-persistent buffer (never in
    the state dict), and what the class's ``_keys_to_ignore_on_load_missing``/``_on_save`` name.
    """
    expected = set(model.state_dict())
    prefix = model.base_model_prefix + "."
    model_is_base = not any(k.startswith(prefix) for k in expected)
    file_is_base = not any(k.startswith(prefix) for k in found)
    names = set(found)
    if model_is_base and not file_is_base:  # a base model from a causal-LM checkpoint: the head is not its
        names = {k.removeprefix(prefix) for k in found if k.startswith(prefix)}
    elif file_is_base and not model_is_base:  # a base-model checkpoint: its tensors sit under the prefix
        names = {prefix + k for k in found}
    cls = type(model)
    optional = set()
    for group in _tied_groups(model):
        if group & names:
            optional |= group
    missing = sorted(
        k for k in expected - names
        if k not in optional and not _ignored(k, getattr(cls, "_keys_to_ignore_on_load_missing", None))
        and not _ignored(k, getattr(cls, "_keys_to_ignore_on_save", None))
    )
    unexpected = sorted(
        k for k in names - expected if not _ignored(k, getattr(cls, "_keys_to_ignore_on_load_unexpected", None))
    )
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {_names(missing)} (loading would initialise them at random)")
        if unexpected:
            problems.append(f"unexpected {_names(unexpected)} (loading would drop them)")
        raise CheckpointKeysError(
            f"checkpoint {os.fspath(directory)} does not match its config: its weights have tensors "
            f"{'; '.join(problems)}; the weight files were changed or come from another model"
        )


def check_checkpoint_shapes(directory: str | os.PathLike, model_class, config) -> None:
    """Raise `CheckpointMismatchError` if a tensor in ``directory`` does not fit ``config``, and
    `CheckpointKeysError` if a tensor the model needs is missing or one it has no place for is there."""
    found = checkpoint_shapes(directory)
    if not found:
        return
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    prefix = model_class.base_model_prefix + "."
    problems = []
    for name, shape in found.items():
        # A base model loads from a causal-LM checkpoint and the other way round.
        for candidate in (name, name.removeprefix(prefix), prefix + name):
            if candidate in expected:
                if expected[candidate] != shape:
                    problems.append((name, shape, expected[candidate]))
                break
    if problems:
        name, shape, want = problems[0]
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        raise CheckpointMismatchError(
            f"checkpoint {os.fspath(directory)} does not match its config: tensor {name} has shape "
            f"{list(shape)} in the file but the config needs {list(want)}{more}"
        )
    check_checkpoint_keys(directory, model, found)


#: File in a checkpoint directory listing the SHA-256 of every other file in it.
CHECKSUMS = "checksums.json"
_CHUNK = 1 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is damaged or missing: its bytes differ from the checksum written with it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != CHECKSUMS
    )


def write_checksums(directory: str | os.PathLike) -> Path:
    """Write ``checksums.json`` for every file now in ``directory`` and return its path."""
    directory = Path(directory)
    record = {"algorithm": "sha256", "files": {name: _sha256(directory / name) for name in _files(directory)}}
    path = directory / CHECKSUMS
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def verify_checksums(directory: str | os.PathLike, only=None) -> bool:
    """Check the files of ``directory`` against its ``checksums.json``.

    ``only`` (a predicate on the file name relative to ``directory``) limits the
    check to some files, e.g. those a model load reads. Returns False when the
    directory has no checksums (written elsewhere, or by an older arbor): nothing
    to check against. Raises `CheckpointIntegrityError` naming the first file
    that is missing or whose bytes changed.
    """
    directory = Path(directory)
    path = directory / CHECKSUMS
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        files = record["files"]
        if record.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("unknown layout")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointIntegrityError(f"{path}: damaged ({type(exc).__name__}: {exc})") from None
    hint = f"if it was changed on purpose, delete {path}"
    for name, expected in sorted(files.items()):
        if only is not None and not only(name):
            continue
        file = directory / name
        if not file.is_file():
            raise CheckpointIntegrityError(f"{file}: missing (listed in {CHECKSUMS}; {hint})")
        if _sha256(file) != expected:
            raise CheckpointIntegrityError(
                f"{file}: damaged (its SHA-256 differs from the one in {CHECKSUMS}; {hint})"
            )
    return True


def is_model_file(name: str) -> bool:
    """Whether a checkpoint file is one a model load reads (config, weights, generation config)."""
    return name in ("config.json", "generation_config.json") or name.startswith("model.safetensors")


def drop_checksums(directory: str | os.PathLike) -> None:
    """Remove ``checksums.json`` from ``directory``: its files are about to be rewritten."""
    try:
        (Path(directory) / CHECKSUMS).unlink()
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------ remote code
#: The checkpoint file holding the self-contained modeling code (a copy of `arbor.model.remote_code`).
REMOTE_CODE_FILE = "modeling_arbor.py"
#: The checkpoint file holding a frozen substrate's embedding matrix (tensor ``weight``) for that code.
SUBSTRATE_FILE = remote_code.SUBSTRATE_FILE
#: What ``config.json``'s ``auto_map`` names: the classes transformers loads with ``trust_remote_code=True``.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "modeling_arbor.ArborConfig",
    "AutoModel": "modeling_arbor.ArborModel",
    "AutoModelForCausalLM": "modeling_arbor.ArborForCausalLM",
}
_REMOTE_CODE_SOURCE = Path(remote_code.__file__)


class RemoteCodeWarning(UserWarning):
    """A checkpoint is saved without remote code: its embedding is not one that code reproduces."""


def substrate_matrix(model) -> tuple[torch.Tensor | None, str | None]:
    """How the remote code reproduces ``model``'s embedding: ``(matrix, None)`` for a frozen
    substrate (the fixed matrix to save), ``(None, None)`` for the learned one (its weights are in
    ``model.safetensors``), ``(None, reason)`` when the remote code cannot reproduce it."""
    config, embed = model.config, model.get_input_embeddings()
    shape = (config.vocab_size, config.hidden_size)
    if config.substrate == remote_code.LEARNED:
        # isinstance and the forward, not the type: FSDP2 swaps a sharded module's class for a subclass.
        plain = (isinstance(embed, nn.Embedding) and type(embed).forward is nn.Embedding.forward
                 and embed.padding_idx is None and embed.max_norm is None)
        if plain and tuple(embed.weight.shape) == shape:
            return None, None
        return None, f"its embedding is a {type(embed).__name__}, not the plain nn.Embedding of substrate 'learned'"
    # Any other substrate is carried as a fixed matrix: it must be a lookup into a non-persistent
    # `weight` buffer (as arbor_substrates' frozen substrates are), with nothing saved besides.
    name = f"substrate {config.substrate!r}"
    weight = dict(embed.named_buffers()).get("weight")
    if embed.state_dict():
        return None, f"{name} has saved state ({', '.join(embed.state_dict())}), not only a fixed matrix"
    if weight is None or tuple(weight.shape) != shape or weight.device.type == "meta":
        return None, f"{name} has no fixed {list(shape)} `weight` matrix to save"
    ids = torch.cat([torch.arange(min(config.vocab_size, 256)), torch.tensor([config.vocab_size - 1])]).to(weight.device)
    with torch.no_grad():
        if not torch.equal(embed(ids[None])[0], weight[ids]):
            return None, f"{name} does not look its vectors up in its `weight` matrix"
    return weight.detach().cpu().contiguous(), None


def write_remote_code(model, directory: str | os.PathLike) -> bool:
    """Write the remote-code files of ``model`` into ``directory``; return whether it did.

    When the remote code cannot reproduce the model's embedding (a third-party substrate that is
    neither a plain embedding nor a fixed matrix), nothing is written and a `RemoteCodeWarning`
    says why: the checkpoint then loads with arbor only. Files of an earlier save that this one
    does not write are removed.
    """
    directory = Path(directory)
    matrix, reason = substrate_matrix(model)
    if reason is not None:
        warnings.warn(
            f"{directory} is saved without remote code ({REMOTE_CODE_FILE}, auto_map): {reason}; "
            "it loads with arbor installed only",
            RemoteCodeWarning, stacklevel=3,
        )
        remove_remote_code(directory)
        return False
    shutil.copyfile(_REMOTE_CODE_SOURCE, directory / REMOTE_CODE_FILE)
    if matrix is None:
        (directory / SUBSTRATE_FILE).unlink(missing_ok=True)
    else:
        save_file({"weight": matrix}, directory / SUBSTRATE_FILE,
                  metadata={"format": "pt", "substrate": str(model.config.substrate)})
    return True


def drop_remote_code_map(config) -> None:
    """Remove from ``config.auto_map`` the entries `REMOTE_CODE_AUTO_MAP` adds (and ``auto_map``
    itself when nothing else is left): a loaded model's config describes the model, and each save
    writes the entries again when it writes the code they name."""
    auto_map = config.__dict__.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    kept = {k: v for k, v in auto_map.items() if REMOTE_CODE_AUTO_MAP.get(k) != v}
    del config.auto_map
    if kept:
        config.auto_map = kept


def remove_remote_code(directory: str | os.PathLike) -> None:
    """Remove the remote-code files an earlier save left in ``directory``."""
    for name in (REMOTE_CODE_FILE, SUBSTRATE_FILE):
        (Path(directory) / name).unlink(missing_ok=True)


# ------------------------------------------------------------- output directories
#: Tokenizer files a checkpoint directory may hold; copied next to a grown or exported checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
#: Files that ``save_pretrained``, `write_remote_code`, `write_checksums`, the Llama export and the
#: tokenizer copy put into a model directory; with ``model*.safetensors`` (one file or shards), the
#: only names a directory may hold for arbor to replace it.
WRITTEN_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", CHECKSUMS, REMOTE_CODE_FILE,
    SUBSTRATE_FILE, *TOKENIZER_FILES,
})
#: Any one of these marks a training run directory (`arbor train --out`): never replaced.
RUN_DIRECTORY_MARKS = ("train_config.json", "metrics.jsonl", "checkpoints", ".arbor.lock")


class UnsafeOutputError(ValueError):
    """Writing a model directory there could destroy files arbor did not write, or the source."""


def is_written_file(entry: os.DirEntry | Path) -> bool:
    """Whether ``entry`` is a file (or a link, which removing does not follow) that arbor writes
    into a model directory."""
    is_dir = entry.is_dir(follow_symlinks=False) if isinstance(entry, os.DirEntry) else (
        entry.is_dir() and not entry.is_symlink())
    if is_dir:
        return False
    return entry.name in WRITTEN_FILES or fnmatch.fnmatchcase(entry.name, "model*.safetensors")


def _within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def check_output_directory(out: str | os.PathLike, *, overwrite: bool, label: str | None = None,
                           sources=(), overwrite_hint: str = "pass overwrite=True") -> None:
    """Raise `UnsafeOutputError` unless a model directory may be written to ``out``.

    ``out`` must not be a file, must not be, contain or lie inside any of ``sources`` (the
    checkpoints being read; real paths, so symbolic links do not hide it), must not be a training
    run directory, and if it is a non-empty directory, it is replaced only with ``overwrite`` and
    only when it holds nothing but files arbor writes into a model directory (`WRITTEN_FILES`,
    ``model*.safetensors``): an overwrite never removes a file arbor did not write. ``label``
    names ``out`` in the messages (default: the path itself).
    """
    label = label or os.fspath(out)
    real = os.path.realpath(out)
    if os.path.exists(real) and not os.path.isdir(real):
        raise UnsafeOutputError(f"{label} is a file, not a directory; give a directory to write the checkpoint into")
    for source in sources:
        source_real = os.path.realpath(source)
        if real == source_real:
            raise UnsafeOutputError(f"{label} is the checkpoint {os.fspath(source)} itself; choose another directory")
        if _within(source_real, real):
            raise UnsafeOutputError(f"{label} contains the checkpoint {os.fspath(source)}; replacing it would delete "
                                    "the checkpoint: choose another directory")
        if _within(real, source_real):
            raise UnsafeOutputError(f"{label} lies inside the checkpoint {os.fspath(source)}; choose a directory "
                                    "outside it")
    if not os.path.isdir(real):
        return
    with os.scandir(real) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    if not entries:
        return
    marks = [e.name for e in entries if e.name in RUN_DIRECTORY_MARKS]
    if marks:
        raise UnsafeOutputError(f"{label} is an arbor run directory (it holds {marks[0]}); arbor never replaces a "
                                "run: choose another directory")
    foreign = [e.name for e in entries if not is_written_file(e)]
    if foreign:
        raise UnsafeOutputError(
            f"{label} holds {foreign[0]}, which arbor did not write"
            + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + "; arbor writes only into a new or empty directory, or replaces one holding nothing but an earlier "
            "checkpoint's files (config.json, model*.safetensors, tokenizer files, ...): choose another directory"
        )
    if not overwrite:
        raise UnsafeOutputError(f"{label} exists and is not empty; {overwrite_hint} to replace it")


def replace_directory(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the finished directory ``new`` in place of ``out`` (absent, empty, or an earlier
    checkpoint `check_output_directory` allowed to replace): the old one is moved aside first and
    removed only once ``new`` has its name, so a failure leaves one of the two complete."""
    new, out = Path(new), Path(os.path.realpath(out))
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    new.rename(out)


def sibling_directory(out: str | os.PathLike, purpose: str) -> Path:
    """A new hidden directory next to ``out`` (same file system, so it can be renamed to ``out``)."""
    out = Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{purpose}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp
