"""Neuron and head alignment of two decoder layers by optimal transport (for OpT-DeUS, expand.py).

    python -c "from posttrain.expand.align import align_layer; help(align_layer)"

The transport problem. Layer A's output neurons (rows of q/k/v, gate/up) are moved onto layer
B's with uniform marginals (1/n each) and a squared-Euclidean cost between weight rows. With as
many neurons on both sides, the optimal plans form the Birkhoff polytope of doubly stochastic
matrices / n; a linear cost attains its minimum at a vertex, which is a permutation matrix
(Birkhoff-von Neumann). So exact OT here IS the assignment problem, and we solve it exactly
(`linear_assignment`: scipy's solver when scipy is installed, else our own O(n^3)
shortest-augmenting-path Hungarian; both are exact, they may differ only between tied optima).
We do not use a Sinkhorn plan: its entropic blur averages each neuron of B with a soft mixture
of A's neurons, which shrinks the fused weights towards the mean row, and a "permutation-like"
rounding of it is just an approximate assignment.

What is matched as a unit (rows inside a unit are never reordered):
- MLP neuron i = (gate row i, up row i, bias entries); its down column follows it.
- Attention: whole heads (head_dim rows: the dimensions inside a RoPE head are rotated in pairs
  and are not interchangeable; q_norm / k_norm act on head_dim and are shared by all heads, so
  they stay valid). With grouped KV heads (g = n_q / n_kv query heads per KV head) the map is
  two-level and keeps every query head with its KV head: KV groups are matched as units, at a
  cost = |k head|^2 + |v head|^2 distances + the cost of the best assignment of the g query
  heads of one group to the g of the other (solved exactly per pair of groups); then each
  query head is permuted only inside its matched group. o_proj's columns follow the query heads.
- MoE: routed experts are matched as units by their router rows (the expert's direction in the
  residual stream, which decides which tokens reach it), then each matched expert's neurons
  are aligned as a dense MLP; A's router rows are reordered with its experts. A shared expert is
  aligned as a dense MLP; its gate (one row) needs no alignment.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def linear_assignment(cost) -> np.ndarray:
    """perm (n,) minimising sum_i cost[i, perm[i]] over permutations of a square cost matrix."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n != m:
        raise ValueError(f"linear_assignment: cost is {n} x {m}; expected a square matrix")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return _hungarian(cost)
    return linear_sum_assignment(cost)[1]


def _hungarian(cost: np.ndarray) -> np.ndarray:
    """Exact assignment by shortest augmenting paths with potentials (Kuhn-Munkres, O(n^3)).

    Rows are added one at a time; a Dijkstra-like search over reduced costs
    cost[i, j] - u[i] - v[j] >= 0 finds the cheapest path to a free column, then the matching is
    flipped along it. Index 0 of the column arrays is a virtual start column.
    """
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: 1-based row matched to column j, 0 free
    way = np.zeros(n + 1, dtype=np.int64)  # previous column on the shortest path
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        min_to = np.full(n + 1, np.inf)  # cheapest reduced path cost to each column
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]  # (n,)
            better = free & (reduced < min_to[1:])
            min_to[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, min_to[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            done = np.nonzero(used)[0]
            u[row_of[done]] += delta
            v[done] -= delta
            min_to[1:][free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the matching along the path
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    perm[row_of[1:] - 1] = np.arange(n)
    return perm


def match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(perm, cost): a[perm] is the order of a's units (rows) closest to b's, and its cost.

    perm[j] = the unit of a sent to unit j of b; a, b: (n, d) feature rows.
    """
    cost = torch.cdist(b.double(), a.double()).pow(2)  # (n_b, n_a)
    perm = linear_assignment(cost.numpy())
    return torch.as_tensor(perm), float(cost[torch.arange(len(perm)), perm].sum())


def _rows(linear: nn.Linear) -> torch.Tensor:
    """Weight rows with the bias as one more column: (out, in [+1])."""
    w = linear.weight.detach()
    return w if linear.bias is None else torch.cat([w, linear.bias.detach()[:, None]], dim=1)


def head_features(linear: nn.Linear, n_heads: int) -> torch.Tensor:
    """(n_heads, head_dim * (in [+1])): each head's rows flattened, in their own order."""
    return _rows(linear).reshape(n_heads, -1)


def match_heads(attn_a, attn_b, n_q: int, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_perm, kv_perm), head indices of A for each head of B, consistent with the KV groups."""
    g = n_q // n_kv
    qa = head_features(attn_a.q_proj, n_q).reshape(n_kv, g, -1)
    qb = head_features(attn_b.q_proj, n_q).reshape(n_kv, g, -1)
    kva = torch.cat([head_features(attn_a.k_proj, n_kv), head_features(attn_a.v_proj, n_kv)], 1)
    kvb = torch.cat([head_features(attn_b.k_proj, n_kv), head_features(attn_b.v_proj, n_kv)], 1)
    group_cost = torch.cdist(kvb.double(), kva.double()).pow(2)  # (n_kv B, n_kv A)
    inner = {}
    for gb in range(n_kv):
        for ga in range(n_kv):
            inner[gb, ga], c = match(qa[ga], qb[gb])
            group_cost[gb, ga] += c
    kv_perm = torch.as_tensor(linear_assignment(group_cost.numpy()))
    q_perm = torch.cat([kv_perm[gb] * g + inner[gb, int(kv_perm[gb])] for gb in range(n_kv)])
    return q_perm, kv_perm


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads: head h -> rows h*head_dim ... h*head_dim + head_dim - 1."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _take_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[rows]
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[rows]


def permute_attention(attn, q_perm: torch.Tensor, kv_perm: torch.Tensor, head_dim: int) -> None:
    """Reorder whole heads in place: q by q_perm, k and v by kv_perm, o_proj's columns with q.

    The output is unchanged when q_perm keeps each query head with its KV head, i.e.
    q_perm[h] // g == kv_perm[h // g] for the group size g.
    """
    q_rows, kv_rows = head_rows(q_perm, head_dim), head_rows(kv_perm, head_dim)
    _take_rows(attn.q_proj, q_rows)
    _take_rows(attn.k_proj, kv_rows)
    _take_rows(attn.v_proj, kv_rows)
    attn.o_proj.weight.data = attn.o_proj.weight.data[:, q_rows]


def mlp_features(mlp) -> torch.Tensor:
    """(intermediate, 2 * hidden [+2]): neuron i = (gate row i, up row i)."""
    return torch.cat([_rows(mlp.gate_proj), _rows(mlp.up_proj)], dim=1)


def permute_mlp(mlp, perm: torch.Tensor) -> None:
    """Reorder a dense MLP's neurons in place: gate and up rows, down columns (output unchanged)."""
    _take_rows(mlp.gate_proj, perm)
    _take_rows(mlp.up_proj, perm)
    mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, perm]


def expert_features(experts, e: int) -> torch.Tensor:
    """(moe_intermediate, 2 * hidden): expert e's neuron rows (gate | up) of the fused tensor."""
    gate, up = experts.gate_up_proj.detach()[e].chunk(2, dim=0)  # each (I, H)
    return torch.cat([gate, up], dim=1)


def permute_experts(moe, expert_perm: torch.Tensor, neuron_perms: list[torch.Tensor]) -> None:
    """Reorder routed experts (with their router rows) and each expert's neurons, in place.

    expert_perm[j]: which expert comes to place j; neuron_perms[j]: its neuron order there.
    """
    experts = moe.experts
    gate_up, down = experts.gate_up_proj.data, experts.down_proj.data  # (E, 2I, H), (E, H, I)
    new_gate_up, new_down = gate_up[expert_perm].clone(), down[expert_perm].clone()
    inter = down.shape[-1]
    for j, perm in enumerate(neuron_perms):
        new_gate_up[j] = torch.cat([new_gate_up[j, :inter][perm], new_gate_up[j, inter:][perm]])
        new_down[j] = new_down[j][:, perm]
    experts.gate_up_proj.data, experts.down_proj.data = new_gate_up, new_down
    moe.gate.weight.data = moe.gate.weight.data[expert_perm]


def is_moe(mlp) -> bool:
    return hasattr(mlp, "experts") and hasattr(getattr(mlp, "experts"), "gate_up_proj")


def align_layer(a: nn.Module, b: nn.Module, n_q: int, n_kv: int, head_dim: int) -> dict:
    """Permute decoder layer `a` in place into `b`'s head and neuron order; returns the maps.

    Both layers must have q/k/v/o_proj attention and the same MLP kind (dense gate/up/down, or
    fused routed experts + router, with an optional shared_expert).
    """
    q_perm, kv_perm = match_heads(a.self_attn, b.self_attn, n_q, n_kv)
    permute_attention(a.self_attn, q_perm, kv_perm, head_dim)
    maps = {"q_heads": q_perm.tolist(), "kv_heads": kv_perm.tolist()}
    if is_moe(b.mlp):
        expert_perm, _ = match(a.mlp.gate.weight.detach(), b.mlp.gate.weight.detach())
        neuron_perms = [
            match(expert_features(a.mlp.experts, int(ea)), expert_features(b.mlp.experts, eb))[0]
            for eb, ea in enumerate(expert_perm)
        ]
        permute_experts(a.mlp, expert_perm, neuron_perms)
        maps["experts"] = expert_perm.tolist()
        if getattr(b.mlp, "shared_expert", None) is not None:
            perm, _ = match(mlp_features(a.mlp.shared_expert), mlp_features(b.mlp.shared_expert))
            permute_mlp(a.mlp.shared_expert, perm)
    else:
        perm, _ = match(mlp_features(a.mlp), mlp_features(b.mlp))
        permute_mlp(a.mlp, perm)
        maps["mlp_neurons_moved"] = int((perm != torch.arange(len(perm))).sum())
    return maps
