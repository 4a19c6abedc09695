"""What ``extract`` is asked to do: audio files, folders (searched recursively), list files and manifests → clips,
each an audio path, the name of its output, and its length and rate when a manifest gives them; and a clip's
length from its header only.

Inputs that do not exist and folders that cannot be entered are failures named with their reason, not errors: the
rest of the run goes on. Two inputs that would be written to the same output name are an error before any work.
Inputs are compared by their real path: a file or folder reached through a symlink is the same source.

A manifest (``--manifest FILE``) is for corpora too large to open every file before the first batch: no file it
names is opened or even stat'ed while the run is planned when it gives each clip's duration (the decoder checks
it, and the sample rate, against the audio). Two forms, one clip a line, blank lines and ``#`` comments skipped:

* JSON lines: ``{"path": "a/b.wav", "duration": 3.52, "sample_rate": 16000, "name": "spk1/b"}``
* TSV: ``path<TAB>duration<TAB>sample_rate`` (the last two optional), or columns named by a header line whose
  first field is ``path`` (columns path, duration, sample_rate, name, in any order).

Only ``path`` is required. Relative paths are relative to the manifest's folder, and the output's name is that
relative path without its extension; an absolute path's output is named after the file (as ``--list``), unless the
line gives ``name``.
"""

import json
import math
import os
from typing import NamedTuple, Optional

from . import ExtractError, audio

MANIFEST_COLUMNS = ("path", "duration", "sample_rate", "name")


class Clip(NamedTuple):
    path: str  # as given, or found below a folder given
    name: str  # its output's name without extension: the path below that folder, or the file's own name
    seconds: Optional[float] = None  # from a manifest; None: read from the header when planned
    rate: Optional[int] = None  # from a manifest


def read_list(list_file) -> list:
    """The audio paths of a text file, one per line (blank lines and ``#`` comments skipped)."""
    return [line for _, line in _lines(list_file, "--list")]


def _lines(path, option):
    """[(line number, stripped line)] of a UTF-8 text file, blank lines and ``#`` comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            return [(number, line.strip("\r\n").strip()) for number, line in enumerate(f, 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    except OSError as error:
        raise ExtractError(f"{option} {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ExtractError(f"{option} {path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                           f"{error.start}); save it as UTF-8") from None


def read_manifest(manifest) -> list:
    """[Clip] of a manifest (JSON lines or TSV, see the module's docstring); ExtractError naming the line at fault."""
    lines = _lines(manifest, "--manifest")
    folder = os.path.dirname(os.path.abspath(manifest))
    columns = MANIFEST_COLUMNS[:3]
    if lines and not lines[0][1].startswith("{") and lines[0][1].split("\t")[0].strip() == "path":
        columns = tuple(field.strip() for field in lines[0][1].split("\t"))
        unknown = sorted(set(columns) - set(MANIFEST_COLUMNS))
        if unknown:
            raise ExtractError(f"--manifest {manifest}: line {lines[0][0]}: unknown column(s) {unknown}; the columns "
                               f"are {', '.join(MANIFEST_COLUMNS)}")
        lines = lines[1:]
    clips = []
    for number, line in lines:
        where = f"--manifest {manifest}: line {number}"
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ExtractError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(entry, dict):
                raise ExtractError(f"{where}: expected a JSON object with a \"path\"")
        else:
            fields = line.split("\t")
            if len(fields) > len(columns):
                raise ExtractError(f"{where}: {len(fields)} tab-separated fields, expected at most {len(columns)} "
                                   f"({', '.join(columns)})")
            entry = {column: field.strip() for column, field in zip(columns, fields) if field.strip()}
        clips.append(_manifest_clip(entry, folder, where))
    return clips


def _manifest_clip(entry, folder, where) -> Clip:
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise ExtractError(f"{where}: no \"path\"")
    seconds = _number(entry.get("duration"), float, "duration", where)
    rate = _number(entry.get("sample_rate"), int, "sample_rate", where)
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ExtractError(f"{where}: duration must be a positive number of seconds, got {entry['duration']!r}")
    if rate is not None and rate <= 0:
        raise ExtractError(f"{where}: sample_rate must be a positive number of Hz, got {entry['sample_rate']!r}")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.split("/")):
        raise ExtractError(f"{where}: name must be a relative path inside the output folder, got {name!r}")
    if os.path.isabs(path):
        full, default_name = path, os.path.splitext(os.path.basename(path))[0]
    else:
        full, default_name = os.path.join(folder, path), os.path.splitext(os.path.normpath(path))[0]
    return Clip(full, name or default_name, seconds, rate)


def _number(value, kind, column, where):
    if value is None or value == "":
        return None
    try:
        number = kind(value) if not isinstance(value, bool) else None
        if kind is int and isinstance(value, float) and value != int(value):
            number = None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise ExtractError(f"{where}: {column} {value!r} is not {'a whole number' if kind is int else 'a number'}")
    return number


def gather(paths, list_file=None, manifest=None):
    """([Clip] without repeats (by real path), [(path, error)] for inputs that do not exist and folders that cannot
    be entered). A manifest's clips are taken as they are: a missing one fails when it is decoded."""
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
    if manifest:
        found += read_manifest(manifest)
    unique = {}
    for clip in found:  # the first of the ways to one file wins
        unique.setdefault(os.path.realpath(clip.path), clip)
    check_names(unique.items())
    return list(unique.values()), missing


def check_names(clips):
    """ExtractError if two different files (``(real path, Clip)`` pairs) would be written to the same output."""
    names = {}
    for real, clip in clips:
        if clip.name in names and names[clip.name][0] != real:
            raise ExtractError(f"{names[clip.name][1]} and {clip.path} would both be written to "
                               f"{clip.name}.safetensors; extract them into different --out folders")
        names[clip.name] = (real, clip.path)


def seconds_or_zero(clip) -> float:
    """A clip's length: its manifest's, else from the header; 0 for an unreadable file (whoever extracts it
    reports the error)."""
    if clip.seconds is not None:
        return clip.seconds
    try:
        return audio.audio_info(clip.path).seconds
    except audio.AudioError:
        return 0.0
