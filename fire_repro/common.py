"""The bottom of the imports: what every script shares and that knows nothing of training.

    UserError, cli(main)         a user's mistake is one line on stderr and exit code 2
    ArgumentParser, Range        argparse with one-line errors; the ranges of numeric flags
    write_atomic, check_output   outputs written whole or not at all, checked before the work
    check_input_file, read_json, read_arrays, sha256_file, lock_folder   inputs and run folders
    eps_text, fmt_hours          a radius as people write it (8/255) and as file names hold it; a duration

It imports nothing of this repository and not torch, so that gaussian_demo.py stays light.
"""
import argparse
import hashlib
import json
import math
import os
import signal
import sys

import numpy as np


class UserError(Exception):
    """A problem with the user's input (flags, files, data): reported as one line, exit code 2."""


def cli(main, argv=None):
    """Run main() (main(argv) when argv is given) for the command line. A UserError, an OSError (a
    full disk, a folder made read-only mid-run: every committed file is intact) or running out of
    memory end with one line on stderr and exit code 2, Ctrl-C or a stop signal with exit code 130.
    The line starts with the script's name (main's file; for a lambda, the command's)."""
    module = sys.modules.get(getattr(main, "__module__", None))
    named = main.__name__ != "<lambda>" and getattr(module, "__file__", None)
    prog = os.path.basename(module.__file__ if named else sys.argv[0])
    try:
        return main() if argv is None else main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f": {e.filename!r}" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError (CUDA) is a RuntimeError
        if not (type(e).__name__ in ("OutOfMemoryError", "MemoryError") or "can't allocate memory" in str(e)):
            raise
        print(f"{prog}: error: out of memory ({type(e).__name__}): lower --batch-size or the size of "
              f"the model", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: under cli() one line and exit code 2 instead of argparse's
    usage block, and code that parses a script's flags (the plan of run_all.sh) gets the message."""

    def error(self, message):
        raise UserError(message)


class Range:
    """The values a numeric flag accepts: an interval, closed unless an end is marked open. `in`
    tests a value (finite and inside); str() is the range as a flag's help and error give it."""

    def __init__(self, low, high, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def __contains__(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self):
        low, high = (v if isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def check_ranges(parser, args, ranges):
    """parser.error (one line, exit 2) for the first flag in `ranges` ({dest: Range}) with a value,
    or one of its values, outside its range; flags left unset (None) are skipped."""
    for name, allowed in ranges.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in allowed:
                parser.error(f"--{name.replace('_', '-')} must be {allowed}, got {v}")


def eps_text(eps, sep="/"):
    """A radius as the papers write it: 8/255 for a small multiple of 1/255, else 0.3 or 0.5.
    sep="-" gives the form file names hold (8-255)."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0 and eps < 0.1:
        return f"{round(k)}{sep}255"
    return f"{eps:g}"


def fmt_hours(seconds):
    """A duration as the paper's RunTime column writes it: 11h00 (hours and minutes); seconds below
    one minute; '-' when unknown (not finite)."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Files


def write_atomic(path, write, binary=False, what="output"):
    """write(f) into a temporary file beside `path`, flushed to the disk, then renamed over `path`:
    a reader (or a rerun after a kill or a power cut) sees the old file or the new one, never half
    of one. A failure is a UserError and leaves no temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {what} {path!r}: {e.strerror or e}") from None
        raise


def write_json(path, record, what="output"):
    """`record` as indented JSON, written atomically (write_atomic)."""
    write_atomic(path, lambda f: json.dump(record, f, indent=1), what=what)


def check_output(path, what, make_folder=True):
    """Refuse, before any work starts, an output file that is a folder or cannot be written (its
    folder is created, or with make_folder=False must exist). Raises UserError."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not make_folder and not os.path.isdir(folder):
        raise UserError(f"{what} {path!r}: {folder!r} "
                        f"{'is not a folder' if os.path.exists(folder) else 'does not exist'}")
    probe = os.path.join(folder, f".write-test{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} {path!r}: {e.strerror or e}") from None


def check_input_file(path, what):
    """Raise UserError saying exactly why `path` cannot be read as a file (`what` names the flag)."""
    if os.path.isfile(path) and os.access(path, os.R_OK):
        return
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a directory, not a file")
    if os.path.islink(path):
        raise UserError(f"{what} {path!r} is a broken symbolic link or a link loop")
    if os.path.exists(path):
        raise UserError(f"{what} {path!r} is not a readable regular file")
    raise UserError(f"{what} {path!r} does not exist")


def load_json(path):
    """The JSON value in `path`. Raises OSError when it cannot be read: missing, or not a regular
    file (a FIFO would block the reader forever), and ValueError when it is not whole JSON
    (damaged, not UTF-8, or nested too deeply for the parser)."""
    if not os.path.isfile(path):
        raise OSError(f"{path!r} {'is not a regular file' if os.path.exists(path) else 'does not exist'}")
    with open(path, "rb") as f:
        try:
            return json.load(f)
        except RecursionError:
            raise ValueError(f"{path!r} is nested too deeply") from None


def read_json(path):
    """The JSON value in `path`, or None when the file is missing, not a regular file or not whole
    JSON (load_json)."""
    try:
        return load_json(path)
    except (OSError, ValueError):
        return None


def read_arrays(path):
    """Every array of an .npz file, read in full, or None when the file is missing or damaged
    (truncated, not a zip, a member that does not decompress, pickled objects) or not a regular
    file (a FIFO would block)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception:  # noqa: BLE001  (BadZipFile, zlib.error, EOFError, ValueError, OSError, ...)
        return None


_HASHES = {}


def sha256_file(path):
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints can be hundreds of MB); cached per
    (path, size, modification time) within this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def lock_folder(folder, what, busy="it is in use by another running training or evaluation (wait for it to end)"):
    """Create `folder` and take its exclusive lock (<folder>/.lock) for as long as the returned file
    is open; the kernel releases it when the process ends, SIGKILL included. Every training and
    every evaluation that writes into a run folder takes this one lock, so a second one stops here
    (UserError: `what` `folder`: `busy`); run_all.sh takes it on its OUT_DIR."""
    import fcntl
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to {what} {folder!r}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"{what} {folder!r}: {busy}") from None
    return lock


class OnSignals:
    """While entered, the signals of SIGNALS call self.stop(signum, frame); the previous handlers
    come back on exit."""
    SIGNALS = ()

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.stop) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
