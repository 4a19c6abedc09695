"""What ``extract`` is asked to do: audio files, folders (searched recursively) and list files → clips, each an
audio path and the name of its output; and a clip's length, from its header only.

Inputs that do not exist and folders that cannot be entered are failures named with their reason, not errors: the
rest of the run goes on. Two inputs that would be written to the same output name are an error before any work.
"""

import os
from typing import NamedTuple

from . import audio
from .errors import ExtractError


class Clip(NamedTuple):
    path: str  # as given, or found below a folder given
    name: str  # its output's name without extension: the path below that folder, or the file's own name


def read_list(list_file) -> list:
    """The audio paths of a text file, one per line (blank lines and ``#`` comments skipped)."""
    try:
        with open(list_file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as error:
        raise ExtractError(f"--list {list_file}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ExtractError(f"--list {list_file}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                           f"{error.start}); save it as UTF-8") from None


def gather(paths, list_file=None):
    """([Clip] without repeats, [(path, error)] for inputs that do not exist and folders that cannot be
    entered)."""
    if list_file:
        paths = list(paths) + read_list(list_file)
    found, missing = [], []

    def unreadable_folder(error):
        missing.append((error.filename, f"{error.filename}: cannot enter this folder ({error.strerror}); "
                                        f"the audio in it was not extracted"))

    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path, onerror=unreadable_folder):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(audio.AUDIO_EXTENSIONS):
                        full = os.path.join(root, name)
                        found.append(Clip(full, os.path.splitext(os.path.relpath(full, path))[0]))
        elif os.path.exists(path):
            found.append(Clip(path, os.path.splitext(os.path.basename(path))[0]))
        else:
            missing.append((path, f"{path}: no such file or folder"))
    check_names(found)
    unique = list({os.path.abspath(clip.path): clip for clip in found}.values())
    return unique, missing


def check_names(clips):
    """ExtractError if two different files would be written to the same output."""
    names = {}
    for path, name in clips:
        if name in names and os.path.abspath(names[name]) != os.path.abspath(path):
            raise ExtractError(f"{names[name]} and {path} would both be written to {name}.safetensors; "
                               f"extract them into different --out folders")
        names[name] = path


def seconds_or_zero(path) -> float:
    """Audio length from the header; 0 for an unreadable file (whoever extracts it reports the error)."""
    try:
        return audio.audio_info(path).seconds
    except audio.AudioError:
        return 0.0
