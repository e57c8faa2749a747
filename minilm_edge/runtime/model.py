"""The runtime model: config (blueprint), weights, and a forward pass over a preallocated KV cache.

`forward` runs T new tokens through every block, appending their keys/values to the cache, and
returns logits. Prefill is T = prompt length; decode is T = 1. Compute is float32; the linears are
whatever format the checkpoint holds (`linear.LINEAR_FORMATS`).
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numba
import numpy as np

from ..errors import ContextOverflowError, UsageError
from ..formats.manifest import check_folder
from ..formats.trust import enforce_policy
from ..kernels import ops_f32 as kernels
from ..kernels.policy import blas_threads
from ..kernels.quant_i8_matmul import use_int8_activations
from .blocks import layer_inv_freqs, project_qkv, run_blocks
from .checkpoint import Weights, load_weights
from .config import LlamaConfig, load_config, read_json
from .decode import build_plan
from .linear import fuse_rows
from .tokenizer import Tokenizer

BLAS_PARALLEL_MIN_TOKENS = 64   # tokens per forward call from which BLAS gets more than one thread
# The context a chat gets when none is asked for: the model's, up to this many positions. The cache
# is mapped lazily, but its address space must exist: a config.json claiming 1e9 positions ended in
# ENOMEM, and a 128k-position model would map gigabytes per session. --ctx asks for more.
DEFAULT_CONTEXT = 32768


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/Dh) for i < Dh/2, with Llama-3 scaling when configured.  -> [Dh/2]"""
    Dh = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    # Llama 3.x: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    wavelen = 2 * np.pi / inv
    lo_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    hi_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    scaled = np.where(wavelen > lo_wl, inv / rs.factor, inv)
    blended = (1 - smooth) * inv / rs.factor + smooth * inv
    return np.where((wavelen <= lo_wl) & (wavelen >= hi_wl), blended, scaled)


def lazy_zeros(shape, dtype=np.float32) -> np.ndarray:
    """A zero-filled array whose pages become resident only when written.

    np.zeros is lazy too, but with transparent huge pages a first write commits 2 MB at once: a KV
    cache sized for 8192 positions then costs ~400 MB after one short chat turn. An anonymous map
    advised not to use huge pages commits 4 KB pages as positions are written.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    mm = mmap.mmap(-1, nbytes)
    mm.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mm, dtype=dtype).reshape(shape)


class KVCache:
    """Keys and values of every block for up to `max_len` positions, allocated once.

    k, v: [L, Hkv, S, Dh] float32 (`lazy_zeros`: pages become resident only as positions are written).
    `tokens` are the ids whose keys/values are held, so a chat can reuse the common prefix.
    """

    def __init__(self, cfg: LlamaConfig, max_len: int, pool: tuple | None = None):
        """pool: (kp, vp, slot): keep k, v in slot `slot` of a pool kp, vp [P, L, Hkv, S, Dh] instead
        (batch.BatchDecoder's; Model.decode_batch then steps its sequences' attention in one call)."""
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, max_len, cfg.head_dim)
        if pool is not None:
            kp, vp, slot = pool
            assert kp.shape[1:] == shape and vp.shape == kp.shape
            self.k, self.v = kp[slot], vp[slot]
        else:
            self.k = lazy_zeros(shape)
            self.v = lazy_zeros(shape)
        self.pool = pool
        self.scratch = np.zeros((cfg.num_attention_heads, max_len), np.float32)   # [H, S] scores
        self.max_len = max_len
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        """Forget positions n and after (their stale values are overwritten before being read)."""
        del self.tokens[n:]


class Model:
    """A loaded model. Construct with `minilm_edge.load(path)`."""

    def __init__(self, config: LlamaConfig, weights: Weights, tokenizer: Tokenizer | None,
                 generation_config: dict | None = None, path: Path | None = None, int8_activations: bool = True):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.path = path
        self._inv_freq = rope_inv_freq(config)
        # All-int4 blocks: one compiled call per decoded token (decode.py); the blocks' linears
        # become views into its stacked weights. Otherwise, per block, q|k|v and gate|up are fused
        # into one linear where the format allows (fewer calls per token), else None.
        self._plan = build_plan(config, weights.blocks) if config.arch.plain else None
        self._layer_inv_freq = layer_inv_freqs(config, self._inv_freq)   # RoPE base per layer (blocks.py)
        self._fused_decode = self._plan is not None
        self._batch_step = None                     # batch_step.BatchStep: the B-row step's buffers, made at first use
        if self._plan is not None:
            self._fused = self._use_plan_views()
            if weights.source is not None:
                # What load read of the file (copied stacks, the scales of older files, norms) need
                # not stay in the RSS; views of the file fault their pages back in as decode reads them.
                weights.source.release_pages()
        else:
            self._fused = [(fuse_rows([b.q, b.k, b.v]), fuse_rows([b.gate, b.up])) for b in weights.blocks]
        self.set_int8_activations(int8_activations)

    def _use_plan_views(self):
        c, p = self.config, self._plan
        nq, nkv, F = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
        fused = []
        for l, b in enumerate(self.weights.blocks):
            # int8 linears stay themselves (the stacks hold placeholders; their rows: decode.stack_q8)
            own = {n: getattr(b, n) for n in ("q", "k", "v", "o", "gate", "up", "down") if getattr(b, n).kind != "q4"}
            b.q, b.k, b.v = p.qkv.layer(l, 0, nq), p.qkv.layer(l, nq, nq + nkv), p.qkv.layer(l, nq + nkv)
            b.o, b.down = p.o.layer(l), p.down.layer(l)
            b.gate, b.up = p.gate_up.layer(l, 0, F), p.gate_up.layer(l, F)
            for n, lin in own.items():
                setattr(b, n, lin)
            qkv_own = any(n in own for n in ("q", "k", "v"))
            gate_up_own = "gate" in own or "up" in own
            fused.append((None if qkv_own else p.qkv.layer(l), None if gate_up_own else p.gate_up.layer(l)))
        return fused

    @property
    def decode_plan(self):
        """The one-call decode plan (decode.DecodePlan: stacked int4 weights and step buffers), or
        None when the blocks are not all int4 or their stacks do not line up."""
        return self._plan

    @property
    def fused_decode(self) -> bool:
        """Whether a one-token forward runs through `decode_plan` (True by default where there is
        one). Set False to decode through the per-linear path, the same arithmetic kernel by
        kernel (an A/B reference); True needs a plan."""
        return self._fused_decode

    @fused_decode.setter
    def fused_decode(self, on: bool) -> None:
        if on and self._plan is None:
            raise UsageError("fused decode needs every block linear in int4 (minilm-q4) with stackable shapes")
        self._fused_decode = bool(on)

    def set_int8_activations(self, on: bool) -> None:
        """Multiply int4 linears (prefill and decode) and int8 ones (prefill) with int8 activations
        (on: the default; used where the CPU has an int8 dot, AVX512-VNNI, AVX-VNNI or AVX2:
        kernels/int8_dot.py, quant_i8_matmul.use_int8_activations, quant_i8_matvec.supports_i8) or in
        float32 (off: the accuracy reference)."""
        from .linear import Q4, Q8
        blocks = self.weights.blocks
        linears = [getattr(b, n) for b in blocks for n in ("q", "k", "v", "o", "gate", "up", "down")]
        # Every block linear int4 (or int8): with int8 activations Numba kernels do all of a block's products
        # and BLAS only attention (see hidden_states).
        self._int8_blocks = on and all(isinstance(lin, (Q4, Q8)) for lin in linears)
        linears += [lin for pair in self._fused for lin in pair] + [self.weights.lm_head]
        for lin in linears:
            if isinstance(lin, (Q4, Q8)):
                lin.int8_activations = on
        if self._plan is not None:
            self._plan.int8 = on          # used where the plan allows it (DecodePlan.int8_ok)

    # ---- forward
    def new_cache(self, max_len: int | None = None) -> KVCache:
        """A KV cache for `max_len` positions; None: the model's context, at most DEFAULT_CONTEXT
        (a larger one is asked for explicitly: its cache may not fit in memory)."""
        limit = self.config.max_position_embeddings
        n = min(limit, DEFAULT_CONTEXT) if max_len is None else int(max_len)
        if not 0 < n <= limit:
            raise UsageError(f"context length must be 1..{limit}, got {n}")
        try:
            return KVCache(self.config, n)
        except (MemoryError, OSError) as e:           # mmap's ENOMEM, or a refused np.zeros
            c = self.config
            gb = 2 * c.num_hidden_layers * c.num_key_value_heads * n * c.head_dim * 4 / 1e9
            raise UsageError(f"a KV cache of {n} positions ({gb:.1f} GB) cannot be allocated ({e}); "
                             "choose a smaller context (--ctx)") from None

    def forward(self, ids, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Logits of the given tokens, appended after what `cache` holds.      [T] -> [T, V] float32

        Without a cache the tokens are the whole sequence. With `last_only`, only the last position's
        logits are computed ([1, V]): what generation needs, and 1/T of the lm_head cost.
        """
        x = self.hidden_states(ids, cache, last_only)
        return self.weights.lm_head(x)                                     # [T, D] -> [T, V]

    def prefill_batch(self, prompts: list, caches: list) -> np.ndarray:
        """`forward(prompts[i], caches[i], last_only=True)` for every i: the logits of each prompt's
        last token, its keys and values stored in caches[i].                    -> [n, V] float32

        Bit for bit what each forward gives alone, in fewer calls: the prompts whose forward takes
        the int8-activation kernels for every block linear (plain Llama blocks, at least
        INT8_MIN_TOKENS tokens) go through the blocks together, each linear multiplying all their
        rows at once (those kernels treat each row alone: the same products, the weights read once
        for all; tests/test_batch.py), and the head's `rows` give each row its single-stream matvec.
        Every other prompt runs its own forward. Batched decoding (batch.BatchDecoder) prefills
        the prompts that joined since its last step this way: 8 short prompts cost about what 2 do.
        """
        from .linear import Q8
        if len(prompts) != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise UsageError("prefill_batch needs one prompt per cache, each cache different")
        ids = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        for i, cache in zip(ids, caches):
            if i.size == 0:
                raise UsageError("forward needs at least one token")
            if i.min() < 0 or i.max() >= self.config.vocab_size:
                raise UsageError(f"token ids must be in 0..{self.config.vocab_size - 1}")
            if cache.length + i.size > cache.max_len:
                raise ContextOverflowError(
                    f"{cache.length} tokens in context + {i.size} new exceed the context size {cache.max_len}")
        head = self.weights.lm_head
        together = [j for j, i in enumerate(ids) if self.config.arch.plain and self._int8_blocks
                    and use_int8_activations(i.size)]
        if len(together) < 2 or not isinstance(head, Q8):
            together = []
        out = np.empty((len(ids), self.config.vocab_size), np.float32)
        for j in sorted(set(range(len(ids))) - set(together)):
            out[j] = self.forward(ids[j], caches[j], last_only=True)[0]
        if together:
            lens = [ids[j].size for j in together]
            blas_threads(1)                                   # as hidden_states for int8 prefill
            x = self._blocks_rows(np.concatenate([ids[j] for j in together]), [caches[j] for j in together], lens)
            x = x[np.cumsum(lens) - 1]                                     # [n', D]: each prompt's last row
            kernels.rms_norm(x, self.weights.norm, self.config.rms_norm_eps, x)
            out[together] = head.rows(x)                                   # [n', V]
        return out

    def decode_batch(self, tokens, caches: list) -> np.ndarray:
        """One decode step of B sequences: token b appended after what caches[b] holds (each at its
        own position).                                                   [B] -> logits [B, V] float32

        One sequence: the single-stream decode (the fused step where there is one). Several, with a
        decode plan (every block linear int4, or int8 where decode.stack_q8 takes it) and caches that
        are slots of one pool (batch.BatchDecoder's): one compiled call for all blocks and all B rows
        (kernels/decode_step_batch.py: each weight read once per step, each row the arithmetic of
        its single-stream step). Otherwise every linear multiplies all B rows at once (the prefill
        matmul kernels), attention per sequence over its own cache (pooled: one call for all).
        """
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size != len(caches) or ids.size == 0:
            raise UsageError("decode_batch needs one token per cache, and at least one")
        if len(ids) == 1:
            return self.forward(ids, caches[0], last_only=True)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise UsageError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        if any(c.length >= c.max_len for c in caches):
            raise ContextOverflowError("a sequence's context is full")
        if len({id(c) for c in caches}) != len(caches):
            raise UsageError("decode_batch needs a different cache for each sequence")
        blas_threads(1 if self._int8_blocks and use_int8_activations(len(ids)) else numba.get_num_threads())
        x = self._blocks_batch(ids, caches)
        kernels.rms_norm(x, self.weights.norm, self.config.rms_norm_eps, x)
        return self.weights.lm_head.rows(x)                                # [B, D] -> [B, V]

    def _blocks_batch(self, ids: np.ndarray, caches: list) -> np.ndarray:
        """`_blocks` for B sequences of one new token each, at positions pos[b].        -> x [B, D]"""
        from ..kernels.decode_batch import attention_slots, store_kv
        c, B = self.config, len(ids)
        H, Hkv, Dh, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
        nq = H * Dh
        pos = np.array([cache.length for cache in caches], np.int64)                     # [B]
        angle = pos[:, None].astype(np.float64) * self._inv_freq[None, :]
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)   # [B, Dh/2]
        pool = caches[0].pool
        pooled = pool is not None and all(cache.pool is not None and cache.pool[0] is pool[0] for cache in caches)
        slots = np.array([cache.pool[2] for cache in caches], np.int64) if pooled else None   # [B]
        x = self.weights.embed[ids].astype(np.float32)                     # [B, D]
        # one call: decode_step_batch.py (the plan's int4 stacks and int8 rows, decode.stack_q8)
        if pooled and self._fused_decode:
            if self._batch_step is None:
                from .batch_step import BatchStep
                self._batch_step = BatchStep(c, self._plan)
            self._batch_step.run(x, pos, slots, cos, sin, pool[0], pool[1])
            for cache, t in zip(caches, ids):
                cache.tokens.append(int(t))
            return x
        scores = np.empty((B, H, int(pos.max()) + 1), np.float32)                          # [B, H, S']
        h = np.empty_like(x)                                               # [B, D] normed input
        att = np.empty((B, H, Dh), np.float32)                             # [B, H, Dh]
        act = np.empty((B, F), np.float32)                                 # [B, F]
        for layer, b in enumerate(self.weights.blocks):
            qkv, gate_up = self._fused[layer]
            kernels.rms_norm(x, b.attn_norm, c.rms_norm_eps, h)
            q, k, v = project_qkv(qkv, b, h, H, Hkv, Dh, rows=True)
            v = np.ascontiguousarray(v).reshape(B, Hkv, Dh)
            kernels.rope_inplace(q, cos, sin)
            kernels.rope_inplace(k, cos, sin)
            if pooled:
                store_kv(k, v, pool[0], pool[1], layer, slots, pos)
                attention_slots(q, pool[0], pool[1], layer, slots, pos, scores, att)
            else:
                for i, cache in enumerate(caches):
                    cache.k[layer, :, pos[i]], cache.v[layer, :, pos[i]] = k[i], v[i]
                    kernels.attention(q[i:i + 1], cache.k[layer], cache.v[layer], int(pos[i]), cache.scratch,
                                      att[i:i + 1])
            x += b.o.rows(att.reshape(B, nq))
            kernels.rms_norm(x, b.mlp_norm, c.rms_norm_eps, h)
            if gate_up is not None:
                y = gate_up.rows(h)                                             # [B, 2F]
                kernels.silu_mul(y[:, :F], y[:, F:], act)
            else:
                kernels.silu_mul(b.gate.rows(h), b.up.rows(h), act)
            x += b.down.rows(act)
        for cache, t in zip(caches, ids):
            cache.tokens.append(int(t))
        return x

    def hidden_states(self, ids, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """`forward` without the lm_head: the final-normed hidden state of each token.  [T] -> [T, D]

        For callers that apply the head themselves, a few positions at a time (perplexity).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise UsageError("forward needs at least one token")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise UsageError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        if cache is None:
            cache = KVCache(self.config, len(ids))
        if cache.length + len(ids) > cache.max_len:
            raise ContextOverflowError(
                f"{cache.length} tokens in context + {len(ids)} new exceed the context size {cache.max_len}")
        # Big products (prefill) get every BLAS thread when BLAS does them; otherwise BLAS gets one,
        # so that its pool and Numba's do not take turns on the same cores (policy.blas_threads):
        # small calls, and int8 prefill, where BLAS does only attention (2 threads, 512 tokens,
        # SmolLM2 int4: 717 tokens/s with one BLAS thread, 327 with two).
        blas_big = len(ids) >= BLAS_PARALLEL_MIN_TOKENS and not (
            self._int8_blocks and use_int8_activations(len(ids)))
        blas_threads(numba.get_num_threads() if blas_big else 1)
        x = self._blocks(ids, cache)
        if last_only:
            x = x[-1:]
        kernels.rms_norm(x, self.weights.norm, self.config.rms_norm_eps, x)
        return x

    def _blocks(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        if not self.config.arch.plain:                # Qwen3, Gemma 3: runtime/architecture.py
            return run_blocks(self, ids, cache)
        if len(ids) == 1 and self._fused_decode:
            p0 = cache.length
            angle = np.float64(p0) * self._inv_freq
            x = self.weights.embed[ids].astype(np.float32)                 # [1, D]
            self._plan.run(x[0], cache, p0, np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32))
            cache.tokens.append(int(ids[0]))
            return x
        return self._blocks_rows(ids, [cache], [len(ids)])

    def _blocks_rows(self, ids: np.ndarray, caches: list, lens: list) -> np.ndarray:
        """The per-linear blocks over the new tokens of one or more sequences, concatenated: lens[i]
        tokens appended after caches[i]. Every linear multiplies all T rows in one call; RoPE, the
        KV store and attention go per sequence, at its own positions.                 -> x [T, D]"""
        c, T = self.config, len(ids)
        H, Hkv, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        ends = np.cumsum(lens)
        segs = [(cache, int(e) - n, int(e), cache.length) for cache, n, e in zip(caches, lens, ends)]
        pos = np.concatenate([np.arange(p0, p0 + (b - a)) for _, a, b, p0 in segs])       # [T]
        angle = pos.astype(np.float64)[:, None] * self._inv_freq[None, :]
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)   # [T, Dh/2]
        x = self.weights.embed[ids].astype(np.float32)                     # [T, D]
        h = np.empty_like(x)                                               # [T, D] normed input
        att = np.empty((T, H, Dh), np.float32)                             # [T, H, Dh]
        act = np.empty((T, c.intermediate_size), np.float32)               # [T, F]
        nq, F = H * Dh, c.intermediate_size
        for layer, b in enumerate(self.weights.blocks):
            qkv, gate_up = self._fused[layer]
            kernels.rms_norm(x, b.attn_norm, c.rms_norm_eps, h)
            q, k, v = project_qkv(qkv, b, h, H, Hkv, Dh)
            kernels.rope_inplace(q, cos, sin)
            kernels.rope_inplace(k, cos, sin)
            v = v.reshape(T, Hkv, Dh)
            for cache, a, e, p0 in segs:
                cache.k[layer, :, p0:p0 + e - a] = k[a:e].transpose(1, 0, 2)     # [t, Hkv, Dh] -> [Hkv, t, Dh]
                cache.v[layer, :, p0:p0 + e - a] = v[a:e].transpose(1, 0, 2)
                kernels.attention(q[a:e], cache.k[layer], cache.v[layer], p0, cache.scratch, att[a:e])
            x += b.o(att.reshape(T, nq))
            kernels.rms_norm(x, b.mlp_norm, c.rms_norm_eps, h)
            if gate_up is not None:
                y = gate_up(h)                                             # [T, 2F]
                kernels.silu_mul(y[:, :F], y[:, F:], act)
            else:
                kernels.silu_mul(b.gate(h), b.up(h), act)
            x += b.down(act)
        for cache, a, e, _ in segs:
            cache.tokens.extend(int(i) for i in ids[a:e])
        return x

    # ---- text in, text out (see generation.py)
    def generate(self, prompt: str, **kw) -> str:
        from .generation import stream_prompt
        return "".join(stream_prompt(self, prompt, **kw))

    def stream(self, prompt: str, **kw):
        from .generation import stream_prompt
        return stream_prompt(self, prompt, **kw)

    def chat(self, messages: list[dict], **kw) -> str:
        from .generation import stream_messages
        return "".join(stream_messages(self, messages, **kw))

    def chat_session(self, system: str | None = None, **kw):
        from .generation import ChatSession
        return ChatSession(self, system=system, **kw)

    def eos_ids(self) -> set[int]:
        """Every id that ends generation: config, generation_config and tokenizer, united."""
        ids = set(self.config.eos_token_ids)
        g = self.generation_config.get("eos_token_id")
        ids.update(g if isinstance(g, list) else [g] if isinstance(g, int) else [])
        if self.tokenizer is not None and self.tokenizer.eos_token:
            t = self.tokenizer.token_to_id(self.tokenizer.eos_token)
            if t is not None:
                ids.add(t)
        return ids


def load(path, tokenizer: bool = True, int8_activations: bool = True, verify: bool = False) -> Model:
    """Load a model folder (config.json, *.safetensors, tokenizer.json, ...) into a `Model`.

    int8_activations=False: float32 activations even where an int8 dot is available (prefill and the
    int4 decode; Model.set_int8_activations).
    A folder with a manifest.json is checked against it first (formats/manifest.py: file list and
    sizes always, sha256 of files changed since the store's last check, of every file with
    verify=True) and a store's signature policy is enforced (formats/trust.py); a plain Hugging Face
    folder without a manifest loads as it is, unless a policy requires signatures.
    """
    path = Path(path)
    check_folder(path, full=verify)
    enforce_policy(path)
    cfg = load_config(path)
    weights = load_weights(path, cfg)
    tok = Tokenizer(path) if tokenizer else None
    gen_path = path / "generation_config.json"
    gen = read_json(gen_path, "generation_config.json") if gen_path.is_file() else {}
    return Model(cfg, weights, tok, gen, path, int8_activations)
