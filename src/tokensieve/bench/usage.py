"""User errors of the command line: one line that names the problem and the fix, exit status 2, no traceback.

Every argument and path is checked here, before a model loads: argparse ``type=`` functions for values, and
:func:`check_out_dir`, :func:`check_image`, :func:`check_model_spec`, :func:`check_device` for the rest.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

EXIT_USAGE = 2
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UsageError(Exception):
    """A mistake of the user's: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def report(prog: str, error: BaseException) -> int:
    """Print a user error on one line and return the exit status."""
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return EXIT_USAGE


# ------------------------------------------------------------------------------------ argparse value types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass e.g. 10") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def at_least(minimum: int):
    def parse(text: str) -> int:
        value = positive_int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too few: a median needs at least {minimum}")
        return value

    parse.__name__ = f"at_least_{minimum}"
    return parse


# ------------------------------------------------------------------------------------------------ paths


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the run folder (and its parents) and prove it is writable; a file or a read-only place fails."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; pass a folder path for the run")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"cannot write to {flag} {path} ({reason}); pass {flag} to a folder you can write") from None
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """The folder of an output file exists (or can be made) and is writable."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; pass a file name such as {path / 'overlay.png'}")
    check_out_dir(path.parent if str(path.parent) else Path("."), flag=f"{flag} folder")
    return path


def check_image(path: str | Path) -> Path:
    """The image file exists and PIL can read it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image {path} does not exist; pass the path of a PNG or JPEG file")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"{path} is not an image PIL can read ({type(error).__name__}); pass a PNG or JPEG") from None
    return path


def check_model_spec(spec: str | None) -> str | None:
    """``None``/``embedded``, a local folder with ``config.json``, or something shaped like a Hub id."""
    if spec in (None, "", "embedded"):
        from ..embedded.build import EMBEDDED_DIR

        if not (EMBEDDED_DIR / "config.json").exists() or not any(EMBEDDED_DIR.glob("*.safetensors")):
            raise UsageError(
                f"the embedded model's weights are missing from {EMBEDDED_DIR}; train them with "
                f"`tokensieve train-tiny` or pass --model PATH_OR_HUB_ID"
            )
        return None
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {spec} has no config.json; pass a folder saved with save_pretrained()")
        return str(path)
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec
    raise UsageError(f"--model {spec}: no such folder, and not a Hub id (org/name); pass a model folder or Hub id")


def synthetic_layout(spec: str | None) -> str | None:
    """The synthetic scene layout for ``--model``: the ``embedded_layout`` of a local embedded checkpoint,
    else ``None`` (the shipped model's)."""
    if spec in (None, "", "embedded"):
        return None
    from ..embedded.scenes import layout_of_folder

    return layout_of_folder(Path(spec).expanduser(), default=None)


def check_device(device: str | None) -> str | None:
    import torch

    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device; pass cpu, cuda or cuda:0") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; pass --device cpu")
    return device


def check_dtype(dtype: str | None):
    import torch

    if dtype is None:
        return None
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise UsageError(f"--dtype {dtype!r} is not a torch dtype; pass float32, bfloat16 or float16")
    return value


def in_launcher() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
