"""Output paths, checked before any work starts: a long run must not end on a path it cannot write, and no
output may replace a file of its inputs."""

import os


def check_output_file(path: str, flag: str, suffix: str = "", overwrite: bool = False, protected: tuple[str, ...] = ()) -> None:
    """Refuse (ValueError, naming ``flag``) a file path with another ``suffix``, a folder, an existing file unless
    ``overwrite``, any file of the ``protected`` inputs (model folders or files, deltas), and a place where no file
    can be written."""
    if suffix and not path.lower().endswith(suffix):
        raise ValueError(f"{flag} {path!r} should end with {suffix}.")
    if path.endswith(os.sep) or os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give the path of a file in it, e.g. {os.path.join(path, 'out' + suffix)!r}.")
    if os.path.lexists(path):
        for given in protected:
            if is_within(path, given):
                raise ValueError(f"{flag} {path!r} is a file of the input {given!r}; write somewhere else.")
        if not overwrite:
            raise ValueError(f"{flag} {path!r} already exists; choose a new path, or add --overwrite to replace it.")
    check_output_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_new_folder(path: str, flag: str) -> None:
    """Refuse a path for a new output folder that exists already or cannot be made."""
    if os.path.lexists(path):
        raise ValueError(f"{flag} {path!r} already exists; choose a new path or remove it first.")
    check_output_folder(os.path.dirname(os.path.abspath(path.rstrip(os.sep))), flag)


def check_output_folder(folder: str, flag: str) -> None:
    """Refuse a folder that cannot be made or written: the nearest part of its path that exists must be a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag}: {existing!r} is not a folder, so none can be made there; choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write to the folder {existing!r}; choose another path.")


def is_within(path: str, root: str) -> bool:
    """Whether writing ``path`` would change ``root`` or a file inside it: the file ``path`` links to, or the entry
    its folder holds (a Hugging Face cache folder holds links into its blobs), after following the folders' links."""
    root = os.path.realpath(root)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    written = (os.path.realpath(path), os.path.join(folder, os.path.basename(path)))
    return any(place == root or place.startswith(root.rstrip(os.sep) + os.sep) for place in written)
