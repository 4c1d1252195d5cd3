"""Per-token log-probabilities that keep no (B, T, V) float32 tensor for backward.

    python -c "from posttrain.losses.logprobs import linear_token_logps; help(linear_token_logps)"

log softmax(z)[y] = z_y - logsumexp(z), and its gradient w.r.t. z is onehot(y) - softmax(z).
Plain autograd through `logsumexp(logits.float())` keeps the float32 input of logsumexp until
backward: with bf16 logits that is a second copy of every logit at twice the size, and with a
152k vocabulary the largest activation of a training step. Two autograd functions avoid it:

- `chunked_token_logps(logits, labels)`: the model already returned the logits; forward and
  backward run over chunks of positions, each upcast to float32 only while it is processed.
  Saved for backward: the logits as they are (no copy) and one float32 logsumexp a position.
- `linear_token_logps(hidden, weight, labels)`: the language-model head fused in. Logits are
  made from the hidden states (R, T, H) and the head weight (V, H) one chunk of positions at a
  time; backward needs each chunk again. Saved: the hidden states of labelled positions (H a
  position, not V), the weight (it exists anyway) and the logsumexp; plus, up to `keep_bytes`
  (KEEP_BYTES, 64 MiB), the chunks' logits as the head returned them (bf16 on a bf16 model),
  so backward does not make those again: the head's matmul is about a tenth of a LoRA step's
  compute on SmolLM2 (V 49k, H 576). Chunks beyond the budget are made again in backward, so
  the memory never grows with the vocabulary past it. Either way the values are bitwise the
  same (the same matmul gives the same logits). Positions without a label (prompt, padding)
  are never projected at all.

`token_entropy(logits)` (no gradient; the online loss's entropy metric) runs over the same
chunks.

Chunks hold at most CHUNK_ELEMENTS float32 logits (32 MiB): 170 positions at a 49k vocabulary,
55 at 152k.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23
KEEP_BYTES = 64 << 20  # logits the fused head keeps for backward


def _rows_per_chunk(vocab: int, chunk_elements: int | None) -> int:
    return max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab)


def _label_grad(
    z: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    grad: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """d(z_y - lse(z)) * grad for one chunk: grad * (onehot(y) - softmax(z)); float32 (n, V).
    inplace: z is a scratch float32 copy and becomes the result (no (n, V) temporaries)."""
    d = z.sub_(lse.unsqueeze(-1)).exp_() if inplace else torch.exp(z - lse.unsqueeze(-1))
    d.mul_(-grad.unsqueeze(-1))  # (n, V)
    return d.scatter_add_(1, labels.unsqueeze(-1), grad.unsqueeze(-1))


def _chunks(B: int, T: int, rows: int):
    """(b, positions) index pairs covering a (B, T, ...) tensor, at most `rows` positions each."""
    return [(b, slice(s, s + rows)) for b in range(B) for s in range(0, T, rows)]


class _ChunkedLogSoftmax(torch.autograd.Function):
    """(B, T, V) logits, (B, T) valid label ids -> (B, T) float32 log-probs, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, labels, rows):
        B, T, _ = logits.shape
        out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for b, sl in _chunks(B, T, rows):
            z = logits[b, sl].float()  # (n, V), a view when the logits are float32
            lse[b, sl] = torch.logsumexp(z, dim=-1)
            out[b, sl] = z.gather(1, labels[b, sl, None]).squeeze(1) - lse[b, sl]
        ctx.save_for_backward(logits, labels, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, sl in _chunks(*logits.shape[:2], ctx.rows):
            out[b, sl] = _label_grad(
                logits[b, sl].float(), lse[b, sl], labels[b, sl], grad[b, sl].float()
            )
        return out, None, None


class _LinearLogSoftmax(torch.autograd.Function):
    """(N, H) hidden, (V, H) weight, (V,) bias or None, (N,) label ids -> (N,) float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, keep_bytes):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        kept, room = [], keep_bytes  # the first chunks' logits, while they fit in keep_bytes
        for s in range(0, hidden.shape[0], rows):
            logits = F.linear(hidden[s : s + rows], weight, bias)  # (n, V)
            if len(kept) == s // rows and logits.nbytes <= room:  # a prefix of the chunks
                kept.append(logits)
                room -= logits.nbytes
            z = logits.float()
            lse[s : s + rows] = torch.logsumexp(z, dim=-1)
            out[s : s + rows] = (
                z.gather(1, labels[s : s + rows, None]).squeeze(1) - lse[s : s + rows]
            )
        ctx.save_for_backward(hidden, weight, bias, labels, lse, *kept)
        ctx.rows = rows
        # Under autocast (bf16 compute over fp32 master weights) the logits are made again in
        # backward the way forward made them, so they match the saved logsumexp.
        kind = hidden.device.type
        ctx.autocast = (
            (kind, torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse, *kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # A trained head (full fine-tuning) accumulates its gradient over chunks in float32.
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if need_b
            else None
        )
        for i, s in enumerate(range(0, hidden.shape[0], ctx.rows)):
            sl = slice(s, s + ctx.rows)
            if i < len(kept):
                z = kept[i].float()  # (n, V); a copy even when float32 (changed in place)
                z = z.clone() if z is kept[i] else z
            else:
                with torch.autocast(*ctx.autocast) if ctx.autocast else contextlib.nullcontext():
                    z = F.linear(hidden[sl], weight, bias).float()  # (n, V), made again
            d = _label_grad(z, lse[sl], labels[sl], grad[sl].float(), inplace=True)  # (n, V)
            if need_b:
                grad_b += d.sum(0)
            d = d.to(weight.dtype)
            if need_h:
                grad_h[sl] = d @ weight  # (n, H)
            if need_w:
                grad_w += (d.t() @ hidden[sl]).float()  # (V, H)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def _check(name: str, x: torch.Tensor, labels: torch.Tensor) -> None:
    if x.dim() != 3 or labels.shape != x.shape[:2]:
        what = "logits (B, T, V)" if name == "token_logps" else "hidden (B, T, H)"
        raise ValueError(
            f"{name}: expected {what} and labels (B, T), got {tuple(x.shape)} and "
            f"{tuple(labels.shape)}"
        )


def chunked_token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """log softmax(logits)[label], float32 (B, T); 0.0 where label == ignore_index."""
    _check("token_logps", logits, labels)
    ignored = labels == ignore_index  # (B, T)
    safe = labels.masked_fill(ignored, 0)  # gather needs a valid index everywhere
    out = _ChunkedLogSoftmax.apply(logits, safe, _rows_per_chunk(logits.shape[-1], chunk_elements))
    return out.masked_fill(ignored, 0.0)  # (B, T)


@torch.no_grad()
def token_entropy(
    logits: torch.Tensor, temperature: float = 1.0, chunk_elements: int | None = None
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position, float32 (B, T); no gradient.

    Chunk by chunk like chunked_token_logps: at most CHUNK_ELEMENTS positions x vocabulary
    are upcast to float32 at once, never a (T, V) float32 copy of a long sequence's logits.
    H = logsumexp(z) - sum softmax(z) * z, z the tempered logits of one position.
    """
    if logits.dim() != 3:
        raise ValueError(f"token_entropy: expected logits (B, T, V), got {tuple(logits.shape)}")
    B, T, V = logits.shape
    out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    for b, sl in _chunks(B, T, _rows_per_chunk(V, chunk_elements)):
        z = logits[b, sl].float()  # (n, V), the chunk's own float32 copy
        if temperature != 1.0:
            z.div_(temperature)
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        p = torch.exp(z - lse.unsqueeze(-1))  # (n, V)
        out[b, sl] = lse - (p * z).sum(-1)
    return out


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int | None = None,
    keep_bytes: int = KEEP_BYTES,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[label], float32 (B, T); 0.0 at ignore_index.

    The same values as `chunked_token_logps(F.linear(hidden, weight, bias), labels)` without
    holding more than one chunk of logits beyond `keep_bytes` of them kept for backward.
    """
    _check("linear_token_logps", hidden, labels)
    valid = labels != ignore_index  # (B, T)
    rows = _LinearLogSoftmax.apply(
        hidden[valid],
        weight,
        bias,
        labels[valid],
        _rows_per_chunk(weight.shape[0], chunk_elements),
        keep_bytes,
    )  # (n,)
    return rows.new_zeros(labels.shape).index_put((valid,), rows)  # (B, T)
