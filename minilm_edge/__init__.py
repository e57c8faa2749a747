"""minilm_edge: a torch-free runtime and activation-aware int4 quantizer for small language models.

Library API (small and stable):
    model = minilm_edge.load("path/to/model")     # a Hugging Face style folder
    model.forward(ids) -> float32 logits [T, V]
    model.generate(prompt, max_new_tokens=64, temperature=0.0) -> str
    for piece in model.stream(prompt): ...         # text pieces, never half a UTF-8 character
    model.chat([{"role": "user", "content": "Hi"}]) -> str
    model.tokenizer, model.config
    minilm_edge.perplexity(model, text, ctx=2048) -> {"ppl", "nll", "tokens_scored", ...}
    minilm_edge.quantize(src_dir, out_dir, method="awq", calib=["docs.txt"], bits=4) -> out_dir

Batched decoding (runtime/batch.py): many sequences advance one token per step together.
    streams = minilm_edge.stream_batch(model, ["prompt 1", "prompt 2"], settings=None, chat=False)
    texts = ["".join(s) for s in streams]          # one iterator of text pieces per prompt, in order;
                                                   # reading any of them advances all
    dec = minilm_edge.BatchDecoder(model, max_batch=8)   # the server's loop: sequences join and leave
    seq = dec.add(prompt_ids, SamplingSettings(...), logprobs=0)   # prefill now (check dec.free_slots)
    for ev in dec.step(): ...                      # TokenEvent(seq, token, text, logprob, top_logprobs, finish)
    dec.remove(seq)                                # a client went away
"""
from .errors import (
    CheckpointError,
    ContextOverflowError,
    IntegrityError,
    MiniLMError,
    ModelNotFoundError,
    PullError,
    QuantFormatError,
    TokenizerError,
    TrustError,
    UnsupportedModelError,
    UsageError,
)
from .quant.quantize import quantize
from .runtime.batch import BatchDecoder, TokenEvent, stream_batch
from .runtime.evaluate import perplexity
from .runtime.generation import SamplingSettings
from .runtime.model import Model, load
from .version import __version__

__all__ = [
    "load", "Model", "SamplingSettings", "BatchDecoder", "TokenEvent", "stream_batch",
    "perplexity", "quantize", "MiniLMError", "UsageError", "ModelNotFoundError",
    "UnsupportedModelError", "CheckpointError", "TokenizerError", "ContextOverflowError",
    "PullError", "QuantFormatError", "IntegrityError", "TrustError", "__version__",
]
