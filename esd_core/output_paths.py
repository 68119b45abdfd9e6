"""Output paths, checked before any work starts: a long run must not end on a path it cannot write, and no
output may replace a file of the input model."""

import os


def check_output_file(path: str, flag: str, suffix: str = "", overwrite: bool = False, protected: str | None = None) -> None:
    """Refuse (ValueError, naming ``flag``) a file path with another ``suffix``, an existing folder, an existing
    file unless ``overwrite``, any file of the ``protected`` input (a model folder or file), and a place where
    no file can be written."""
    if suffix and not path.lower().endswith(suffix):
        raise ValueError(f"{flag} {path!r} should end with {suffix}.")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give the path of a file in it, e.g. {os.path.join(path, 'out' + suffix)!r}.")
    if os.path.exists(path):
        if protected and is_within(path, protected):
            raise ValueError(f"{flag} {path!r} is a file of the input model {protected!r}; write somewhere else.")
        if not overwrite:
            raise ValueError(f"{flag} {path!r} already exists; choose a new path, or add --overwrite to replace it.")
    check_output_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_output_folder(folder: str, flag: str) -> None:
    """Refuse a folder that cannot be made or written: the nearest part of its path that exists must be a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag}: {existing!r} is a file, so no folder can be made there; choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write to the folder {existing!r}; choose another path.")


def is_within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies inside it, after following links."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
