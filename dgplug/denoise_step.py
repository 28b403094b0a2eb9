"""The denoise step on static buffers, replayed as one CUDA graph on a GPU.

`generate` (rng="counter") runs every denoise step through `DenoiseStep.run`: decoder forward
over [cache; canvas], fused head + sampler, acceptance, re-noise, lock, freeze and stop test,
all written in place into buffers that keep their addresses for the whole generation. Nothing
in the step reads a value back to the host or depends on one, so on CUDA the first step runs
eagerly (it compiles the Triton kernels) and the second captures the step as a CUDA graph that
every later step, canvas and `generate` call with the same (batch, cache capacity, steps,
stability) replays. On a CPU the same step simply runs eagerly: one code path, tested here.

What changes from step to step lives in device tensors: the canvas, the global step counter and
the steps left (which pick the temperature and the RNG keys), the seed's key, the entropy bound
and confidence threshold. The prompt's cache is copied after its encoder pass into fixed-size
buffers (full layers: capacity slots; sliding layers: the last window - 1), with a validity mask
for unfilled slots and left padding, and the canvas's keys go to a tail of the same buffers.
Each committed canvas is encoded on the same buffers (`DenoiseStep.commit`, a second graph): its
keys go to the tail, then into the ring of slots at a device-held offset, so one graph serves
every canvas. `DGPLUG_CUDA_GRAPHS=0` turns capture off (eager passes on the same buffers, same
tokens).

Settled rows leave the batch: after a step, when the rows still denoising (neither frozen by the
stop test nor finished) fit a smaller batch, `settle` moves them to the front of every row-indexed
buffer (the cache's rows with them) and later steps compute only those. On a CPU the batch is
exactly the rows left; on CUDA the next power of two, so that a few graphs (one per size, sharing
one memory pool) serve every batch. A committed canvas brings back the rows frozen in it, and
leaves out those finished for good. `order` maps buffer slots to the caller's rows: RNG keys
follow the row, not the slot, and what the caller reads comes back in its own order.
`DGPLUG_COMPACT=0` keeps every row in every step (a row's tokens may differ in the last bits
of a sum: matrix products are not batch-invariant).
"""

from __future__ import annotations

import copy

import torch

from . import sampler as sp
from . import settings
from .model import KVCache

NOISE_STEP = 1 << 31  # RNG step ids of the initial canvases: (NOISE_STEP + canvas index)
_KEEP = 2  # DenoiseStep objects (and graphs) kept per model


def graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and settings.on("DGPLUG_CUDA_GRAPHS")


def compaction_enabled() -> bool:
    return settings.on("DGPLUG_COMPACT")


def rows_bucket(alive: int, batch: int, device: torch.device) -> int:
    """Rows a step computes when `alive` are still denoising: those on a CPU; on CUDA the next power
    of two (at most the batch), so that eager and graph replays compute the same batch."""
    if device.type != "cuda":
        return alive
    return min(batch, 1 << max(0, alive - 1).bit_length())


def capacity_bucket(length: int) -> int:
    """Cache slots for a context of `length`: the next power of two (>= 256), so that calls of
    similar lengths share one graph."""
    return max(256, 1 << max(0, length - 1).bit_length())


class StaticLayerCache:
    """One layer's keys and values in fixed buffers: `cap` cache slots, then the canvas.

    The slots are a ring: a committed canvas's keys go to slots (filled + i) mod cap, so a
    sliding layer (cap = window - 1) overwrites its oldest keys and a full layer (cap = the
    capacity bucket) appends. Attention masks by position and validity, so slot order is free."""

    def __init__(self, batch, kv_heads, head_dim, cap, canvas, dtype, device):
        self.cap, self.canvas = cap, canvas
        self.keys = torch.zeros(batch, kv_heads, cap + canvas, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.pos = torch.zeros(cap + canvas, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, cap + canvas, dtype=torch.bool, device=device)
        self.filled = torch.zeros(1, dtype=torch.long, device=device)  # keys ever written to the ring
        kept = min(canvas, cap)  # of a committed canvas, the last `kept` keys can stay in the ring
        self.kept = torch.arange(canvas - kept, canvas, device=device)

    def load(self, layer, mask, canvas_pos):
        """Copy an encoder-written LayerCache in; unfilled slots are invalid, the canvas valid."""
        n = layer.keys.shape[2]
        if n > self.cap:
            raise RuntimeError(f"cache of {n} keys does not fit {self.cap} static slots")
        self.keys[:, :, :n].copy_(layer.keys)
        self.values[:, :, :n].copy_(layer.values)
        self.pos[:n].copy_(layer.pos)
        self.pos[self.cap:].copy_(canvas_pos)
        self.valid[:, :n] = mask[:, layer.pos] if mask is not None else True
        self.valid[:, n:self.cap] = False
        self.valid[:, self.cap:] = True
        self.filled.fill_(n)

    def rows(self, n: int) -> "StaticLayerCache":
        """The first n rows (views: same storage, shared positions and ring offset)."""
        view = copy.copy(self)
        view.keys, view.values, view.valid = self.keys[:n], self.values[:n], self.valid[:n]
        return view

    def permute_rows(self, perm, among: int):
        """Rows [:among] in the order perm."""
        for buf in (self.keys, self.values, self.valid):
            buf[:among].copy_(buf[:among].index_select(0, perm))

    def canvas_slots(self):
        """Where the canvas's k and v go: the tail (Attention.project writes them there)."""
        return self.keys[:, :, self.cap:], self.values[:, :, self.cap:]

    def with_canvas(self, k, v, pos, mask):
        """A pass over the canvas: its keys in the tail (copied unless written there); every slot
        attended, masked."""
        for buf, t in ((self.keys, k), (self.values, v)):
            tail = buf[:, :, self.cap:]
            if t.data_ptr() != tail.data_ptr():
                tail.copy_(t)
        return self.keys, self.values, self.pos, self.valid

    def keep(self, keys, values, k_pos, window):
        """After the encoder's pass over a committed canvas: its keys join the ring; the tail's
        positions move on to the next canvas. Device indices only (capturable)."""
        slots = (self.filled + self.kept) % self.cap
        tail = self.cap + self.kept
        for buf in (self.keys, self.values):
            buf.index_copy_(2, slots, buf.index_select(2, tail))
        self.pos.index_copy_(0, slots, self.pos.index_select(0, tail))
        self.valid.index_fill_(1, slots, True)
        self.filled.add_(self.canvas)
        self.pos[self.cap:].add_(self.canvas)


class StaticKVCache:
    """What `DiffusionGemma.denoise` reads in place of a KVCache."""

    def __init__(self, model, batch, capacity, device):
        tc, C = model.tc, model.cfg.canvas_length
        self.canvas_pos = torch.zeros(C, dtype=torch.long, device=device)
        self.layers = []
        for i, layer in enumerate(model.layers):
            att = layer.self_attn
            cap = min(capacity, tc.sliding_window - 1) if att.sliding else capacity
            self.layers.append(StaticLayerCache(batch, att.kv_heads, att.head_dim, cap, C, model.dtype, device))

    def load(self, cache: KVCache, mask):
        self.canvas_pos.copy_(cache.canvas_positions(self.canvas_pos.numel(), self.canvas_pos.device))
        for static, layer in zip(self.layers, cache.layers):
            static.load(layer, mask, self.canvas_pos)
        self.length = cache.length  # keys written (host count; the full layers' slots must hold them)

    def reserve(self, model, n: int):
        """Count n more keys on the host (a graph replay runs no Python); the full layers must hold them."""
        full = min((s.cap for s, layer in zip(self.layers, model.layers) if not layer.self_attn.sliding), default=None)
        if full is not None and self.length + n > full:
            raise RuntimeError(f"{self.length + n} keys do not fit the full layers' {full} static slots")
        self.length += n

    def commit(self, model, canvas):
        """The encoder's causal pass over the committed canvas [B, C]: its keys join the cache
        (StaticLayerCache.keep), the next canvas's positions follow. Device work only."""
        model.run_layers(model.embed(canvas), self.canvas_pos, self, "encode")
        self.canvas_pos.add_(canvas.shape[1])

    def canvas_positions(self, L, device):
        return self.canvas_pos

    def rows(self, n: int) -> "StaticKVCache":
        """The first n rows of every layer (views)."""
        view = copy.copy(self)
        view.layers = [layer.rows(n) for layer in self.layers]
        return view


class DenoiseStep:
    """Static buffers for one (batch, capacity, steps, stability) and the step over them.

    Row-indexed buffers hold the caller's row `order[p]` in slot p; a step computes slots [:n]."""

    ROWS = ("canvas", "argmax", "lock", "sc_soft", "accepted", "entropy", "frozen", "finished", "forwards",
            "order")  # and history (rows on dim 1) and the cache's rows

    def __init__(self, model, batch: int, capacity: int, n_steps: int, stability: int, device):
        C, D = model.cfg.canvas_length, model.tc.hidden_size
        self.model, self.B, self.C, self.N, self.stability = model, batch, C, n_steps, stability
        self.cache = StaticKVCache(model, batch, capacity, device)
        i64, f32 = dict(dtype=torch.long, device=device), dict(dtype=torch.float32, device=device)
        self.canvas = torch.zeros(batch, C, **i64)  # the next input canvas
        self.argmax = torch.zeros(batch, C, **i64)  # the draft
        self.lock = torch.zeros(batch, C, dtype=torch.bool, device=device)
        self.sc_soft = torch.zeros(batch, C, D, **f32)  # self-conditioning input; zeros = none (exact)
        self.accepted = torch.zeros(batch, C, dtype=torch.bool, device=device)
        self.entropy = torch.zeros(batch, C, **f32)
        self.frozen = torch.zeros(batch, dtype=torch.bool, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.forwards = torch.zeros(batch, dtype=torch.int32, device=device)
        self.history = torch.full((max(stability, 1), batch, C), -1, **i64)
        self.committed = torch.zeros(batch, C, **i64)  # the canvas the encoder pass reads
        self.order = torch.arange(batch, **i64)  # the caller's row in each slot
        self.n = batch  # slots a step computes (host)
        self.compact = compaction_enabled()  # settled rows leave the batch (set again by start)
        self.temps = torch.zeros(n_steps + 1, **f32)  # T for n steps left, n = 0..N
        self.left = torch.zeros(1, **i64)  # steps left in this canvas (indexes temps)
        self.step = torch.zeros(1, **i64)  # steps so far in this generation (keys the RNG)
        self.seed = torch.zeros(1, **i64)  # seed_key(seed)
        self.bound = torch.zeros((), **f32)
        self.confidence = torch.zeros((), **f32)
        self.alive = torch.zeros((), **i64)  # rows neither frozen nor finished (the step's host read)
        self.graphs = {}  # "step" / "commit" (with ":n" below the full batch): the CUDA graph, or None after warm-up
        self.pool = None  # one memory pool for all graphs (they never run at once)

    # -- per call and per canvas (eager) ------------------------------------------------------
    def start(self, *, seed: int, bound: float, confidence: float, t_min: float, t_max: float):
        from dgplug.kernels.sampler import seed_key

        self.seed_int = int(seed)
        n = torch.arange(self.N + 1, dtype=torch.int32)  # as sampler.temperature, elementwise
        self.temps.copy_(t_min + ((t_max - t_min) * (n / self.N)))
        self.seed.fill_(seed_key(seed))
        self.bound.fill_(bound)
        self.confidence.fill_(confidence)
        self.step.zero_()
        self.forwards.zero_()
        self.finished.zero_()
        torch.arange(self.B, out=self.order)
        self.n = self.B
        self.compact = compaction_enabled()  # read once per call: a change mid-call cannot strand rows

    def start_canvas(self, index: int, cache: KVCache | None, mask, canvas=None, lock=None):
        """After the encoder pass: load the cache (the prompt's KVCache; None after `commit`, which
        wrote the static cache itself), draw the canvas's noise, reset its state. canvas, lock:
        [B, C] in the caller's row order."""
        from dgplug.kernels.sampler import canvas_row_keys, counter_tokens

        keys = canvas_row_keys(self.seed_int, NOISE_STEP + index, self.B * self.C, device=self.canvas.device)
        noise = counter_tokens(keys, self.model.tc.vocab_size).view(self.B, self.C)
        self.canvas.copy_(self.slotted(canvas if canvas is not None else noise))
        self.lock.copy_(self.slotted(lock) if lock is not None else torch.zeros_like(self.lock))
        self.argmax.copy_(self.canvas)
        if cache is not None:
            self.cache.load(cache, mask)
        self.sc_soft.zero_()
        self.frozen.zero_()
        self.history.fill_(-1)
        self.left.fill_(self.N)
        self.alive.copy_((~self.finished).sum())

    # -- rows: the caller's order <-> slots ------------------------------------------------------
    def slotted(self, t: torch.Tensor) -> torch.Tensor:
        """A [B, ...] tensor in the caller's row order, as the slots hold it."""
        return t.index_select(0, self.order)

    def ordered(self, t: torch.Tensor) -> torch.Tensor:
        """A [B, ...] buffer back in the caller's row order."""
        return torch.empty_like(t).index_copy_(0, self.order, t)

    def settle(self, alive: int):
        """After a step that left `alive` rows denoising: when they fit a smaller batch, move them to
        the front and compute only those from now on."""
        n = rows_bucket(alive, self.B, self.canvas.device)
        if 0 < n < self.n and self.compact:
            self._regroup(n, self.n)  # the slots past n hold settled rows already: they stay

    def _regroup(self, n: int, among: int):
        """Of the first `among` slots, the rows neither frozen nor finished to the front (in order),
        every row's state with them; then compute n slots."""
        perm = torch.argsort((self.frozen | self.finished)[:among].to(torch.int32), stable=True)
        for name in self.ROWS:
            buf = getattr(self, name)[:among]
            buf.copy_(buf.index_select(0, perm))
        history = self.history[:, :among]
        history.copy_(history.index_select(1, perm))
        for layer in self.cache.layers:
            layer.permute_rows(perm, among)
        self.n = n

    # -- the step -----------------------------------------------------------------------------
    def _step(self):
        from dgplug.kernels.sampler import head_sample, step_keys

        m, B, C, n = self.model, self.B, self.C, self.n
        cache = self.cache if n == B else self.cache.rows(n)
        canvas0, argmax0, lock, sc0, frozen, finished = (
            t[:n] for t in (self.canvas, self.argmax, self.lock, self.sc_soft, self.frozen, self.finished))
        history = self.history[:, :n]
        self.forwards[:n].add_((~(frozen | finished)).int())
        h = m.denoise(canvas0, cache, sc_soft=sc0)
        keys, renoise = step_keys(self.seed, self.step, B * C, m.tc.vocab_size)  # keyed by the caller's rows
        if B > 1:
            keys = keys.view(B, C).index_select(0, self.order[:n]).view(-1)
            renoise = renoise.view(B, C).index_select(0, self.order[:n])
        r = head_sample(h.reshape(n * C, -1), m.embed_tokens.weight, softcap=m.tc.final_logit_softcapping,
                        temperature=self.temps.index_select(0, self.left), keys=keys)
        entropy = r.entropy.view(n, C)
        acc = sp.accept(entropy, self.bound) | lock
        sampled = torch.where(lock, canvas0, r.token.view(n, C))
        keep = (frozen | finished)[:, None]  # rows settled before this step: their state stays
        canvas = torch.where(keep, canvas0, torch.where(acc, sampled, renoise.view(n, C)))
        argmax = torch.where(keep, argmax0, torch.where(lock, canvas0, r.argmax.view(n, C)))
        soft = torch.where(keep[..., None], sc0, r.soft.view(n, C, -1))
        if self.stability == 0:
            stable = torch.ones_like(frozen)
        else:
            stable = (history == argmax[None]).all(dim=-1).all(dim=0)
            history.copy_(history.roll(-1, 0))
            history[-1].copy_(argmax)
        frozen |= stable & (entropy.mean(dim=-1) < self.confidence) & ~finished
        canvas0.copy_(canvas)
        argmax0.copy_(argmax)
        sc0.copy_(soft)
        accepted0, entropy0 = self.accepted[:n], self.entropy[:n]  # a frozen row's: those of its last step
        accepted0.copy_(torch.where(keep, accepted0, acc))
        entropy0.copy_(torch.where(keep, entropy0, entropy))
        self.step.add_(1)
        self.left.sub_(1)
        self.alive.copy_((~(frozen | finished)).sum())

    def _commit(self):
        cache = self.cache if self.n == self.B else self.cache.rows(self.n)
        cache.commit(self.model, self.committed[:self.n])

    def _name(self, name: str) -> str:
        return name if self.n == self.B else f"{name}:{self.n}"

    def run(self):
        """One denoise step: eager the first time (and on CPU), a graph replay after that."""
        self._graphed(self._name("step"), self._step)

    def commit(self, canvas: torch.Tensor, finished: torch.Tensor | None = None):
        """The encoder pass over the committed canvas [B, C] (after `generation._commit`'s padding)
        into the static cache: eager the first time (and on CPU), then a graph. finished [B]: rows
        done for good (both in the caller's order); the rows frozen in the last canvas come back."""
        self.cache.reserve(self.model, self.C)
        if finished is not None:
            self.finished.copy_(self.slotted(finished.to(self.finished.device)))
        self.frozen.zero_()
        if self.n < self.B or (self.compact and finished is not None and bool(finished.any())):
            alive = int((~self.finished).sum())
            self._regroup(rows_bucket(max(alive, 1), self.B, self.canvas.device), self.B)
        self.committed.copy_(self.slotted(canvas))
        self._graphed(self._name("commit"), self._commit)

    def _graphed(self, name: str, fn):
        if not graphs_enabled(self.canvas.device):
            return fn()
        graph = self.graphs.get(name)
        if graph is not None:
            return graph.replay()
        if name not in self.graphs:  # the first run compiles kernels
            _warm_up(fn)
            self.graphs[name] = None
            return None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = self.graphs[name] = _capture(fn, self.pool)
        return graph.replay()


def _warm_up(fn):
    """fn run on a side stream, as capture wants."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


def _capture(fn, pool) -> torch.cuda.CUDAGraph:
    """fn captured as a CUDA graph in the memory pool (capture records, it does not run: state is unchanged)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def for_generation(model, batch: int, context: int, n_steps: int, stability: int) -> DenoiseStep:
    """The model's DenoiseStep for this shape (made, or reused with its graph)."""
    device = model.device
    key = (batch, capacity_bucket(context), n_steps, stability, str(device), model.dtype)
    steps = model.__dict__.setdefault("_denoise_steps", {})
    if key not in steps:
        while len(steps) >= _KEEP:
            steps.pop(next(iter(steps)))
        steps[key] = DenoiseStep(model, batch, key[1], n_steps, stability, device)
    return steps[key]
