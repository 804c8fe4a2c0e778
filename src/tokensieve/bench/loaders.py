"""Benchmark tasks: the embedded synthetic set, and POPE / GQA through ``datasets``, all as ``Sample`` lists.

Every task yields :class:`tokensieve.embedded.synthetic.Sample` objects (``image``, ``question``, ``answer``,
``family``), so the runner treats them alike. ``family`` is the synthetic family, POPE's ``category``
(adversarial / popular / random) or GQA's structural type (query / verify / logical / choose / compare).

``data`` is a hub name or a local path: a file (``.parquet``, ``.json``, ``.jsonl``, ``.csv``) is read with the
matching ``datasets`` builder, a folder with ``load_dataset(folder)``. Images may be ``datasets`` images (PIL),
``{"bytes", "path"}`` dicts, or file paths (relative ones resolved against the data file's folder or
``image_dir``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..embedded.synthetic import FAMILIES, IMAGE_TOKEN, Sample, get_layout, make_split, prompt_for
from .metrics import exact_match, vqa_match, yes_no_match

TASKS = ("synthetic", "pope", "gqa")
# The answer-format instruction of the LLaVA evaluation scripts for POPE and GQA.
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass
class Task:
    """Samples plus how to prompt and score them."""

    name: str
    samples: list[Sample]
    match: Callable[[str, str], bool]
    max_new_tokens: int
    families: tuple[str, ...] = ()  # display order
    instruction: str = ""  # appended to the question when the processor has a chat template
    source: str = ""
    meta: dict = field(default_factory=dict)


def load_task(
    name: str = "synthetic",
    limit: int | None = None,
    data: str | None = None,
    split: str | None = None,
    image_dir: str | None = None,
    cache_dir: str | None = None,
    layout: str | None = None,
) -> Task:
    """Load a benchmark task with at most ``limit`` questions per family (the first ones, in dataset order).

    ``layout`` is the synthetic task's scene layout (default: the shipped embedded model's)."""
    name = name.lower()
    if name == "synthetic":
        split = split or "test"
        samples = make_split(split, limit if limit is not None else 40, layout=layout)
        return Task(
            name="synthetic",
            samples=samples,
            match=exact_match,
            max_new_tokens=2,
            families=FAMILIES,
            source=f"embedded synthetic, split {split}, layout {get_layout(layout).name}",
        )
    if name == "pope":
        return load_pope(data or "lmms-lab/POPE", split or "test", limit, image_dir, cache_dir)
    if name == "gqa":
        return load_gqa(data or "lmms-lab/GQA", split or "testdev", limit, image_dir, cache_dir)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def load_pope(
    data: str, split: str = "test", limit: int | None = None, image_dir: str | None = None, cache_dir=None
) -> Task:
    """POPE (``question``, ``answer`` yes/no, ``image``, ``category``); one family per category."""
    rows = _load_rows(data, split, cache_dir=cache_dir)
    families = _column(rows, "category", default="pope")
    picked = _first_per_family(families, limit)
    base = _base_dir(data, image_dir)
    subset = rows.select(picked)
    samples = [
        Sample(
            image=_to_image(row["image"], base),
            question=str(row["question"]).strip(),
            answer=str(row["answer"]).strip().lower(),
            family=families[i],
            relevant_tokens=[],
        )
        for i, row in zip(picked, subset, strict=True)
    ]
    return Task(
        name="pope",
        samples=samples,
        match=yes_no_match,
        max_new_tokens=8,
        families=tuple(dict.fromkeys(s.family for s in samples)),
        instruction=SHORT_ANSWER,
        source=f"{data} [{split}]",
    )


def load_gqa(
    data: str,
    split: str = "testdev",
    limit: int | None = None,
    image_dir: str | None = None,
    cache_dir=None,
    config: str | None = "testdev_balanced_instructions",
    images_config: str | None = "testdev_balanced_images",
) -> Task:
    """GQA (``question``, ``answer``, ``image`` or ``imageId``, ``types``); one family per structural type.

    On the hub (``lmms-lab/GQA``) questions and images are separate configs joined on ``imageId``; local files
    carry an ``image`` column, or an ``imageId`` whose file (``<id>.jpg``/``.png``) lies in ``image_dir``.
    """
    local = Path(data).exists()
    rows = _load_rows(data, split, config=None if local else config, cache_dir=cache_dir)
    if "types" in rows.column_names:
        families = [(t.get("structural") or "gqa") if isinstance(t, dict) else "gqa" for t in rows["types"]]
    else:
        families = _column(rows, "category", default="gqa")
    picked = _first_per_family(families, limit)
    subset = rows.select(picked)
    base = _base_dir(data, image_dir)
    by_id: dict[str, object] = {}
    if "image" not in rows.column_names and not local and images_config:
        wanted = set(subset["imageId"])
        images = _load_rows(data, split, config=images_config, cache_dir=cache_dir)
        keep = [i for i, image_id in enumerate(images["id"]) if image_id in wanted]
        by_id = {row["id"]: row["image"] for row in images.select(keep)}
    samples = []
    for i, row in zip(picked, subset, strict=True):
        if "image" in row and row["image"] is not None:
            image = _to_image(row["image"], base)
        elif row.get("imageId") in by_id:
            image = _to_image(by_id[row["imageId"]], base)
        else:
            image = _image_by_id(str(row["imageId"]), base)
        samples.append(
            Sample(
                image=image,
                question=str(row["question"]).strip(),
                answer=str(row["answer"]).strip(),
                family=families[i],
                relevant_tokens=[],
            )
        )
    return Task(
        name="gqa",
        samples=samples,
        match=vqa_match,
        max_new_tokens=8,
        families=tuple(dict.fromkeys(s.family for s in samples)),
        instruction=SHORT_ANSWER,
        source=f"{data} [{split}]",
    )


# ------------------------------------------------------------------------------------------------ prompts


def build_prompt(processor, sample: Sample, task: Task) -> str:
    """The text for ``processor(images=..., text=...)``: chat template when there is one, else a plain prompt.

    The embedded model has no chat template and was trained on :func:`prompt_for`'s format; other processors
    without a template get their image placeholder (wrapped in vision markers when the tokenizer has them, as
    Qwen2-VL needs) followed by the question.
    """
    template = getattr(processor, "chat_template", None)
    if template:
        text = f"{sample.question} {task.instruction}".strip()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
    if image_token == IMAGE_TOKEN:
        return prompt_for(sample)
    vocab = processor.tokenizer.get_vocab()
    if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
        image_token = f"<|vision_start|> {image_token} <|vision_end|>"
    return prompt_for(sample).replace(IMAGE_TOKEN, image_token)


# ------------------------------------------------------------------------------------------------ helpers


def _load_rows(data: str, split: str, config: str | None = None, cache_dir: str | None = None):
    """A ``datasets.Dataset`` from a hub name, a local folder or a local data file."""
    try:
        import datasets
    except ImportError as error:  # an optional extra
        raise ImportError("the pope/gqa tasks need `datasets`: pip install 'tokensieve[data]'") from error
    path = Path(data)
    if path.is_file():
        builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
        if path.suffix not in builders:
            raise ValueError(f"{path}: unsupported data file type; use one of {', '.join(builders)}")
        return datasets.load_dataset(
            builders[path.suffix], data_files={split: str(path)}, split=split, cache_dir=cache_dir
        )
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
    return datasets.load_dataset(data, config, split=split, cache_dir=cache_dir)


def _column(rows, name: str, default: str) -> list[str]:
    if name in rows.column_names:
        return [str(v) if v is not None else default for v in rows[name]]
    return [default] * len(rows)


def _first_per_family(families: list[str], limit: int | None) -> list[int]:
    """Row indices of the first ``limit`` rows of every family, in dataset order."""
    seen: dict[str, int] = {}
    picked = []
    for i, family in enumerate(families):
        if limit is None or seen.get(family, 0) < limit:
            seen[family] = seen.get(family, 0) + 1
            picked.append(i)
    return picked


def _base_dir(data: str, image_dir: str | None) -> Path | None:
    if image_dir:
        return Path(image_dir)
    path = Path(data)
    if path.is_file():
        return path.parent
    return path if path.is_dir() else None


def _to_image(value, base: Path | None) -> Image.Image:
    """A PIL RGB image from a decoded image, a ``{"bytes", "path"}`` dict or a path."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and base is not None:
            path = base / path
        with Image.open(path) as image:
            return image.convert("RGB")
    raise ValueError(f"cannot read an image from {type(value).__name__}")


def _image_by_id(image_id: str, base: Path | None) -> Image.Image:
    if base is None:
        raise ValueError(f"image {image_id!r} has no image column and no image_dir to look it up in")
    for suffix in (".jpg", ".jpeg", ".png"):
        path = base / f"{image_id}{suffix}"
        if path.exists():
            return _to_image(path, None)
    raise FileNotFoundError(f"no image file for imageId {image_id!r} in {base}")
