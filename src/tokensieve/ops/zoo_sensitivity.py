"""ZOO-Prune's projector sensitivity: zeroth-order (finite differences), forward-mode (JVP) and closed form.

All three estimate how strongly the projector ``M`` amplifies a small random perturbation of a token's input:

- :func:`finite_difference_sensitivity`: ``S(i) = mean_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / 2h`` (the paper's
  Monte-Carlo estimator of ``E_u ||J(x_i) u||``).
- :func:`jvp_sensitivity`: ``sqrt(mean_j ||J(x_i) u_j||^2)`` with ``J u`` from ``torch.func.jvp`` (an estimate of
  ``sqrt(E_u ||J u||^2) = ||J||_F / sqrt(d)``; works for any differentiable projector).
- :func:`exact_mlp_sensitivity`: ``||J(x_i)||_F / sqrt(d)`` in closed form for ``M(x) = W2 act(W1 x + b1) + b2``.

Projector copies (low-rank, other dtype) and the closed form's Gram matrix are cached per projector module and
rebuilt when any of its parameters is modified in place or replaced.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "unit_directions",
    "LowRankLinear",
    "projector_copy",
    "module_caller",
    "finite_difference_sensitivity",
    "jvp_sensitivity",
    "mlp_parts",
    "exact_mlp_sensitivity",
]

Project = Callable[[Tensor], Tensor]

# module -> {(tag, weights_key): value}; weak so a freed model frees its copies.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, object]] = weakref.WeakKeyDictionary()


def _weights_key(module: nn.Module) -> tuple:
    """Identity and in-place version of every parameter: changes when weights are loaded or edited."""
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters())


def _cached(module: nn.Module, tag: tuple, build: Callable[[], object]) -> object:
    entry = _CACHE.setdefault(module, {})
    key = (tag, _weights_key(module))
    if key not in entry:
        for stale in [old for old in entry if old[0] == tag]:
            del entry[stale]
        entry[key] = build()
    return entry[key]


def unit_directions(m: int, d: int, generator: torch.Generator) -> Tensor:
    """``m`` Gaussian directions in ``R^d`` scaled to unit norm, float32 on CPU, shape [m, d]."""
    u = torch.randn(m, d, generator=generator, dtype=torch.float32)
    return u / (u.norm(dim=-1, keepdim=True) + 1e-12)


class LowRankLinear(nn.Module):
    """Rank-``r`` truncated SVD of a linear layer, applied as two thin matmuls: ``(U_r S_r) (V_r^T x) + b``."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        w = linear.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        dtype = linear.weight.dtype
        self.down = nn.Parameter((vh[:rank]).to(dtype), requires_grad=False)  # [r, in]
        self.up = nn.Parameter((u[:, :rank] * s[:rank]).to(dtype), requires_grad=False)  # [out, r]
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features, self.rank = linear.in_features, linear.out_features, rank

    @property
    def weight(self) -> Tensor:
        """The rank-``r`` weight ``[out, in]`` (for closed forms; the forward never builds it)."""
        return self.up @ self.down

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias)


def _copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy that leaves the hooks behind (a hook may be a bound method of a sieve holding the model)."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        for name, value in vars(sub).items():
            if "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(module, memo)


def projector_copy(module: nn.Module, rank: int | None, dtype: torch.dtype) -> nn.Module:
    """A cached copy of ``module`` in ``dtype`` whose linears are rank-``rank`` SVD factorisations.

    Built from the weights the module holds when first asked (so after ``from_pretrained`` loaded them), biases
    kept. A linear whose rank bound ``min(in, out)`` is ``<= rank`` stays dense, so full rank is exact.
    """

    def build() -> nn.Module:
        out = _copy_without_hooks(module)
        if rank is not None:
            for sub in list(out.modules()):
                for name, child in list(sub.named_children()):
                    if isinstance(child, nn.Linear) and rank < min(child.in_features, child.out_features):
                        setattr(sub, name, LowRankLinear(child, rank))
        return out.to(dtype).requires_grad_(False).eval()

    return _cached(module, ("copy", rank, dtype), build)  # type: ignore[return-value]


def _input_width(module: nn.Module) -> int:
    """Width of the rows the module's first layer reads: the first norm's or linear's input size."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, LowRankLinear)):
            return sub.in_features
        weight = getattr(sub, "weight", None)
        if "norm" in type(sub).__name__.lower() and isinstance(weight, Tensor) and weight.dim() == 1:
            return weight.shape[0]
    raise ValueError(f"cannot tell the input width of {type(module).__name__}")


def module_caller(module: nn.Module, d_in: int) -> Project:
    """``[m, d_in] -> [m, D]`` through ``module``, splitting rows when it reads sub-tokens (Qwen's merger reads
    4 patches of ``d_in / 4`` per merged token)."""
    width = _input_width(module)
    if d_in % width:
        raise ValueError(f"{type(module).__name__} reads rows of {width}, which does not divide d_in={d_in}")

    def call(x: Tensor) -> Tensor:
        y = module(x if width == d_in else x.reshape(-1, width))
        return y.reshape(x.shape[0], -1)

    return call


def _tokens_per_chunk(m: int, chunk_rows: int) -> int:
    return max(1, chunk_rows // max(1, m))


def finite_difference_sensitivity(
    project: Project, x: Tensor, directions: Tensor, h: float, chunk_rows: int = 8192
) -> Tensor:
    """Central-difference sensitivity ``mean_j ||M(x + h u_j) - M(x - h u_j)|| / 2h`` per token.

    Parameters
    ----------
    project : callable ``[r, d] -> [r, D]``
        The projector ``M``, run in ``x``'s dtype.
    x : Tensor, shape [N, d]
        Projector inputs.
    directions : Tensor, shape [m, d]
        Unit directions shared by every token.
    h : float
        Step size.
    chunk_rows : int
        Rows (token, direction pairs) per projector call; bounds memory to two ``[chunk_rows, D]`` outputs.

    Returns
    -------
    Tensor, shape [N]
        float32.
    """
    m, d = directions.shape
    n = x.shape[0]
    step = (h * directions.to(device=x.device, dtype=torch.float32)).to(x.dtype)[:, None, :]  # [m, 1, d]
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    size = _tokens_per_chunk(m, chunk_rows)
    for start in range(0, n, size):
        xc = x[start : start + size][None]  # [1, nc, d]
        nc = xc.shape[1]
        delta = project((xc + step).reshape(m * nc, d))
        delta = delta.sub_(project((xc - step).reshape(m * nc, d)))  # direction-major, as in the official code
        out[start : start + nc] = delta.float().norm(dim=-1).view(m, nc).mean(0)
    return out / (2.0 * h)


def jvp_sensitivity(project: Project, x: Tensor, directions: Tensor, chunk_rows: int = 8192) -> Tensor:
    """``sqrt(mean_j ||J(x_i) u_j||^2)`` per token, with the Jacobian-vector products from ``torch.func.jvp``.

    Same parameters as :func:`finite_difference_sensitivity` (no step size). Returns float32 [N].
    """
    m, d = directions.shape
    n = x.shape[0]
    u = directions.to(device=x.device, dtype=x.dtype)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    size = _tokens_per_chunk(m, chunk_rows)
    for start in range(0, n, size):
        xc = x[start : start + size]
        nc = xc.shape[0]
        primal = xc[None].expand(m, nc, d).reshape(m * nc, d).contiguous()  # forward AD rejects stride-0 views
        tangent = u[:, None, :].expand(m, nc, d).reshape(m * nc, d).contiguous()
        _, ju = torch.func.jvp(project, (primal,), (tangent,))
        out[start : start + nc] = ju.float().pow(2).sum(-1).view(m, nc).mean(0).sqrt()
    return out


def mlp_parts(module: nn.Module) -> tuple[nn.Module, Callable[[Tensor], Tensor], nn.Module]:
    """``(linear_1, act, linear_2)`` of a LLaVA-style Linear-activation-Linear projector, or a ValueError."""
    parts = [getattr(module, name, None) for name in ("linear_1", "act", "linear_2")]
    linear_like = (nn.Linear, LowRankLinear)
    if not (isinstance(parts[0], linear_like) and isinstance(parts[2], linear_like) and callable(parts[1])):
        raise ValueError(
            f"estimator='exact' needs a Linear-activation-Linear projector (linear_1, act, linear_2, as in LLaVA); "
            f"{type(module).__name__} is not one. Use estimator='jvp', which estimates the same quantity for any "
            f"differentiable projector (e.g. Qwen's merger with its norm)."
        )
    return parts[0], parts[1], parts[2]  # type: ignore[return-value]


def _frobenius_gram(module: nn.Module) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(W1, b1, G)`` with ``G = (W2^T W2) * (W1 W1^T)`` (elementwise) in float32, cached per module."""

    def build() -> tuple[Tensor, Tensor | None, Tensor]:
        lin1, _, lin2 = mlp_parts(module)
        with torch.no_grad():
            w1 = lin1.weight.detach().float()  # [H, d]
            w2 = lin2.weight.detach().float()  # [D, H]
            gram = (w2.T @ w2).mul_(w1 @ w1.T)  # [H, H]
            b1 = None if lin1.bias is None else lin1.bias.detach().float()
        return w1, b1, gram

    return _cached(module, ("gram",), build)  # type: ignore[return-value]


def exact_mlp_sensitivity(module: nn.Module, x: Tensor, chunk_rows: int = 8192) -> Tensor:
    """``sqrt(E_u ||J(x) u||^2) = ||J(x)||_F / sqrt(d)`` for ``M(x) = W2 act(W1 x + b1) + b2``, in closed form.

    ``J = W2 diag(g) W1`` with ``g = act'(W1 x + b1)``, so ``||J||_F^2 = sum_ab g_a g_b (W2^T W2)_ab (W1 W1^T)_ab
    = g^T G g``; a uniform unit direction has ``E[u u^T] = I / d``, hence ``E||J u||^2 = ||J||_F^2 / d``. ``G``
    [H, H] is computed once per projector. ``act'`` comes from a forward-mode derivative of ``act`` (any
    elementwise activation). Computed in float32.

    Parameters
    ----------
    module : the projector, with ``linear_1``, ``act``, ``linear_2``.
    x : Tensor, shape [N, d]
    chunk_rows : int
        Tokens per ``[rows, H]`` block.

    Returns
    -------
    Tensor, shape [N]
        float32.
    """
    _, act, _ = mlp_parts(module)
    w1, b1, gram = _frobenius_gram(module)
    d = w1.shape[1]
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], max(1, chunk_rows)):
        pre = nn.functional.linear(x[start : start + chunk_rows].float(), w1, b1)  # [rows, H]
        _, g = torch.func.jvp(act, (pre,), (torch.ones_like(pre),))  # act'(pre), elementwise
        frob2 = ((g @ gram) * g).sum(-1).clamp_(min=0.0)  # G is PSD (Schur product); clamp rounding
        out[start : start + pre.shape[0]] = (frob2 / d).sqrt()
    return out
