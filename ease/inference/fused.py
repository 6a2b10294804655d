"""The native model's fast decoding path: `EarlyExitDecoder`'s computation with the weights folded for speed.

`FusedDecoder` decodes `EarlyExitTransformer` only. It computes what the reference decoder
(`ease.inference.decoder.EarlyExitDecoder`, which runs the model's own blocks through the backbone protocol)
computes, and the tests hold it to that: the same tokens and exit layers, logits equal to about 1e-5. It
exists because at small model sizes a decoding step's time is mostly per-operation overhead, not
arithmetic, so it counts operations: one preallocated K/V buffer for every layer written in place (a step
writes one slot per layer instead of concatenating tensors), RoPE as one small matmul, every RMSNorm weight
folded into the matmul that follows it, the next block's q/k/v taken from the exit matmul, block 1's
projections looked up per word (batch 1), views by `narrow`/`select` rather than `[]` indexing, and no
per-step Python containers.

Propagate mode: a stopped row's skipped layers get K/V projected from its exit state. While those layers'
K/V weights are small (dim 64) they come from the exit's own matmul (one wider call); above 256 KiB the exit
matmul gives only the logits and the next block's q|k|v, and the K/V come from a second matmul of the stopping
rows only (`split_exit`), or, at batch <= 32, as extra rows of each block's matmul above (`kv_with_layers`).
Batched steps run every block's matmuls for the running rows only, but attention over every row's cache in
place (the stopped rows with q = 0), so no cache is gathered. docs/speed.md ("Batched early exit") has the
profile behind these choices.
Recompute mode keeps each row's pending positions and runs them, per row, in one chunk with the token that
needs them. Weights are read when the decoder is built: build a new decoder (or call `refresh_weights`)
after changing the model's weights. The decoder computes in float32.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ease.inference.decoder import StepOutput, decoder_routing
from ease.model.attention import apply_rotary
from ease.model.transformer import EarlyExitTransformer
from ease.routing import confidence_fn, needs_hidden


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as one matrix per position: x @ R[t] == apply_rotary(x, cos[t], sin[t]). (T, hd/2) -> (T, hd, hd).

    One small matmul rotates q and k of a decoding step together, instead of eight elementwise ops each.
    """
    T, half = cos.shape
    R = cos.new_zeros(T, 2 * half, 2 * half)
    i = torch.arange(half, device=cos.device)
    R[:, i, i] = cos  # out1 = x1 cos - x2 sin
    R[:, i + half, i] = -sin
    R[:, i, i + half] = sin  # out2 = x1 sin + x2 cos
    R[:, i + half, i + half] = cos
    return R


class _Block(NamedTuple):
    """One block's weights, transposed for `torch.mm`, norm weights folded in (see `refresh_weights`)."""

    qkv: torch.Tensor  # (C, 3C): attn_norm folded in, q columns scaled by 1/sqrt(hd)
    proj: torch.Tensor  # (C, C)
    w13: torch.Tensor  # (C, 2H): ffn_norm folded in
    w2: torch.Tensor  # (H, C)


class FusedDecoder:
    """`EarlyExitDecoder` for `EarlyExitTransformer`, with folded weights and preallocated caches (module docstring).

    Takes `EarlyExitDecoder`'s arguments and has its attributes (`layer_tokens`, `kv_tokens`, `pos`).
    `split_exit`: whether an exit computes the skipped blocks' K/V in a matmul of its own, for the stopping rows
    only (True), or in the exit's matmul (False); None: by the size of those weights (`_split_exit`).
    `kv_with_layers` (split exits, batch > 1, propagate mode): the stopping rows' K/V of each block above computed
    as extra rows of that block's q|k|v matmul for the running rows (True), or by one matmul at the exit (False);
    None: True up to KV_WITH_LAYERS_MAX_BATCH rows (docs/speed.md, "Batched early exit").
    """

    def __init__(
        self,
        model: EarlyExitTransformer,
        batch_size: int = 1,
        max_len: int = 256,
        exit_layer: int | Sequence[int] | None = None,
        routing_threshold: float | Sequence[float] | None = None,
        kv_mode: str = "propagate",
        confidence: str | None = None,
        split_exit: bool | None = None,
        kv_with_layers: bool | None = None,
    ) -> None:
        if not model.llama_style:  # the folded weights assume RMSNorm, RoPE and SwiGLU
            raise ValueError("FusedDecoder: needs model.norm=rms, positions=rotary, ffn=swiglu (use the reference)")
        routing = decoder_routing(model, batch_size, max_len, exit_layer, routing_threshold, kv_mode)
        self.exit_layers, self.routing_thresholds = routing
        self.model = model
        self.kv_mode = kv_mode
        self.split_exit = split_exit
        self.batch_size = batch_size
        self.max_len = max_len
        L = self.num_layers = model.num_layers
        C = self.dim = model.dim
        nh = self.num_heads = model.num_heads
        hd = self.head_dim = C // nh
        # _thresholds[i]: the threshold of an active exit after block i (0-based), else None.
        self._thresholds: list[float | None] = [None] * L
        for e, t in zip(self.exit_layers, self.routing_thresholds):
            if t > 0:
                self._thresholds[e - 1] = t
        measure = confidence or model.confidence
        if needs_hidden(measure):
            raise ValueError(f"task.decoder: the fused decoder scores logit confidences only; routing.confidence="
                             f"{measure} needs task.decoder=reference")  # fmt: skip
        self._confidence = _max_prob if measure == "max_prob" else confidence_fn(measure)
        self._one_row = batch_size == 1 and kv_mode == "propagate"  # `step` takes `_step_one_row`
        self.device = next(model.parameters()).device
        # batch 1 returns these as exit_layer (shared, not one allocation per step): callers must not write to them
        self._exit_ids = [torch.full((1,), e, dtype=torch.long, device=self.device) for e in range(1, L + 1)]
        cos, sin = model.rope(0, max_len)
        self._cos, self._sin = cos, sin  # (T, hd/2), for chunks
        self._rot = list(rotation_matrices(cos, sin).unbind(0))  # T x (hd, hd), for single positions
        # Caches of every layer, K stored transposed so a step's scores are one bmm: (L, B, nh, hd, T).
        self._k = torch.zeros(L, batch_size, nh, hd, max_len, device=self.device)
        self._v = torch.zeros(L, batch_size, nh, max_len, hd, device=self.device)
        self._k_layer, self._v_layer = list(self._k.unbind(0)), list(self._v.unbind(0))  # per-layer views
        self._k_rows = [k.view(batch_size * nh, hd, max_len) for k in self._k_layer]  # rows merged with heads
        self._v_rows = [v.view(batch_size * nh, max_len, hd) for v in self._v_layer]
        self._k_above = [self._k[e:] for e in range(L)]  # layers e+1..L, where a row stopping at e writes
        self._v_above = [self._v[e:] for e in range(L)]
        if kv_mode == "recompute":
            self._hidden = torch.zeros(batch_size, max_len, C, device=self.device)  # pending positions' state
        self.refresh_weights()
        split = bool(self._exit_w) and len(self._exit_kv) == len(self._exit_w)  # every active exit splits
        if kv_with_layers is None:
            kv_with_layers = batch_size <= KV_WITH_LAYERS_MAX_BATCH
        self._kv_with_layers = kv_with_layers and split and batch_size > 1 and kv_mode == "propagate"
        self.reset()

    # --- state ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Read the model's weights again (after training or loading new ones).

        The decoder keeps its own transposed copies with every RMSNorm weight folded into the matmul that
        follows it (norm(h) @ W.T == rms(h) @ (W * w).T), and 1/sqrt(hd) folded into the q columns, so a
        block is a handful of `mm` calls. This costs memory about the size of the blocks and the head, and
        changes rounding slightly (logits agree with the model's to about 1e-6).
        """
        m = self.model
        eps = m.norm.eps
        if any(b.attn_norm.eps != eps or b.ffn_norm.eps != eps for b in m.layers):
            raise ValueError("FusedDecoder: every RMSNorm must use the same eps")
        C, hd = self.dim, self.head_dim
        self._c_eps = torch.tensor(C * eps, device=self.device)
        self._root_c_eps = self._c_eps.sqrt()
        root = C**0.5  # `_normalize` leaves out the sqrt(C) of the RMS; it is folded into the weights
        scale = torch.full((3 * C, 1), root)
        scale[:C] *= hd**-0.5
        self._blocks = []
        for b in m.layers:
            qkv = b.attn.qkv.weight * b.attn_norm.weight * scale.to(b.attn.qkv.weight)  # (3C, C)
            w13 = b.ffn.w13.weight * b.ffn_norm.weight * root
            self._blocks.append(_Block(_t(qkv), _t(b.attn.proj.weight), _t(w13), _t(b.ffn.w2.weight)))
        self._vocab = m.output_head.weight.shape[0]
        self._embedding = m.embedding.weight.detach()
        self._head = _t(m.output_head.weight * m.norm.weight * root)  # (C, V)
        # Block 1's q|k|v of every word, (V, 3C): its input is an embedding row, so a batch-1 step looks its
        # projections up instead of normalising and multiplying (4 ops of a fixed per-token cost).
        qkv_words = torch.mm(self._normalize(self._embedding), self._blocks[0].qkv)
        self._qk_words, self._v_words = qkv_words[:, : 2 * C].contiguous(), qkv_words[:, 2 * C :].contiguous()
        # After block i with an active exit (propagate mode), the normalised state gives, by one matmul:
        #   fused: [ logits (V) | q of block i+1 (C) | K of blocks i+1..L-1 (dC) | V of blocks i+1..L-1 (dC) ]
        #   split: [ logits (V) | q|k|v of block i+1 (3C) ], and [ K (dC) | V (dC) ] of blocks i+1..L-1 by a
        #          second matmul of the stopping rows only (`_exit_kv`).
        # Rows that go on take block i+1's q, k, v from it (no norm, no matmul of their own); rows that stop
        # take every skipped block's K/V (CALM propagation of the exit state). Fused saves a call, which pays
        # while the skipped blocks' K/V weights are small (per-call overhead dominates); split pays when they
        # are large: the rows that go on (and every row at batch 1 that goes on) no longer read or multiply
        # 2dC^2 weights they do not use (docs/speed.md, "Batched early exit").
        self._exit_w: dict[int, torch.Tensor] = {}
        self._exit_kv: dict[int, torch.Tensor] = {}  # split exits only: (C, 2dC)
        self._exit_v_start: dict[int, int] = {}  # where block i+1's v begins in the exit matmul's output
        if self.kv_mode == "propagate":
            V = self._vocab
            for i, threshold in enumerate(self._thresholds[:-1]):
                if threshold is not None:
                    deeper = self._blocks[i + 1 :]
                    d = len(deeper)
                    kv = [blk.qkv[:, C : 2 * C] for blk in deeper] + [blk.qkv[:, 2 * C :] for blk in deeper]
                    if self._split_exit(d):
                        self._exit_w[i] = torch.cat([self._head, deeper[0].qkv], dim=1).contiguous()
                        self._exit_kv[i] = torch.cat(kv, dim=1).contiguous()
                        self._exit_v_start[i] = V + 2 * C
                    else:
                        self._exit_w[i] = torch.cat([self._head, deeper[0].qkv[:, :C], *kv], dim=1).contiguous()
                        self._exit_v_start[i] = V + C + d * C

    def _split_exit(self, d: int) -> bool:
        """Whether an exit with d blocks above it computes the skipped K/V apart (only for rows that stop).

        When the K/V weights of the d blocks (2dC^2 floats) pass SPLIT_EXIT_BYTES, reading them costs more than
        the extra call: at dim 64 and d <= 3 they are 96 KiB or less (fused), at dim 256 and up a MiB or more.
        """
        if self.split_exit is not None:
            return self.split_exit
        return 2 * d * self.dim * self.dim * 4 > SPLIT_EXIT_BYTES

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """New values for the active exits' thresholds, one per `exit_layers` entry (CALM's decaying threshold
        changes them between steps). An exit that was off stays off: the fused weights were built for the others."""
        for e, t in zip(self.exit_layers, thresholds):
            if self._thresholds[e - 1] is not None:
                self._thresholds[e - 1] = t

    def reset(self) -> None:
        """Forget every position (the buffers are kept)."""
        self.pos = 0
        self.layer_tokens = 0
        self.kv_tokens = 0
        # recompute: _filled[i][b] = positions of row b whose K/V at layer i+1 are computed (a prefix).
        self._filled = [[0] * self.batch_size for _ in range(self.num_layers)]

    def _room(self, n: int) -> None:
        if self.pos + n > self.max_len:
            raise ValueError(f"max_len: the caches hold {self.max_len} positions, {self.pos + n} needed")

    def _normalize(self, h: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight and without a factor sqrt(C) (both are in the folded weights).

        h / hypot(|h|, sqrt(C eps)) == h * rsqrt(mean(h^2) + eps) / sqrt(C): three cheap ops, where `mean`,
        Python-scalar arithmetic and `F.rms_norm` each cost several times more on CPU at these sizes.
        """
        return h / torch.hypot(torch.linalg.vector_norm(h, dim=-1, keepdim=True), self._root_c_eps)

    def _unembed(self, h: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self._normalize(h), self._head)  # (..., V)

    # --- one block ----------------------------------------------------------------------------------------

    def _qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's projections of h (Ba, C): q and k side by side (Ba, 2C), v (Ba, C)."""
        qkv = torch.mm(self._normalize(h), self._blocks[i].qkv)
        return qkv[:, : 2 * self.dim], qkv[:, 2 * self.dim :]

    def _block_one(
        self, i: int, h: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None, t: int
    ) -> torch.Tensor:
        """Block i on one new token per running row, given its projections (`_qkv`). h: (Ba, C) -> (Ba, C).

        rows: the running rows' indices in the batch (None = every row).
        """
        w = self._blocks[i]
        Ba, C = h.shape
        nh, hd = self.num_heads, self.head_dim
        qk = torch.mm(qk.reshape(-1, hd), self._rot[t]).view(Ba, 2, nh, hd)  # q and k rotated to position t
        v = v.reshape(Ba, nh, hd)
        # narrow/select/chunk rather than [] indexing: the same views for less Python dispatch per step
        keys, values = self._k_rows[i].narrow(2, 0, t + 1), self._v_rows[i].narrow(1, 0, t + 1)  # no copy
        if rows is None:
            self._k_layer[i].select(3, t).copy_(qk.select(1, 1))
            self._v_layer[i].select(2, t).copy_(v)
            q = qk.select(1, 0).reshape(Ba * nh, 1, hd)
        else:
            # Only the running rows' K/V are written (a stopped row's slot t holds its propagated K/V), but the
            # attention reads every row's cache in place, the stopped rows with q = 0: gathering the running
            # rows' caches would copy (Ba, nh, hd, t+1) per layer, far more than the few extra dot products.
            self._k_layer[i].select(3, t).index_copy_(0, rows, qk.select(1, 1))
            self._v_layer[i].select(2, t).index_copy_(0, rows, v)
            q = qk.new_zeros(self.batch_size, nh, hd).index_copy_(0, rows, qk.select(1, 0))
            q = q.view(self.batch_size * nh, 1, hd)
        scores = torch.bmm(q, keys)  # (B' nh, 1, t+1); q carries 1/sqrt(hd)
        y = torch.bmm(scores.softmax(-1), values).view(-1, C)
        if rows is not None:
            y = y.index_select(0, rows)
        h = torch.addmm(h, y, w.proj)
        gate, up = torch.mm(self._normalize(h), w.w13).chunk(2, 1)  # (Ba, H) each
        return torch.addmm(h, F.silu(gate).mul_(up), w.w2)

    def _block_chunk(self, i: int, h: torch.Tensor, start: int, rows: list[int] | None) -> torch.Tensor:
        """Block i on positions start..start+m-1 of the given rows (prefill, recompute). (G, m, C) -> (G, m, C)."""
        w = self._blocks[i]
        G, m, C = h.shape
        nh, hd = self.num_heads, self.head_dim
        end = start + m
        qkv = torch.matmul(self._normalize(h), w.qkv)
        q, k, v = (x.view(G, m, nh, hd).transpose(1, 2) for x in qkv.split(C, dim=-1))  # (G, nh, m, hd)
        cos, sin = self._cos[start:end], self._sin[start:end]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if rows is None:
            self._k[i, :, :, :, start:end] = k.transpose(-1, -2)
            self._v[i, :, :, start:end] = v
            keys, values = self._k[i, :, :, :, :end], self._v[i, :, :, :end]
        else:
            idx = torch.tensor(rows, device=h.device)
            self._k[i][idx, :, :, start:end] = k.transpose(-1, -2)
            self._v[i][idx, :, start:end] = v
            keys, values = self._k[i][idx, :, :, :end], self._v[i][idx, :, :end]
        if start == 0:
            mask = None
        else:  # query j sits at position start+j and sees keys 0..start+j
            mask = torch.ones(m, end, dtype=torch.bool, device=h.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, keys.transpose(-1, -2), values, mask, is_causal=start == 0, scale=1.0)
        h = h + torch.matmul(y.transpose(1, 2).reshape(G, m, C), w.proj)
        gate, up = torch.matmul(self._normalize(h), w.w13).chunk(2, dim=-1)
        self.layer_tokens += G * m
        return h + torch.matmul(F.silu(gate) * up, w.w2)

    def _write_kv(self, e: int, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None, t: int) -> None:
        """CALM propagation: store K/V of layers e+1..L at position t, projected from the exit state.

        keys, values: (n, d C) for the n rows that stopped at layer e, d = L - e skipped layers.
        """
        n = keys.shape[0]
        d = self.num_layers - e
        nh, hd = self.num_heads, self.head_dim
        k = torch.mm(keys.reshape(-1, hd), self._rot[t])  # rotated to position t: (n d nh, hd)
        if n == 1:  # (1, d, ...) and (d, 1, ...) share their memory order: views, no transposes
            k, v = k.view(d, 1, nh, hd), values.view(d, 1, nh, hd)
        else:
            k, v = k.view(n, d, nh, hd).transpose(0, 1), values.reshape(n, d, nh, hd).transpose(0, 1)
        k_slot, v_slot = self._k_above[e].select(4, t), self._v_above[e].select(3, t)  # (d, B, nh, hd)
        if rows is None:
            k_slot.copy_(k)
            v_slot.copy_(v)
        else:
            k_slot[:, rows] = k
            v_slot[:, rows] = v
        self.kv_tokens += n * d

    def _block_recompute(self, i: int, h: torch.Tensor, rows: torch.Tensor | None, t: int) -> torch.Tensor:
        """Block i for the running rows, first running it on their pending positions (chunked with the token)."""
        filled = self._filled[i]
        row_list = list(range(self.batch_size)) if rows is None else rows.tolist()
        starts = [filled[b] for b in row_list]
        if all(s == t for s in starts):
            out = self._block_one(i, h, *self._qkv(i, h), rows, t)
            self.layer_tokens += len(row_list)
        else:
            groups: dict[int, list[int]] = {}  # pending start -> local row numbers; one chunk per start
            for j, s in enumerate(starts):
                groups.setdefault(s, []).append(j)
            out = torch.empty_like(h)
            for s, local in groups.items():
                group_rows = [row_list[j] for j in local]
                sel = torch.tensor(local, device=h.device)
                g = torch.tensor(group_rows, device=h.device)
                if s == t:
                    out[sel] = self._block_one(i, h[sel], *self._qkv(i, h[sel]), g, t)
                    self.layer_tokens += len(local)
                    continue
                chunk = torch.cat((self._hidden[g, s:t], h[sel].unsqueeze(1)), dim=1)  # (G, t-s+1, C)
                chunk = self._block_chunk(i, chunk, s, None if len(group_rows) == self.batch_size else group_rows)
                self._hidden[g, s:t] = chunk[:, :-1]
                out[sel] = chunk[:, -1]
        for b in row_list:
            filled[b] = t + 1
        return out

    # --- the public steps -------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, return_layers: bool = False) -> dict[int, torch.Tensor] | None:
        """Run a chunk of tokens (B, m) through every layer, filling the caches; no routing (a prompt).

        Returns {layer: logits (B, m, V)} for every layer with `return_layers`, else None.
        """
        batch, m = ids.shape
        if batch != self.batch_size:
            raise ValueError(f"prefill: ids must have batch size {self.batch_size}, got {batch}")
        self._room(m)
        if any(min(layer) < self.pos for layer in self._filled):
            raise ValueError("prefill: positions are pending (recompute mode); prefill only before stepping")
        h = F.embedding(ids, self._embedding)  # (B, m, C)
        out = {} if return_layers else None
        for i in range(self.num_layers):
            h = self._block_chunk(i, h, self.pos, None)
            if out is not None:
                out[i + 1] = self._unembed(h)
        self.pos += m
        self._filled = [[self.pos] * batch for _ in range(self.num_layers)]
        return out

    def step(self, ids: torch.Tensor, return_layers: bool = False) -> StepOutput:
        """Feed one token per row (B,) at the next position; each row runs until its exit.

        With `return_layers`, also returns each computed layer's logits (slow: a head at every layer).
        At batch 1 the returned `exit_layer` is a tensor the decoder reuses: read it, do not write to it.
        """
        if not torch.is_inference_mode_enabled():  # entering costs microseconds: callers may hold it
            with torch.inference_mode():
                return self.step(ids, return_layers)
        B, L, t = self.batch_size, self.num_layers, self.pos
        if ids.shape != (B,):
            raise ValueError(f"step: ids must have shape ({B},), got {tuple(ids.shape)}")
        if t >= self.max_len:
            self._room(1)
        if self._one_row and not return_layers:
            return self._step_one_row(ids, t)
        V = self._vocab
        recompute = self.kv_mode == "recompute"
        h = self._embedding.index_select(0, ids)  # (B, C)
        logits_out: torch.Tensor | None = None
        exit_out = torch.full((B,), L, dtype=torch.long, device=self.device)
        layer_logits: dict[int, torch.Tensor] | None = {} if return_layers else None
        rows: torch.Tensor | None = None  # indices of the rows still running; None = every row
        qk = v = None  # the next block's projections, when an exit matmul has computed them
        # With `kv_with_layers`: stopped rows whose K/V the blocks above still need, (normalised exit states,
        # batch rows); `fresh` joins `pending` after the next block (the exit matmul gave them that block's K/V).
        pending: tuple[torch.Tensor, torch.Tensor] | None = None
        fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        for i in range(L):
            if recompute:
                h = self._block_recompute(i, h, rows, t)
            else:
                if qk is None:
                    qk, v = self._qkv(i, h) if pending is None else self._qkv_pending(i, h, pending, t)
                elif pending is not None:  # this block's projections came from an exit matmul (cascades)
                    self._kv_pending(i, pending, t)
                if fresh is not None:
                    pending = (
                        fresh
                        if pending is None
                        else (torch.cat((pending[0], fresh[0])), torch.cat((pending[1], fresh[1])))
                    )
                    fresh = None
                h = self._block_one(i, h, qk, v, rows, t)
                qk = v = None
                self.layer_tokens += h.shape[0]
            if layer_logits is not None:
                layer_logits[i + 1] = self._scatter_rows(self._unembed(h), rows)
            threshold = self._thresholds[i]
            if threshold is None and i < L - 1:
                continue
            u = self._normalize(h)
            fused = self._exit_w.get(i)
            out = torch.mm(u, self._head if fused is None else fused)  # (Ba, V [+ 3C or C + 2dC])
            logits = out[:, :V]
            stop: torch.Tensor | None = None  # None: every running row stops here
            if i < L - 1:
                confidence = self._confidence(logits)  # (Ba,)
                if h.shape[0] == 1:  # one running row: a Python bool, no index bookkeeping
                    if confidence.item() < threshold:
                        if fused is not None:
                            qk, v = self._next_qkv(out, i)
                        continue
                else:
                    stop = confidence >= threshold
                    n_stop = int(stop.sum())
                    if n_stop == 0:
                        if fused is not None:
                            qk, v = self._next_qkv(out, i)
                        continue
                    if n_stop == h.shape[0]:
                        stop = None
            if stop is None:
                if rows is None:
                    logits_out = logits
                    exit_out.fill_(i + 1)
                else:
                    logits_out[rows] = logits
                    exit_out[rows] = i + 1
                if pending is not None:  # they need blocks i+1.. too: one matmul with the rows stopping now
                    u, rows = torch.cat((u, pending[0])), torch.cat((rows, pending[1]))
                self._finish(i, h, u, out, rows, t)
                break
            if logits_out is None:
                logits_out = logits.new_empty(B, V)
            stopped = stop.nonzero().squeeze(1) if rows is None else rows[stop]
            logits_out[stopped] = logits[stop]
            exit_out[stopped] = i + 1
            if self._kv_with_layers:  # block i+1's K/V from the exit matmul, the rest beside the running rows
                C = self.dim
                self._layer_kv(i + 1, out[stop, V + C : V + 2 * C], out[stop, V + 2 * C : V + 3 * C], stopped, t)
                if i + 2 < L:
                    fresh = (u[stop], stopped)
            else:
                self._finish(i, h[stop], u[stop], out[stop], stopped, t)
            keep = ~stop
            h = h[keep]
            rows = keep.nonzero().squeeze(1) if rows is None else rows[keep]
            if fused is not None:
                qk, v = self._next_qkv(out[keep], i)
        self.pos += 1
        return StepOutput(logits_out, exit_out, layer_logits)

    def _qkv_pending(
        self, i: int, h: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor], t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_qkv` for the running rows, with the pending stopped rows' K/V of block i from the same matmul.

        Where a block's matmul costs about as much for 8 rows as for 4 (reading the weights dominates), the
        stopped rows' K/V ride along nearly free, instead of a matmul of their own over every skipped block's
        K/V weights (as large as a whole block at d = 7)."""
        u, rows = pending
        Ba, C = h.shape[0], self.dim
        qkv = torch.mm(torch.cat((self._normalize(h), u)), self._blocks[i].qkv)
        self._layer_kv(i, qkv[Ba:, C : 2 * C], qkv[Ba:, 2 * C :], rows, t)
        return qkv[:Ba, : 2 * C], qkv[:Ba, 2 * C :]

    def _kv_pending(self, i: int, pending: tuple[torch.Tensor, torch.Tensor], t: int) -> None:
        """Block i's K/V of the pending stopped rows by a matmul of their own."""
        u, rows = pending
        kv = torch.mm(u, self._blocks[i].qkv[:, self.dim :])
        self._layer_kv(i, kv[:, : self.dim], kv[:, self.dim :], rows, t)

    def _layer_kv(self, i: int, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, t: int) -> None:
        """Store block i's K (rotated to position t) and V of the given batch rows. keys, values: (n, C)."""
        n, nh, hd = keys.shape[0], self.num_heads, self.head_dim
        k = torch.mm(keys.reshape(-1, hd), self._rot[t]).view(n, nh, hd)
        self._k_layer[i].select(3, t).index_copy_(0, rows, k)
        self._v_layer[i].select(2, t).index_copy_(0, rows, values.reshape(n, nh, hd))
        self.kv_tokens += n

    def _step_one_row(self, ids: torch.Tensor, t: int) -> StepOutput:
        """`step` for batch 1 in propagate mode: the same computation with no row bookkeeping at all."""
        L, nh, hd, C, V = self.num_layers, self.num_heads, self.head_dim, self.dim, self._vocab
        max_prob = self._confidence is _max_prob
        word = int(ids)
        if word < 0:  # narrow would count from the end, where index_select raised
            raise IndexError(f"step: token id {word} is negative")
        h = self._embedding.narrow(0, word, 1)  # (1, C), a view: blocks never write into their input
        qk, v = self._qk_words.narrow(0, word, 1), self._v_words.narrow(0, word, 1)
        for i in range(L):
            if qk is None:
                qk, v = self._qkv(i, h)
            h = self._block_one(i, h, qk, v, None, t)
            qk = None
            threshold = self._thresholds[i]
            if i == L - 1:
                logits = torch.mm(self._normalize(h), self._head)
                break
            if threshold is None:
                continue
            u = self._normalize(h)
            out = torch.mm(u, self._exit_w[i])  # (1, V + 3C) split, (1, V + C + 2dC) fused
            logits = out.narrow(1, 0, V)
            v_start = self._exit_v_start[i]
            # softmax().max() reduces to a 0-d tensor, a little cheaper than amax(-1) of a row: same value
            confidence = logits.softmax(-1).max() if max_prob else self._confidence(logits)
            if confidence.item() >= threshold:  # stop: propagate K/V to layers i+2..L
                d = L - 1 - i
                kv_w = self._exit_kv.get(i)
                if kv_w is None:
                    keys, values = out.narrow(1, V + C, d * C), out.narrow(1, v_start, d * C)
                else:
                    kv = torch.mm(u, kv_w)
                    keys, values = kv.narrow(1, 0, d * C), kv.narrow(1, d * C, d * C)
                k = torch.mm(keys.reshape(-1, hd), self._rot[t])  # (d nh, hd)
                self._k_above[i + 1].select(4, t).copy_(k.view(d, 1, nh, hd))
                self._v_above[i + 1].select(3, t).copy_(values.reshape(d, 1, nh, hd))
                self.kv_tokens += d
                break
            qk, v = out.narrow(1, V, 2 * C), out.narrow(1, v_start, C)  # block i+1's q|k and v
        self.layer_tokens += i + 1
        self.pos = t + 1
        return StepOutput(logits, self._exit_ids[i])

    def _next_qkv(self, out: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i+1's q|k and v from the exit matmul's output (see `refresh_weights`)."""
        V, C, v_start = self._vocab, self.dim, self._exit_v_start[i]
        return out[:, V : V + 2 * C], out[:, v_start : v_start + C]

    def _finish(
        self, i: int, h: torch.Tensor, u: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None, t: int
    ) -> None:
        """Rows that stop after block i (h, normalised u, exit matmul's out): give the blocks above them what
        later tokens will attend to."""
        e = i + 1
        if e == self.num_layers:
            return
        if self.kv_mode == "propagate":
            V, C, d = self._vocab, self.dim, self.num_layers - e
            kv_w = self._exit_kv.get(i)
            if kv_w is None:
                self._write_kv(e, out[:, V + C : V + C + d * C], out[:, V + C + d * C :], rows, t)
            else:  # split: the skipped blocks' K/V for the stopping rows only
                kv = torch.mm(u, kv_w)
                self._write_kv(e, kv[:, : d * C], kv[:, d * C :], rows, t)
        elif rows is None:
            self._hidden[:, t] = h  # pending: computed when a later token needs these layers
        else:
            self._hidden[rows, t] = h

    def _scatter_rows(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return x
        out = x.new_full((self.batch_size, *x.shape[1:]), float("nan"))
        out[rows] = x
        return out


# Above this many bytes of skipped blocks' K/V weights an exit computes them apart, for the stopping rows only
# (`FusedDecoder._split_exit`): 256 KiB, about the weights a core reads in the time of a few extra calls.
SPLIT_EXIT_BYTES = 256 * 1024
# Up to this batch size stopped rows' K/V ride along with the running rows' projections: measured (CPU time, dim
# 512, ~50% exits) faster than the split matmul at batch 8 (1.07x vs 1.00x full depth) and 32 (0.92x vs 0.86x).
KV_WITH_LAYERS_MAX_BATCH = 32


def _max_prob(logits: torch.Tensor) -> torch.Tensor:
    """`ease.routing.max_prob` for float32 logits, without its dtype conversion call."""
    return logits.softmax(-1).amax(-1)


def _t(w: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous transpose: (out, in) -> (in, out) for `torch.mm(x, w)`."""
    return w.detach().t().contiguous()
