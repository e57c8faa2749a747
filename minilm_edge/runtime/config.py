"""The model blueprint: a frozen config read from a Hugging Face `config.json`.

Shape vocabulary used in comments across minilm_edge (declared once, here):
    T   tokens in the current call          D   hidden size (model width)
    H   attention heads                     Hkv key/value heads (GQA: H % Hkv == 0)
    Dh  head dim (usually D // H)           F   MLP intermediate size
    V   vocabulary size                     L   number of blocks
    S   positions held in the KV cache (≤ max_position_embeddings)

Supported: the Llama family that shares one block shape (pre-norm RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP): `llama` (incl. SmolLM/SmolLM2, Llama 2/3.x), `mistral` without a sliding
window, `qwen2` (q/k/v carry a bias), `qwen3` (q/k RMSNorm), and `gemma3_text` (Gemma 3: the block
variant of runtime/architecture.py, sliding-window layers). Anything else is refused with a clear
error rather than run wrongly.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..errors import ModelNotFoundError, UnsupportedModelError
from .architecture import ARCHITECTURES, LLAMA, Architecture


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency scaling ("llama3" rope_type); `None` in LlamaConfig means plain RoPE."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int                  # V
    hidden_size: int                 # D
    intermediate_size: int           # F
    num_hidden_layers: int           # L
    num_attention_heads: int         # H
    num_key_value_heads: int         # Hkv
    head_dim: int                    # Dh, given or D // H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False     # q/k/v carry a bias (qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: dict | None = None  # the raw quantization_config block, if any
    arch: Architecture = LLAMA       # the block variant model_type selects (architecture.ARCHITECTURES)
    # Sliding-window attention (Gemma 3): the layers marked True see only the last `sliding_window`
    # positions (the query's own included) and rotate with base `rope_local_theta`; the others see
    # everything and rotate with `rope_theta`.
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = ()
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float | None = None   # scores scale by this^-1/2 (None: Dh, the usual)

    @property
    def heads_per_kv(self) -> int:
        """Query heads that share one key/value head (H // Hkv; "group size" means the quantization
        group everywhere else in minilm_edge)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        mt = d.get("model_type")
        if not isinstance(mt, str) or mt not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {mt!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
        if mt == "mistral" and d.get("sliding_window") not in (None, 0):
            max_pos = d.get("max_position_embeddings", 0)
            if not isinstance(d["sliding_window"], int) or not isinstance(max_pos, int):
                raise UnsupportedModelError(
                    f"config.json: sliding_window must be an integer, got {d['sliding_window']!r}")
            if d["sliding_window"] < max_pos:
                raise UnsupportedModelError(
                    f"mistral with sliding_window={d['sliding_window']} < context {max_pos} "
                    "is not supported (only full attention is implemented)")
        try:
            D, H = int(d["hidden_size"]), int(d["num_attention_heads"])
            Hkv = H if d.get("num_key_value_heads") is None else int(d["num_key_value_heads"])
            cfg = cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=D,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=H,
                num_key_value_heads=Hkv,
                head_dim=int(d.get("head_dim") or (D // H if H > 0 else 0)),   # H ≤ 0: _check says so
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(d),
                rope_scaling=_rope_scaling(d),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=ARCHITECTURES[mt].attention_bias or bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(d.get("eos_token_id"), "eos_token_id"),
                quantization=d.get("quantization_config"),
                arch=ARCHITECTURES[mt],
            )
            if cfg.arch.sliding_window:
                cfg = dataclasses.replace(cfg, **_sliding_fields(d, cfg.num_hidden_layers, cfg.head_dim))
        except KeyError as e:
            raise UnsupportedModelError(f"config.json lacks the required field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:      # OverflowError: int(Infinity), JSON allows it
            raise UnsupportedModelError(f"config.json has a field of the wrong type: {e}") from None
        if cfg.quantization is not None and not isinstance(cfg.quantization, dict):
            raise UnsupportedModelError(
                f"config.json: quantization_config must be an object, got {cfg.quantization!r}")
        cfg._check()
        return cfg

    def _check(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"config.json: head_dim={self.head_dim} must be even for RoPE")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise UnsupportedModelError(f"config.json: rope_theta={self.rope_theta} must be positive")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            # eps ≤ 0 divides a zero row by zero; NaN makes every logit NaN: a silent wrong answer.
            raise UnsupportedModelError(f"config.json: rms_norm_eps={self.rms_norm_eps} must be a positive number")
        if self.arch.sliding_window:
            if self.sliding_window <= 0 or len(self.sliding_layers) != self.num_hidden_layers:
                raise UnsupportedModelError(
                    f"config.json: sliding_window must be positive and layer_types name every one of the "
                    f"{self.num_hidden_layers} layers, got {self.sliding_window} and {len(self.sliding_layers)}")
            if not (self.rope_local_theta > 0 and math.isfinite(self.rope_local_theta)):
                raise UnsupportedModelError(f"config.json: local RoPE base {self.rope_local_theta} must be positive")
        scalar = self.query_pre_attn_scalar
        if scalar is not None and not (scalar > 0 and math.isfinite(scalar)):
            raise UnsupportedModelError(f"config.json: query_pre_attn_scalar={scalar} must be positive")


# Gemma 3's layer kinds in config.json `layer_types`.
LAYER_TYPES = {"sliding_attention": True, "full_attention": False}


def _sliding_fields(d: dict, n_layers: int, head_dim: int) -> dict:
    """Gemma 3's attention layout: window size, which layers slide, the two RoPE bases, the score scale.

    Older configs give `sliding_window_pattern` P (every P-th layer global) and `rope_local_base_freq`;
    newer ones `layer_types` and `rope_parameters` per layer kind. Soft-capping and RoPE scaling are
    refused: not implemented, and a silent wrong answer otherwise.
    """
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(key) is not None:
            raise UnsupportedModelError(f"config.json: {key} is not supported")
    if d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh")) not in ("gelu_pytorch_tanh",):
        raise UnsupportedModelError("config.json: Gemma 3 is run with the tanh GELU only "
                                    f"(hidden_activation {d.get('hidden_activation')!r})")
    types = d.get("layer_types")
    if types is None:
        pattern = int(d.get("sliding_window_pattern", 6))
        if pattern <= 0:
            raise UnsupportedModelError(f"config.json: sliding_window_pattern must be positive, got {pattern}")
        sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
    else:
        if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
            raise UnsupportedModelError(f"config.json: layer_types must list {' or '.join(LAYER_TYPES)} per layer")
        sliding = tuple(LAYER_TYPES[t] for t in types)
    params = d.get("rope_parameters") or {}
    if d.get("rope_scaling") is not None or any(
            isinstance(p, dict) and p.get("rope_type", "default") != "default" for p in params.values()):
        raise UnsupportedModelError("config.json: RoPE scaling is not supported for Gemma 3 (the 270M/1B have none)")
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    return {
        "sliding_window": int(d.get("sliding_window") or 0),
        "sliding_layers": sliding,
        "rope_theta": float(full.get("rope_theta", d.get("rope_theta", 1_000_000.0))),
        "rope_local_theta": float(local.get("rope_theta", d.get("rope_local_base_freq", 10000.0))),
        "query_pre_attn_scalar": float(d.get("query_pre_attn_scalar", head_dim)),
    }


def _rope_theta(d: dict) -> float:
    # Newer transformers nest it in `rope_parameters`; older configs have it at the top level.
    params = d.get("rope_parameters") or {}
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def _rope_scaling(d: dict) -> RopeScaling | None:
    rs = d.get("rope_scaling") or d.get("rope_parameters") or None
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise UnsupportedModelError(f"config.json: rope_scaling must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind == "llama3":
        scaling = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
        # runtime/model.rope_inv_freq divides by factor, by each freq factor and by their difference
        numbers = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor)
        if not (all(math.isfinite(v) and v > 0 for v in numbers)
                and scaling.high_freq_factor > scaling.low_freq_factor
                and scaling.original_max_position_embeddings > 0):
            raise UnsupportedModelError(
                "config.json: rope_scaling (llama3) needs factor, low_freq_factor and "
                "original_max_position_embeddings > 0 and high_freq_factor > low_freq_factor, got "
                f"{scaling.factor}, {scaling.low_freq_factor}, {scaling.original_max_position_embeddings}, "
                f"{scaling.high_freq_factor}")
        return scaling
    raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported (only default and llama3)")


def _as_id_tuple(v, name: str) -> tuple[int, ...]:
    """A token id or a list of them (None: none); anything else is refused, naming the field."""
    ids = () if v is None else tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UnsupportedModelError(f"config.json: {name} must be a token id or a list of them, got {v!r}")
    return ids


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object from a model folder, with one clear error if it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise UnsupportedModelError(f"{path} must hold a JSON object")
    return obj


def load_config(model_dir: Path) -> LlamaConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model folder not found: {model_dir}")
    return LlamaConfig.from_dict(read_json(model_dir / "config.json", "config.json"))
