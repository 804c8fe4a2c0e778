"""Growing a trained shallower model into a deeper one for ``scripts/kv_train.py --grow-from``.

The embedded model's 2-layer circuit (previous-token head, then lookup) learns single, multikey and vartrack;
multivalue's ordered walk needs one more attention step between them (``train_attention``'s chain head). Rather
than waiting out a 3-layer model's plateau from scratch, the trained layers keep their places at the bottom and
the top, and the new middle layers start as the identity (zero attention and MLP output projections), so the
grown model computes exactly what the trained one did until the new layers learn.
"""

from __future__ import annotations

import torch


def layer_map(old_layers: int, new_layers: int) -> dict[int, int]:
    """Old layer index -> new index: the first ``old - 1`` layers stay, the last one goes to the top."""
    if not 1 <= old_layers <= new_layers:
        raise ValueError(f"cannot grow {old_layers} layers into {new_layers}")
    mapping = {i: i for i in range(old_layers - 1)}
    mapping[old_layers - 1] = new_layers - 1
    return mapping


def grow_into(model, old_state: dict[str, torch.Tensor]) -> list[int]:
    """Load ``old_state`` (a shallower model's state dict) into ``model``; returns the new, identity layers."""
    n_new = model.config.num_hidden_layers
    n_old = 1 + max(int(k.split(".")[2]) for k in old_state if k.startswith("model.layers."))
    mapping = layer_map(n_old, n_new)
    state = {}
    for name, tensor in old_state.items():
        if name.startswith("model.layers."):
            parts = name.split(".")
            parts[2] = str(mapping[int(parts[2])])
            name = ".".join(parts)
        state[name] = tensor
    fresh = [i for i in range(n_new) if i not in mapping.values()]
    with torch.no_grad():
        for i in fresh:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(tuple(f"model.layers.{i}." for i in fresh)) for k in missing):
        raise ValueError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")
    return fresh
