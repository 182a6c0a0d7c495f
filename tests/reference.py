"""Float64 references written straight from the equations of docs/spec.md: loops and dense sums, obviously
right, slow, never shared with the library's code. Every op is tested against these."""

from __future__ import annotations

import math

import torch

# φ written from their definitions, independently of tokenmix.functional.ACTIVATIONS.
ACTIVATIONS = {
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu2": lambda x: torch.where(x > 0, x * x, torch.zeros_like(x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "softplus": lambda x: torch.log1p(torch.exp(-x.abs())) + torch.where(x > 0, x, torch.zeros_like(x)),
    "identity": lambda x: x,
    "relu6": lambda x: torch.minimum(torch.where(x > 0, x, torch.zeros_like(x)), torch.full_like(x, 6.0)),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
}


def _visible(n: int, i: int, causal: bool, mask_row: torch.Tensor | None) -> list[int]:
    """S(i): the real keys row i sees."""
    return [j for j in range(n) if (not causal or j <= i) and (mask_row is None or bool(mask_row[j]))]


def softmax_attention(q, k, v, *, causal=False, attention_mask=None, scale=None):
    """out_i = Σ_{j∈S(i)} exp(s_ij) v_j / Σ_{j∈S(i)} exp(s_ij), s_ij = scale q_i·k_j. Rows with empty S(i)
    (padded queries only) are returned as zeros: they are unspecified by the spec."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, n, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    rows = []
    for b in range(batch):
        mask_row = None if attention_mask is None else attention_mask[b]
        for i in range(n):
            keys = _visible(n, i, causal, mask_row)
            if not keys:
                rows.append(torch.zeros(heads, v.shape[-1], dtype=torch.float64))
                continue
            scores = scale * torch.einsum("hd,hjd->hj", q[b, :, i], k[b, :, keys])
            weights = torch.softmax(scores, dim=-1)
            rows.append(torch.einsum("hj,hjd->hd", weights, v[b, :, keys]))
    return torch.stack(rows).reshape(batch, n, heads, -1).transpose(1, 2)


def pointwise_attention(
    q, k, v, *, activation="relu", alpha=1.0, scale=None, causal=False, attention_mask=None, length=None
):
    """out_i = Σ_{j∈S(i)} φ(scale q_i·k_j) L_i^(−alpha) v_j with L_i = |S(i)| or the fixed ``length``."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, n, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    phi = ACTIVATIONS[activation]
    rows = []
    for b in range(batch):
        mask_row = None if attention_mask is None else attention_mask[b]
        for i in range(n):
            keys = _visible(n, i, causal, mask_row)
            big_l = len(keys) if length is None else length
            row = torch.zeros(heads, v.shape[-1], dtype=torch.float64)
            for j in keys:
                weight = phi(scale * (q[b, :, i] * k[b, :, j]).sum(-1))  # (H,)
                row = row + weight[:, None] * v[b, :, j] * big_l ** (-alpha)
            rows.append(row)
    return torch.stack(rows).reshape(batch, n, heads, -1).transpose(1, 2)


def relative_error(
    actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None, floor: float = 0.0
) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor) in float64 (over the entries ``mask`` selects)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    denom = max(expected.norm().item(), floor)
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, *, mask=None, floor: float = 0.0, what: str = ""
) -> None:
    """Relative error of ``actual`` against ``expected`` (see ``relative_error``) is at most ``tol``, and
    everything is finite."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = relative_error(actual, expected, mask, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def query_mask(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Broadcast a (B, N) mask over (B, H, N, D) outputs: the rows whose values are specified."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, :, None].expand(shape)


def mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal=False, attention_mask=None):
    """docs/spec.md §3, term by term: quad_i over the real j of i's chunk (j ≤ i if causal) of
    relu²(q_quad_i·k_quad_j/√S)/C · v_j, plus lin_i = q_lin_i · M_i / n_i over the real j of all chunks
    (non-causal) or of the chunks before i's (causal; 0 when there are none)."""
    q_quad, k_quad, q_lin, k_lin, v = (t.double() for t in (q_quad, k_quad, q_lin, k_lin, v))
    batch, n, s = q_quad.shape
    rows = []
    for b in range(batch):
        real = [attention_mask is None or bool(attention_mask[b, j]) for j in range(n)]
        for i in range(n):
            chunk = i // chunk_size
            out = torch.zeros(v.shape[-1], dtype=torch.float64)
            for j in range(n):
                if real[j] and j // chunk_size == chunk and (not causal or j <= i):
                    score = (q_quad[b, i] * k_quad[b, j]).sum() / math.sqrt(s)
                    out = out + torch.where(score > 0, score * score, 0 * score) / chunk_size * v[b, j]
            linear = [j for j in range(n) if real[j] and (not causal or j // chunk_size < chunk)]
            if linear:
                state = sum(torch.outer(k_lin[b, j], v[b, j]) for j in linear)
                out = out + q_lin[b, i] @ state / len(linear)
            rows.append(out)
    return torch.stack(rows).view(batch, n, -1)


def _conv(x, kernel_at, heads, kernel_size, causal, attention_mask):
    """y[b,t,c] = Σ_j kernel_at(b, t, h(c))[j] · x[b, t+j−P, c], terms outside [0, N) or padded are 0."""
    x = x.double()
    batch, n, channels = x.shape
    per_head = channels // heads
    left = kernel_size - 1 if causal else (kernel_size - 1) // 2
    values = []
    for b in range(batch):
        for t in range(n):
            for c in range(channels):
                taps = kernel_at(b, t, c // per_head)
                total = torch.zeros((), dtype=torch.float64)
                for j in range(kernel_size):
                    s = t + j - left
                    if 0 <= s < n and (attention_mask is None or bool(attention_mask[b, s])):
                        total = total + taps[j] * x[b, s, c]
                values.append(total)
    return torch.stack(values).view(batch, n, channels)


def lightconv(x, weight, *, causal=False, weight_softmax=True, attention_mask=None):
    """docs/spec.md §5: one kernel W̃ = softmax(weight) (or weight) per head, shared by its C/H channels."""
    kernel = torch.softmax(weight.double(), -1) if weight_softmax else weight.double()
    return _conv(x, lambda b, t, h: kernel[h], weight.shape[0], weight.shape[1], causal, attention_mask)


def dynamic_conv(x, weight, *, causal=False, weight_softmax=True, attention_mask=None):
    """docs/spec.md §5: output position t of batch b uses the kernel weight[b, t] (normalised per head)."""
    kernel = torch.softmax(weight.double(), -1) if weight_softmax else weight.double()
    return _conv(x, lambda b, t, h: kernel[b, t, h], weight.shape[2], weight.shape[3], causal, attention_mask)


def assert_grads_close(got, want, tol: float, names, what: str = "") -> None:
    """Each gradient within ``tol`` of its reference, relative to its own norm but never to less than
    1e-3 of all the reference gradients' combined norm: a gradient that is exactly zero in exact
    arithmetic (an input the output does not depend on, e.g. the keys of a row that sees one key) is
    round-off on both sides, and a relative error against zero would measure only that."""
    floor = 1e-3 * torch.cat([w.detach().double().flatten() for w in want]).norm().item()
    for name, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, tol, floor=floor, what=f"{what} grad {name}")


def reference_grads(expected: torch.Tensor, inputs, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of a reference output; zeros for inputs it does not depend on (e.g. every position
    padded, where the reference builds its output from constants)."""
    grads = (
        torch.autograd.grad(expected, inputs, grad_out, allow_unused=True)
        if expected.requires_grad
        else [None] * len(inputs)
    )
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]


def aft_full(q, k, v, w, *, causal=False, attention_mask=None):
    """docs/spec.md §4, one (row, channel) at a time: σ(q_td) · Σ exp(s) v / Σ exp(s), s_t' = k_t'd + w_tt'
    over the real t' (≤ t if causal), with the joint maximum of s subtracted. Rows that see no real key
    are 0."""
    q, k, v, w = q.double(), k.double(), v.double(), w.double()
    batch, n, channels = q.shape
    rows = []
    for b in range(batch):
        for t in range(n):
            keys = _visible(n, t, causal, None if attention_mask is None else attention_mask[b])
            if not keys:
                rows.append(torch.zeros(channels, dtype=torch.float64))
                continue
            scores = k[b, keys] + w[t, keys][:, None]  # (|S|, D)
            weights = torch.softmax(scores, dim=0)
            rows.append(torch.sigmoid(q[b, t]) * (weights * v[b, keys]).sum(0))
    return torch.stack(rows).view(batch, n, channels)


def aft_simple(q, k, v, *, causal=False, attention_mask=None):
    """docs/spec.md §4: aft_full with w = 0."""
    n = q.shape[1]
    return aft_full(
        q, k, v, torch.zeros(n, n, dtype=torch.float64), causal=causal, attention_mask=attention_mask
    )


def aft_local(q, k, v, w, *, window, causal=False, attention_mask=None):
    """docs/spec.md §4: aft_full with w' = w inside |t − t'| < window and 0 outside."""
    n = q.shape[1]
    positions = torch.arange(n)
    near = (positions[:, None] - positions[None, :]).abs() < window
    local = torch.where(near, w[:n, :n].double(), torch.zeros(n, n, dtype=torch.float64))
    return aft_full(q, k, v, local, causal=causal, attention_mask=attention_mask)


def aft_conv(q, k, v, w, *, causal=False, attention_mask=None):
    """docs/spec.md §4, 1-D: per head h, aft_full over its channels with k_t broadcast across them and
    w_{t,t'} = w[h, t' − t + P] inside the kernel, 0 outside (P = K // 2, or K − 1 when causal)."""
    batch, n, heads, head_dim = q.shape
    kernel_size = w.shape[1]
    centre = kernel_size - 1 if causal else kernel_size // 2
    outputs = []
    for h in range(heads):
        table = torch.zeros(n, n, dtype=torch.float64)
        for t in range(n):
            for s in range(n):
                if 0 <= s - t + centre < kernel_size:
                    table[t, s] = w[h, s - t + centre].double()
        keys = k[:, :, h, None].double().expand(batch, n, head_dim)
        outputs.append(
            aft_full(q[:, :, h], keys, v[:, :, h], table, causal=causal, attention_mask=attention_mask)
        )
    return torch.stack(outputs, dim=2)


def aft_conv_2d(q, k, v, w, *, attention_mask=None):
    """docs/spec.md §4, 2-D: aft_full over the flattened (X, Y) grid per head, with w_{t,t'} = w[h, x'−x+Px,
    y'−y+Py] inside the kernel and 0 outside."""
    batch, size_x, size_y, heads, head_dim = q.shape
    kernel_x, kernel_y = w.shape[1:]
    n = size_x * size_y
    mask = None if attention_mask is None else attention_mask.reshape(batch, n)
    outputs = []
    for h in range(heads):
        table = torch.zeros(n, n, dtype=torch.float64)
        for t in range(n):
            for s in range(n):
                dx = s // size_y - t // size_y + kernel_x // 2
                dy = s % size_y - t % size_y + kernel_y // 2
                if 0 <= dx < kernel_x and 0 <= dy < kernel_y:
                    table[t, s] = w[h, dx, dy].double()
        keys = k[..., h, None].double().expand(batch, size_x, size_y, head_dim).reshape(batch, n, head_dim)
        out = aft_full(
            q[..., h, :].reshape(batch, n, -1),
            keys,
            v[..., h, :].reshape(batch, n, -1),
            table,
            attention_mask=mask,
        )
        outputs.append(out.view(batch, size_x, size_y, head_dim))
    return torch.stack(outputs, dim=3)


def assert_matches(
    out: torch.Tensor,
    expected: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    tol: float,
    *,
    rows: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    grads: bool = True,
    what: str = "",
) -> None:
    """An op's output against the reference's within ``tol`` (relative) on the specified ``rows`` and,
    with ``grads``, the gradients with respect to ``inputs`` of both for one random cotangent that is zero
    on the unspecified rows."""
    assert_close(out, expected, tol, mask=rows, what=f"{what} forward")
    if not grads:
        return
    grad_out = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    if rows is not None:
        grad_out = grad_out * rows
    tensors = tuple(inputs.values())
    got = torch.autograd.grad(out, tensors, grad_out)
    assert_grads_close(got, reference_grads(expected, tensors, grad_out), tol, list(inputs), what)


def assert_float32_matches(
    op,
    expected_op,
    inputs: dict[str, torch.Tensor],
    tol: float,
    *,
    rows: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    what: str = "",
) -> None:
    """``op`` on float32 copies of the float64 ``inputs`` against ``expected_op`` (the float64 reference)
    on the originals: the output and the gradients of one random cotangent, zero on the unspecified
    ``rows``, finite and within ``tol``. For extreme but legal values, where a backward that does not
    use the forward's maxima turns 0/0 or inf·0 into NaN."""
    originals = {name: t.detach().double().requires_grad_() for name, t in inputs.items()}
    singles = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    out, expected = op(*singles.values()), expected_op(*originals.values())
    assert_close(out, expected, tol, mask=rows, what=f"{what} forward")
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
    if rows is not None:
        grad_out = grad_out * rows
    got = torch.autograd.grad(out, tuple(singles.values()), grad_out.float())
    want = reference_grads(expected, tuple(originals.values()), grad_out)
    assert_grads_close(got, want, tol, list(inputs), what)


def decode(module, inputs: torch.Tensor, each_state=None):
    """Feed ``inputs`` (B, N, …) through ``module.step`` one position at a time from a fresh state, without
    gradients; ``each_state(state)`` is called after every step. Returns the stacked outputs (B, N, …) and
    the final state."""
    with torch.no_grad():
        state, outputs = module.init_state(inputs.shape[0]), []
        for t in range(inputs.shape[1]):
            output, state = module.step(inputs[:, t], state)
            outputs.append(output)
            if each_state is not None:
                each_state(state)
    return torch.stack(outputs, dim=1), state
