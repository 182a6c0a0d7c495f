"""Ring attention (docs/spec.md §14): softmax and pointwise attention over a split sequence without
gathering it. Each rank keeps its queries; the keys and values travel round the ranks in pieces (each
share cut into PIECES, each piece W − 1 passes of the ring), and each rank folds every piece into its
rows as it passes: softmax through a running maximum and sum (merged as log-sum-exp), pointwise as a
plain sum scaled by L^−α at the end. The backward sends the pieces round again with their gradients,
which a last pass brings home. A rank holds its own share, one travelling piece (in the backward with
its gradients, and each as sent and as received) and a block of (rows × piece) scores at a time —
O(n·d + n·d / PIECES + block·n) per rank, where gathering the sequence holds O(N·d), and a ring of whole
shares as much again as the share for every tensor that travels.

Positions are global (``Split.positions``), so a causal row sees exactly the keys at or before it in
either order of the split (contiguous or zig-zag); a share that lies wholly after a causal rank's rows is
passed on unread.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.checks import compute_dtype
from ..functional.attention import ACTIVATIONS
from .exchange import Split, pad_positions

# Scores per block (1 MiB in float32): with the block's weights and mask, the working set a rank adds to
# its own share and the travelling one.
SCORE_ELEMENTS = 1 << 18
# The pieces each share travels in: at 2 ranks a whole share in flight (keys, values and in the backward
# their gradients, sent and received at once) held more than the rank's own half of the sequence. 8, not
# 4: softmax at width 256, N = 16384, 2 ranks held 0.65x of one process's tensors at 4 and 0.59x at 8,
# taking 8.8 s against 6.5 s (benchmarks/README.md, "Context parallelism").
PIECES = 8


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    split: Split,
    *,
    causal: bool,
    key_mask: torch.Tensor | None,
    scale: float,
    block: int,
    activation: str | None = None,
    alpha: float = 1.0,
    length: int | None = None,
) -> torch.Tensor:
    """This rank's rows of softmax attention (``activation=None``) or of pointwise attention with φ =
    ``activation``, L_i^−``alpha`` (L_i the keys row i sees, or ``length``), over the whole sequence.

    Args:
        q, k: (B, H, n, Dk). v: (B, H, n, Dv): this rank's positions, finite where causal (the caller
            selects non-finite keys away). key_mask: (B, n) bool, True = real key, or None.
        split: the sequence's split. causal, scale: as for the ops. block: the most query rows per block
            of scores (fewer when a block's scores would pass SCORE_ELEMENTS).

    Returns:
        (B, H, n, Dv) in q's dtype; a row that sees no key is 0.
    """
    return _RingAttention.apply(q, k, v, key_mask, split, causal, scale, block, activation, alpha, length)


def _shift(tensors: list[torch.Tensor], split: Split) -> list[torch.Tensor]:
    """Each tensor sent to the next rank of the ring, and the previous rank's received in its place."""
    group = split.group if split.group is not None else dist.group.WORLD
    after = dist.get_global_rank(group, (split.rank + 1) % split.world)
    before = dist.get_global_rank(group, (split.rank - 1) % split.world)
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    operations = [dist.P2POp(dist.isend, t, after, group) for t in tensors]
    operations += [dist.P2POp(dist.irecv, r, before, group) for r in received]
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


def _rings(split: Split, causal: bool, device: torch.device) -> list[_Ring]:
    """One walk round the ring for each piece of the shares (padded to the longest): PIECES near-equal
    runs of a share's positions, or the whole share where nothing travels (one rank)."""
    longest = max(split.lengths)
    count = 1 if split.world == 1 else max(1, min(PIECES, longest))
    rows = split.positions(device)  # one copy for every walk
    return [
        _Ring(split, causal, rows, (longest * i // count, longest * (i + 1) // count)) for i in range(count)
    ]


class _Ring:
    """The walk round the ring that the forward and the backward share, for one piece of the shares
    (positions [lo, hi) of each, padded): whose piece a rank holds at each step, where its keys lie,
    which of them a block of rows sees."""

    def __init__(self, split: Split, causal: bool, rows: torch.Tensor, part: tuple[int, int]) -> None:
        self.split, self.causal, self.device = split, causal, rows.device
        self.rows = rows  # (n,) this rank's global positions
        self.longest = max(split.lengths)
        self.lo, self.hi = part

    def piece(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This walk's piece of a padded share (a view)."""
        return x.narrow(dim, self.lo, self.hi - self.lo)

    def walk(self, travelling: list[torch.Tensor]):
        """(source, travelling) at each step of the ring: whose share is held, and what travels with it (a
        share, and in the backward its gradients, added to in place), shifted one rank on after the first
        step — so every rank makes the same W − 1 exchanges whatever it reads."""
        for step, source in enumerate(self.sources()):
            if step:
                travelling = _shift(travelling, self.split)
            yield source, travelling

    def sources(self) -> list[int]:
        """The rank whose share is held at each step: this rank's own first."""
        return [(self.split.rank - step) % self.split.world for step in range(self.split.world)]

    def padded(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """A share padded to the longest along ``dim``: every rank sends and receives one shape."""
        return pad_positions(x, dim, 0, self.longest - x.shape[dim])

    def own(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """This rank's share as it travels: keys, values and which keys are real (uint8), padded."""
        real = torch.ones(k.shape[0], self.split.length, dtype=torch.bool, device=k.device)
        real = real if key_mask is None else key_mask
        return [self.padded(k, 2), self.padded(v, 2), self.padded(real.to(torch.uint8), 1)]

    def keys(self, source: int) -> torch.Tensor:
        """(hi − lo,) the global positions of the piece of ``source``'s share, −1 past its end (no key)."""
        return self.piece(self.padded(self.split.positions(self.device, source) + 1, 0) - 1, 0)

    def runs(self, source: int):
        """(global start, its first key's place in the share, keys in the piece, run) for each run of
        ``source``'s share: the part of the run (start, length) that lies in this piece."""
        offset = 0
        for start, n in self.split.pieces[source]:
            lo, hi = max(self.lo, offset), min(self.hi, offset + n)
            yield start + lo - offset, lo, max(0, hi - lo), (start, n)
            offset += n

    def read(self, source: int) -> bool:
        """Whether any row here sees a key of the piece of ``source``'s share (read from the layout, not
        the device)."""
        firsts = [first for first, _, count, _ in self.runs(source) if count]
        if not firsts or not self.split.length:
            return False
        return not self.causal or min(firsts) < self.split.end

    def allowed(self, rows: slice, keys: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
        """(B, 1, r, L): a row of the block ``rows`` sees a key (position ``keys``) that is ``usable``
        (B, L): a real key of the share, not its padding."""
        allowed = usable[:, None, :]
        if self.causal:
            allowed = allowed & (keys[None, None, :] <= self.rows[rows][None, :, None])
        return allowed[:, None]

    def pairs(self, source: int) -> list[tuple[slice, slice, bool]]:
        """(rows here, keys of the piece of ``source``'s share, causal within: row i of the slice sees
        keys up to its i-th) for every run of rows and run of keys it sees. Runs never straddle: a run of
        keys is wholly before a run of rows (all seen), wholly after it (unseen), or part of the same run,
        whose rows before the piece's first key see none of it, the next as many rows as it has keys up
        to their own, and the rest all of it. A run of rows that sees all of a piece comes in blocks of at
        most the piece's length: what the kernel makes per call (the rows' outputs, their gradients) stays
        O(piece), not O(share)."""
        pairs, row, most = [], 0, max(1, self.hi - self.lo)
        for row_start, rows in self.split.pieces[self.split.rank]:
            for first, place, count, (key_start, keys) in self.runs(source):
                cut = slice(place - self.lo, place - self.lo + count)  # in the piece
                if not rows or not count:
                    continue
                if not self.causal or key_start + keys <= row_start:
                    seen_by = (row, row + rows)
                elif key_start == row_start:
                    skip = row + first - row_start  # the row at the piece's first key
                    pairs.append((slice(skip, skip + count), cut, True))
                    seen_by = (skip + count, row + rows)
                else:
                    continue
                pairs += [(slice(a, min(a + most, seen_by[1])), cut, False) for a in range(*seen_by, most)]
            row += rows
        return pairs

    def tiles(self, source: int, keys, held, queries, scale: float, block: int):
        """(rows, allowed, scores) for each block of rows here against the piece ``keys`` of ``source``'s
        share (real where ``held``), none when no row here sees it: scores = scale · q kᵀ, (B, H, rows,
        hi − lo), a fresh tensor the caller may work in place; allowed (B, 1, rows, hi − lo)."""
        if not self.read(source):
            return
        positions = self.keys(source)
        usable = (positions >= 0)[None, :] & held.bool()  # once a share, not once a block
        for rows in self.blocks(block, queries.shape[0] * queries.shape[1]):
            allowed = self.allowed(rows, positions, usable)
            yield rows, allowed, (queries[:, :, rows] * scale) @ keys.transpose(-1, -2)

    def blocks(self, block: int, heads: int):
        """Blocks of at most ``block`` rows whose scores against a piece (heads × rows × (hi − lo)) hold
        at most SCORE_ELEMENTS: a rank's working set stays small however long the shares are."""
        rows = max(1, min(block, SCORE_ELEMENTS // max(1, heads * (self.hi - self.lo))))
        for start in range(0, self.split.length, rows):
            yield slice(start, min(start + rows, self.split.length))


def _fused(activation: str | None, key_mask: torch.Tensor | None, q: torch.Tensor) -> bool:
    """Whether a call takes PyTorch's fused CPU attention (``aten::_scaled_dot_product_flash_attention
    _for_cpu``, which returns each row's log-sum-exp and whose backward takes the merged one, as ring
    attention needs): softmax without padding on the CPU. Otherwise the blocked form below."""
    return activation is None and key_mask is None and q.device.type == "cpu"


def _fused_forward(rings, queries, share, scale):
    """Softmax over the ring by the fused kernel, run by run (``_Ring.pairs``): (out, lse) per row."""
    out = queries.new_zeros(*queries.shape[:-1], share[1].shape[-1])
    lse = queries.new_full(queries.shape[:-1], float("-inf"))
    for ring, source, (key_share, value_share) in _walks(rings, share, (2, 2)):
        for rows, keys, causal in ring.pairs(source):
            part, part_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                queries[:, :, rows], key_share[:, :, keys], value_share[:, :, keys], 0.0, causal, scale=scale
            )
            merged = torch.logaddexp(lse[:, :, rows], part_lse)  # finite: every row sees a key here
            kept = out[:, :, rows]  # a view: merged in place, no second copy of the rows' outputs
            kept.mul_(torch.exp(lse[:, :, rows] - merged)[..., None])
            kept.add_(part.mul_(torch.exp(part_lse - merged)[..., None]))
            lse[:, :, rows] = merged
    return out, lse


def _fused_backward(rings, queries, share, grad, out, lse, scale):
    """The fused kernel's backward, run by run, with the merged out and lse (its Σ dO·O and its weights
    are then the whole row's): dq here, dk and dv into the travelling piece's gradients."""
    grad_q, home = torch.zeros_like(queries), [torch.zeros_like(share[0]), torch.zeros_like(share[1])]
    for ring, source, (key_share, value_share, grad_k, grad_v) in _walks(rings, share, (2, 2), home):
        for rows, keys, causal in ring.pairs(source):
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad[:, :, rows], queries[:, :, rows], key_share[:, :, keys], value_share[:, :, keys],
                out[:, :, rows], lse[:, :, rows], 0.0, causal, scale=scale,
            )  # fmt: skip
            grad_q[:, :, rows] += dq
            grad_k[:, :, keys] += dk
            grad_v[:, :, keys] += dv
            del dq, dk, dv  # before the next run's: one run's gradients held at a time
    return grad_q, home


def _walks(rings: list[_Ring], share: list[torch.Tensor], dims: tuple[int, ...], home=None):
    """(ring, source, travelling) at each step of every piece's walk: the piece of each of ``share``
    (positions along ``dims``) and, given ``home`` (the share's gradients, added to), the piece's
    gradients (zeros that travel with it and are brought home into ``home`` after its last step)."""
    for ring in rings:
        travelling = [ring.piece(x, dim) for x, dim in zip(share, dims, strict=True)]
        # Contiguous, as sent: a piece of the share is not, and sending would copy it each step.
        grads = [] if home is None else [x.new_zeros(ring.piece(x, 2).shape) for x in home]
        for source, held in ring.walk([*travelling, *grads]):
            yield ring, source, held
        if home is not None:  # the piece held last is the next rank's: its gradients go home
            held = held[len(travelling) :]
            for total, grad in zip(
                home, _shift(held, ring.split) if ring.split.world > 1 else held, strict=True
            ):
                ring.piece(total, 2).add_(grad)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, split, causal, scale, block, activation, alpha, length):
        dtype = compute_dtype(q.dtype)
        rings = _rings(split, causal, q.device)
        share = rings[0].own(k.to(dtype), v.to(dtype), key_mask)
        queries = q.to(dtype)
        ctx.options = (split, causal, scale, block, activation)
        if _fused(activation, key_mask, q):
            out, summary = _fused_forward(rings, queries, share[:2], scale)
            ctx.save_for_backward(q, k, v, key_mask, out, summary)
            return out.to(q.dtype)
        acc = queries.new_zeros(*q.shape[:-1], v.shape[-1])
        top = queries.new_full(q.shape[:-1], float("-inf"))  # softmax: the running maximum and sum
        total = queries.new_zeros(q.shape[:-1])
        counts = queries.new_zeros(q.shape[0], 1, q.shape[2])  # pointwise: the keys each row sees
        for ring, source, (keys, values, held) in _walks(rings, share, (2, 2, 1)):
            # One (rows × piece) tensor per block, worked in place: scores, then weights.
            for rows, allowed, scores in ring.tiles(source, keys, held, queries, scale, block):
                if activation is None:
                    scores.masked_fill_(~allowed, float("-inf"))  # selected away, not weighted 0
                    new_top = torch.maximum(top[:, :, rows], scores.amax(-1))
                    shift = torch.where(torch.isfinite(new_top), new_top, torch.zeros((), dtype=dtype))
                    weights = scores.sub_(shift[..., None]).exp_()
                    decay = torch.exp(top[:, :, rows] - shift)
                    total[:, :, rows] = total[:, :, rows] * decay + weights.sum(-1)
                    acc[:, :, rows] = acc[:, :, rows] * decay[..., None] + weights @ values
                    top[:, :, rows] = new_top
                else:
                    weights = ACTIVATIONS[activation].forward_(scores).masked_fill_(~allowed, 0.0)
                    acc[:, :, rows] += weights @ values
                    counts[:, :, rows] += allowed.sum(-1)
        if activation is None:
            seen = total > 0
            out = acc.div_(torch.where(seen, total, torch.ones((), dtype=dtype))[..., None])
            summary = torch.where(seen, top + torch.log(total), torch.full((), float("-inf"), dtype=dtype))
        else:
            summary = counts if length is None else torch.full_like(counts, float(length))
            summary = summary.clamp_min(1).pow(-alpha)  # L_i^−α; a row with no key sums to 0 anyway
            out = acc.mul_(summary[..., None])
        ctx.save_for_backward(q, k, v, key_mask, out, summary)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_mask, out, summary = ctx.saved_tensors
        split, causal, scale, block, activation = ctx.options
        dtype = compute_dtype(q.dtype)
        rings = _rings(split, causal, q.device)
        share = rings[0].own(k.to(dtype), v.to(dtype), key_mask)
        queries, grad = q.to(dtype), grad_out.to(dtype)
        if _fused(activation, key_mask, q):
            grad_q, home = _fused_backward(rings, queries, share[:2], grad, out, summary, scale)
            return _returned(grad_q, home, q, k, v, split)
        if activation is None:
            delta = (grad * out).sum(-1)  # Σ_d dO·O per row: softmax's correction to each score's gradient
            lse = torch.where(torch.isfinite(summary), summary, torch.zeros((), dtype=dtype))
        else:
            grad = grad * summary[..., None]
        grad_q, home = torch.zeros_like(queries), [torch.zeros_like(share[0]), torch.zeros_like(share[1])]
        for ring, source, (keys, values, held, *grads) in _walks(rings, share, (2, 2, 1), home):
            for rows, allowed, scores in ring.tiles(source, keys, held, queries, scale, block):
                grad_weights = grad[:, :, rows] @ values.transpose(-1, -2)
                if activation is None:
                    weights = scores.sub_(lse[:, :, rows, None]).exp_().masked_fill_(~allowed, 0.0)
                    grad_scores = grad_weights.sub_(delta[:, :, rows, None]).mul_(weights)
                else:
                    act = ACTIVATIONS[activation]
                    phi = act.forward(scores)
                    grad_scores = act.backward(scores, phi, grad_weights).masked_fill_(~allowed, 0.0)
                    weights = phi.masked_fill_(~allowed, 0.0)
                grad_q[:, :, rows] += (grad_scores @ keys).mul_(scale)
                grads[0] += grad_scores.transpose(-1, -2) @ (queries[:, :, rows] * scale)
                grads[1] += weights.transpose(-1, -2) @ grad[:, :, rows]
        return _returned(grad_q, home, q, k, v, split)


def _returned(grad_q, grads, q, k, v, split: Split) -> tuple:
    """The backward's returns: the gradients of this rank's share, its padding cut off."""
    n = split.length
    grad_k, grad_v = grads[0][:, :, :n].to(k.dtype), grads[1][:, :, :n].to(v.dtype)
    return grad_q.to(q.dtype), grad_k, grad_v, *([None] * 8)
