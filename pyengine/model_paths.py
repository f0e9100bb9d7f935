"""Where a model argument leads: an explicit file path, or a model name looked up in the models folder.

The models folder is `--models-dir`, else $LLM_NODE_MODELS_DIR, else ~/.llm-router/models. A name
resolves to the first existing of:
  <dir>/NAME.gguf                     (as the seed copies it; also NAME-00001-of-0000N.gguf)
  <dir>/NAME  when NAME ends in .gguf
  <dir>/<id>/model.gguf               (the router's convention: ':' -> '_', '_latest' when untagged,
                                       so gpt-oss:20b -> gpt-oss_20b/model.gguf)
A name is one plain path component (is_plain_name: no '/', '\\', no leading '.', printable, at most
255 bytes), so the path a name builds always lies inside the models folder. Confinement applies to that name, not to where the
folder's own entries point: a symlink the folder's owner put there (gpt-oss_20b/model.gguf ->
an Ollama blob in ~/.ollama/models/blobs/) is followed, as the README tells users to serve such blobs."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from pyengine.errors import ModelLoadError

MODELS_DIR_ENV = "LLM_NODE_MODELS_DIR"
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_NAME_BYTES = 255  # one file or folder name on the common Linux file systems


def is_plain_name(name: str) -> bool:
    """Whether `name`, joined to a folder, names an entry of that folder and nothing else: not
    empty, no separator, no leading dot ('.', '..', hidden entries), only printable characters (no
    NUL, controls, format or unassigned code points), at most MAX_NAME_BYTES of UTF-8. The one rule
    under model names (here), pulled model ids (pyengine/node/pull.py) and slot file names
    (pyengine/node/slot_files.py), which each add their own."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        return False
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    return (0 < size <= MAX_NAME_BYTES and not name.startswith(".") and name.isprintable()
            and not separators & set(name))


def default_models_dir() -> Path:
    """$LLM_NODE_MODELS_DIR, else ~/.llm-router/models."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".llm-router" / "models"


def router_dir_name(model_id: str) -> str:
    """The router's storage folder for a model id: gpt-oss:20b -> gpt-oss_20b, gpt-oss -> gpt-oss_latest."""
    return model_id.replace(":", "_") if ":" in model_id else f"{model_id}_latest"


def _check_name(name: str) -> None:
    if not is_plain_name(name):
        raise ModelLoadError(f"Invalid model name {name!r}: a name is a single file or folder name "
                             f"inside the models folder")


def _candidates(name: str, root: Path) -> list[Path]:
    found = [root / f"{name}.gguf"]
    first_shards = sorted(root.glob(f"{glob_escape(name)}-00001-of-[0-9][0-9][0-9][0-9][0-9].gguf"))
    found += first_shards
    if name.endswith(".gguf"):
        found.append(root / name)
    found.append(root / router_dir_name(name) / "model.gguf")
    if ":" not in name:
        found.append(root / name / "model.gguf")
    return found


def _is_file(path: Path) -> bool:
    """Path.is_file, False also where a candidate built from a long name is too long to exist."""
    try:
        return path.is_file()
    except OSError:
        return False


def glob_escape(text: str) -> str:
    """Escape glob metacharacters so a name matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def resolve_model_name(name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """The model file a name refers to inside the models folder (symlinks there followed);
    ModelLoadError when there is none or the name is not one plain entry name. Use this for names
    from untrusted input (HTTP)."""
    _check_name(name)
    root = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    if not root.is_dir():
        raise ModelLoadError(f"Model {name!r} not found: the models folder {root} does not exist")
    for candidate in _candidates(name, root):
        if _is_file(candidate):
            return candidate
    raise ModelLoadError(f"Model {name!r} not found in {root} (looked for {name}.gguf and "
                         f"{router_dir_name(name)}/model.gguf)")


def resolve_model(path_or_name: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> Path:
    """A file that exists is used as given, whatever its name (CLI users may point anywhere: an
    Ollama blob `sha256-...` has no .gguf suffix); otherwise a model name resolved by
    resolve_model_name. Errors say what is wrong with what was passed (a folder, a missing file)."""
    path = Path(path_or_name).expanduser()
    text = os.fspath(path_or_name)
    try:
        mode: int | None = path.stat().st_mode
    except OSError as e:  # missing, or a name too long to exist
        if e.errno == errno.ENAMETOOLONG:
            raise ModelLoadError(f"Model file not found: {text[:80]}... (a name longer than the file system "
                                 f"allows)") from None
        mode = None
    if mode is not None and stat.S_ISREG(mode):
        return path
    is_dir = mode is not None and stat.S_ISDIR(mode)
    explicit = isinstance(path_or_name, os.PathLike) or os.sep in text or bool(os.altsep and os.altsep in text)
    if explicit and is_dir:
        raise ModelLoadError(_folder_message(text, path))
    if explicit and mode is not None:  # a device, a FIFO, a socket: nothing to map
        raise ModelLoadError(f"{text} is not a regular file, so not a GGUF file")
    if explicit:
        raise ModelLoadError(f"Model file not found: {text}")
    try:
        return resolve_model_name(text, models_dir)
    except ModelLoadError as e:
        if is_dir:
            raise ModelLoadError(f"{_folder_message(text, path)}; nor is it a model name: {e}") from None
        if text.endswith(".gguf"):
            raise ModelLoadError(f"Model file not found: {text} (no such file here; as a name: {e})") from None
        raise


def _folder_message(text: str, path: Path) -> str:
    if (path / "model.gguf").is_file():
        return f"{text} is a folder, not a GGUF file (the model in it is {path / 'model.gguf'})"
    if (path / "config.json").is_file():
        return (f"{text} is a folder, not a GGUF file (a Hugging Face checkpoint? "
                f"`pyengine convert {text} OUT.gguf` makes one)")
    return f"{text} is a folder, not a GGUF file"
