"""Probe multivalue's retrieval circuit in an embedded KV model (docs/kv/embedded_model.md, "What is left").

    PYTHONPATH=src python scripts/kv_chain_probe.py src/tokensieve/kv/model --length 1024 --n 32

For ``n`` multivalue samples (``n_distract=8``, the answer teacher-forced) it prints:
- the chain head (layer 1, head 0) at each needle's value slot v1, v2, v3: attention mass on itself, on BOS and
  on the earlier value slots of its key;
- the lookup head (last layer, head 0) at the rows of answers 1-3: mass on the three value slots;
- the teacher-forced accuracy of each answer token;
- v3's chain mass on v2 and v1 against the gap ratio d(v3, v1) / d(v3, v2) (a head that knows recency prefers
  v2 more as the ratio grows).
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import LlamaForCausalLM

from tokensieve.kv.tasks import make_sample


@torch.no_grad()
def probe(model, length: int, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    chain, lookup, correct, gaps = torch.zeros(3, 4), torch.zeros(3, 3), torch.zeros(3), []
    for _ in range(n):
        s = make_sample("multivalue", length, rng, n_distract=8)
        out = model(torch.tensor([s.prompt + s.answer]), output_attentions=True)
        slots = [p + 2 for p in s.needle_pos]
        a1, a_last = out.attentions[1][0, 0], out.attentions[-1][0, 0]
        for j, slot in enumerate(slots):
            chain[j, 0] += a1[slot, slot]
            chain[j, 1] += a1[slot, 0]
            for i in range(j):
                chain[j, 2 + i] += a1[slot, slots[i]]
        for j in range(3):
            row = len(s.prompt) - 1 + j
            lookup[j] += a_last[row, slots]
            correct[j] += int(out.logits[0, row].argmax()) == s.answer[j]
        ratio = (slots[2] - slots[0]) / (slots[2] - slots[1])
        gaps.append((ratio, float(a1[slots[2], slots[1]]), float(a1[slots[2], slots[0]])))
    return {"chain": chain / n, "lookup": lookup / n, "accuracy": correct / n, "gaps": sorted(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(args.model, attn_implementation="eager").eval()
    got = probe(model, args.length, args.n, args.seed)
    print("chain head (rows v1, v2, v3; columns self, BOS, v1, v2):\n", got["chain"].numpy().round(3))
    print("lookup head (rows answers 1-3; columns slots v1, v2, v3):\n", got["lookup"].numpy().round(3))
    print("teacher-forced accuracy per answer:", got["accuracy"].numpy().round(3))
    for ratio, on_v2, on_v1 in got["gaps"][:: max(1, args.n // 8)]:
        print(f"v3's chain: d31/d32 {ratio:5.2f}  mass on v2 {on_v2:.2f}  on v1 {on_v1:.2f}")


if __name__ == "__main__":
    main()
