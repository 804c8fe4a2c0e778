"""Write the shipped sample picture (``embedded/model/sample.png``) for the shipped model's scene layout.

``python scripts/make_sample_image.py [--model-dir DIR]``: the first seeded colour question whose text is
``SAMPLE_QUESTION`` and whose answer is ``SAMPLE_ANSWER``, drawn in the layout the checkpoint was trained on,
checked against the model's own answer (so the README quick start prints what it says it prints).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tokensieve.embedded import SAMPLE_ANSWER, SAMPLE_QUESTION
from tokensieve.embedded.build import EMBEDDED_DIR, load_embedded
from tokensieve.embedded.check import layout_of
from tokensieve.embedded.evaluate import answer
from tokensieve.embedded.synthetic import make_sample


def find_sample(layout: str, tries: int = 1000):
    for seed in range(tries):
        sample = make_sample("color", SAMPLE_ANSWER, np.random.default_rng([7, seed]), layout=layout)
        if sample.question == SAMPLE_QUESTION:
            return sample
    raise RuntimeError(f"no seed below {tries} gives {SAMPLE_QUESTION!r} -> {SAMPLE_ANSWER!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=EMBEDDED_DIR)
    args = parser.parse_args()
    model, processor = load_embedded(path=args.model_dir)
    sample = find_sample(layout_of(model))
    reply = answer(model, processor, [sample])[0]
    if reply != SAMPLE_ANSWER:
        raise SystemExit(f"the model answers {reply!r}, not {SAMPLE_ANSWER!r}, on the sample; not written")
    sample.image.save(args.model_dir / "sample.png")
    print(f"wrote {args.model_dir / 'sample.png'} ({sample.image.size[0]}x{sample.image.size[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
