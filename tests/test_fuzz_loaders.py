"""Property-based fuzzing of every loader: malformed input raises a MiniLMError subclass or loads, and quickly.

Each target mutates one valid file of a tiny model (written once per module) and loads the result from a
fresh folder. Any other exception is a bug of the library, never of the test; so is an example slower than
the hypothesis deadline or one whose Python allocations (tracemalloc's peak) pass MAX_PEAK_BYTES.
"""
import json
import shutil
import tracemalloc

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import load_file, save_file
from tokenizers.pre_tokenizers import ByteLevel

import minilm_edge
from minilm_edge.app.describe import describe, format_text
from minilm_edge.errors import MiniLMError
from minilm_edge.formats.gguf import import_gguf
from minilm_edge.formats.safetensors import SafetensorsFile
from minilm_edge.quant.export_awq import export_awq
from tinymodel import make_model_dir

MAX_PEAK_BYTES = 500 * 1024 * 1024
FUZZ = settings(deadline=5000, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
MESSAGES = [{"role": "user", "content": "hi"}]


def guarded(fn, *args, **kwargs):
    """fn(*args) -> its result, or None when it raised a MiniLMError; anything else propagates.
    Fails if the call's Python allocations peak above MAX_PEAK_BYTES."""
    tracemalloc.start()
    try:
        return fn(*args, **kwargs)
    except MiniLMError:
        return None
    except BaseException as e:
        if type(e).__name__ == "PanicException":      # pyo3's, a BaseException: hypothesis would not shrink it
            raise AssertionError(f"a Rust panic escaped: {e}") from e
        raise
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MAX_PEAK_BYTES, f"{fn.__name__} allocated {peak / 2**20:.0f} MB"


def load_and_use(folder):
    """What `minilm-edge run` and `inspect` do with a folder: load, one forward step, describe."""
    model = minilm_edge.load(folder)
    logits = model.forward(np.array([1, 5, 7]))
    assert logits.shape == (3, model.config.vocab_size)
    model.tokenizer.render_chat(MESSAGES)
    return model


def describe_text(folder):
    return format_text(describe(folder, layers=True))


def copy_folder(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink(missing_ok=True)   # the fuzzing is for the format checks behind it
    return dst


# ---------------------------------------------------------------- base files, written once

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder, _, _ = make_model_dir(tmp_path_factory.mktemp("base") / "tiny")
    load_and_use(folder)                 # compile the kernels before any deadline counts
    return folder


@pytest.fixture(scope="module")
def q_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    src, _, _ = make_model_dir(root / "src", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=2)
    out = minilm_edge.quantize(src, root / "q4", method="rtn", progress=False)
    load_and_use(out)
    describe_text(out)
    return out


@pytest.fixture(scope="module")
def awq_dir(q_dir, tmp_path_factory):
    out, _ = export_awq(q_dir, tmp_path_factory.mktemp("awq") / "awq")
    load_and_use(out)
    describe_text(out)
    return out


# A minimal llama.cpp-style GGUF of a 1-layer model (F32 tensors, q/k rows permuted as llama.cpp does).
G_D, G_F, G_H, G_HKV = 16, 24, 2, 1
G_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet()) + ["Ġt"]
G_MERGES = ["Ġ t"]


def write_gguf(path, merges=G_MERGES):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    dh, v = G_D // G_H, len(G_TOKENS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint64("llama.block_count", 1)
    w.add_uint64("llama.embedding_length", G_D)
    w.add_uint64("llama.feed_forward_length", G_F)
    w.add_uint64("llama.attention.head_count", G_H)
    w.add_uint64("llama.attention.head_count_kv", G_HKV)
    w.add_context_length(64)
    w.add_rope_dimension_count(dh)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(G_TOKENS)
    w.add_token_types([int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)] * (v - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")
    tensors = {"token_embd.weight": r(v, G_D), "output_norm.weight": r(G_D), "blk.0.attn_norm.weight": r(G_D),
               "blk.0.ffn_norm.weight": r(G_D), "blk.0.attn_q.weight": r(G_H * dh, G_D),
               "blk.0.attn_k.weight": r(G_HKV * dh, G_D), "blk.0.attn_v.weight": r(G_HKV * dh, G_D),
               "blk.0.attn_output.weight": r(G_D, G_H * dh), "blk.0.ffn_gate.weight": r(G_F, G_D),
               "blk.0.ffn_up.weight": r(G_F, G_D), "blk.0.ffn_down.weight": r(G_D, G_F)}
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path)
    out = import_gguf(path, path.parent / "model", progress=False)     # the base file is valid
    load_and_use(out)
    data_offset = gguf.GGUFReader(str(path)).data_offset
    return path, data_offset


# ---------------------------------------------------------------- strategies

def json_values(max_leaves=12):
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 300)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    return st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=max_leaves)


def dumps(obj):
    return json.dumps(obj, allow_nan=True)  # NaN/Infinity as Python's json writes them, which readers accept


@st.composite
def byte_mutations(draw, size, hot_end=None):
    """A list of (position, new byte) flips, most of them in [0, hot_end), and an optional truncation."""
    hot_end = hot_end or size
    pos = st.integers(0, hot_end - 1) | st.integers(0, size - 1)
    flips = draw(st.lists(st.tuples(pos, st.integers(0, 255)), max_size=8))
    cut = draw(st.none() | st.integers(0, size))
    return flips, cut


def mutate(data, flips, cut):
    b = bytearray(data)
    for p, v in flips:
        b[p] = v
    return bytes(b[:cut] if cut is not None else b)


# ---------------------------------------------------------------- 1. safetensors reader

def read_all(path):
    f = SafetensorsFile(path)
    for name in f.keys():
        arr = f.tensor(name)
        arr.sum(dtype=np.float64)        # touch every byte
        assert arr.dtype.itemsize * arr.size == f.entries[name][3] - f.entries[name][2]
    return f


safetensors_header_entries = st.dictionaries(
    st.text(max_size=6),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "I64", "F8", 3]),
                           "shape": st.lists(st.integers(-2, 2**40) | st.integers(0, 8), max_size=4),
                           "data_offsets": st.lists(st.integers(-2, 2**40) | st.integers(0, 256), max_size=3)})
    | json_values(6), max_size=4)


@FUZZ
@given(data=st.data())
def test_safetensors_reader(base, tmp_path_factory, data):
    raw = (base / "model.safetensors").read_bytes()
    header_len = 8 + int.from_bytes(raw[:8], "little")
    kind = data.draw(st.sampled_from(["bytes", "header", "json"]))
    if kind == "bytes":
        flips, cut = data.draw(byte_mutations(len(raw), header_len))
        blob = mutate(raw, flips, cut)
    else:
        header = data.draw(safetensors_header_entries if kind == "header" else json_values())
        h = dumps(header).encode()
        n = data.draw(st.just(len(h)) | st.integers(0, 2**64 - 1) | st.integers(0, len(h) + 16))
        blob = n.to_bytes(8, "little") + h + data.draw(st.binary(max_size=64))
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(blob)
    guarded(read_all, path)


# ---------------------------------------------------------------- 2. config.json

CONFIG_KEYS = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "vocab_size", "torch_dtype", "head_dim",
               "rope_scaling", "quantization_config", "attention_bias", "hidden_act", "sliding_window"]


@FUZZ
@given(data=st.data())
def test_config_json(base, tmp_path_factory, data):
    cfg = json.loads((base / "config.json").read_text())
    for key in data.draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4, unique=True)):
        if data.draw(st.booleans()):
            cfg[key] = data.draw(json_values(6))
        else:
            cfg.pop(key, None)
    if data.draw(st.integers(0, 9)) == 0:
        cfg = data.draw(json_values())
    folder = copy_folder(base, tmp_path_factory)
    (folder / "config.json").write_text(dumps(cfg))
    guarded(load_and_use, folder)
    guarded(describe_text, folder)


# ---------------------------------------------------------------- 3. model.safetensors.index.json

@FUZZ
@given(data=st.data())
def test_safetensors_index(base, tmp_path_factory, data):
    names = list(load_file(str(base / "model.safetensors")))
    files = st.sampled_from(["model.safetensors", "other.safetensors", "../model.safetensors", "/etc/passwd", "",
                             ".", "config.json", "sub/model.safetensors"])
    weight_map = data.draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=8), files | json_values(4),
                                           max_size=len(names) + 2))
    if data.draw(st.booleans()):
        weight_map = {n: "model.safetensors" for n in names} | weight_map
    index = {"metadata": data.draw(json_values(4)), "weight_map": weight_map}
    if data.draw(st.integers(0, 5)) == 0:
        index = data.draw(json_values())
    folder = copy_folder(base, tmp_path_factory)
    (folder / "model.safetensors.index.json").write_text(dumps(index))
    guarded(load_and_use, folder)
    guarded(describe_text, folder)


# ---------------------------------------------------------------- 4. GGUF import

@FUZZ
@given(data=st.data())
def test_gguf_import(gguf_file, tmp_path_factory, data):
    path, data_offset = gguf_file
    raw = path.read_bytes()
    flips, cut = data.draw(byte_mutations(len(raw), data_offset))
    root = tmp_path_factory.mktemp("gguf")
    (root / "x.gguf").write_bytes(mutate(raw, flips, cut))
    out = guarded(import_gguf, root / "x.gguf", root / "model", progress=False)
    if out is not None:
        guarded(load_and_use, out)


@FUZZ
@given(merges=st.lists(st.tuples(st.sampled_from(G_TOKENS[:8] + G_TOKENS[-3:]), st.sampled_from(G_TOKENS[-4:])),
                       max_size=4))
def test_gguf_import_merges(gguf_file, tmp_path_factory, merges):
    # Merges whose two halves are vocabulary tokens but whose concatenation may not be one.
    root = tmp_path_factory.mktemp("gguf")
    write_gguf(root / "x.gguf", [f"{a} {b}" for a, b in merges])
    out = guarded(import_gguf, root / "x.gguf", root / "model", progress=False)
    if out is not None:
        guarded(load_and_use, out)


# ---------------------------------------------------------------- 5, 6. quantized folders: one tensor replaced

DTYPES = [np.uint8, np.int8, np.float16, np.float32, np.int32]


@st.composite
def replacement(draw, tensors):
    name = draw(st.sampled_from(sorted(tensors)))
    shape = tensors[name].shape
    small = st.lists(st.integers(0, 70), max_size=3).map(tuple)
    near = st.tuples(*[st.sampled_from([d, d + 1, max(d - 1, 0), 2 * d, d // 2, 1]) for d in shape])
    shape = draw(st.just(shape) | near | small)
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = draw(st.sampled_from([(info.min, info.max), (0, 16), (-1, 1), (0, 1)]))
        arr = np.asarray(rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64)).astype(dtype)
    else:
        with np.errstate(over="ignore"):
            arr = np.asarray(rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e5, 0.0]))).astype(dtype)
        if arr.size and draw(st.booleans()):
            arr.flat[rng.integers(0, arr.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return name, arr


def fuzz_tensor_replacement(src, tmp_path_factory, data):
    tensors = load_file(str(src / "model.safetensors"))
    name, arr = data.draw(replacement(tensors))
    folder = copy_folder(src, tmp_path_factory)
    save_file(tensors | {name: arr}, str(folder / "model.safetensors"))
    guarded(load_and_use, folder)
    guarded(describe_text, folder)


@FUZZ
@given(data=st.data())
def test_minilm_q4_tensor_replaced(q_dir, tmp_path_factory, data):
    fuzz_tensor_replacement(q_dir, tmp_path_factory, data)


@FUZZ
@given(data=st.data())
def test_autoawq_tensor_replaced(awq_dir, tmp_path_factory, data):
    fuzz_tensor_replacement(awq_dir, tmp_path_factory, data)


# ---------------------------------------------------------------- 7. tokenizer files

@FUZZ
@given(data=st.data())
def test_tokenizer_files(base, tmp_path_factory, data):
    which = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json"]))
    folder = copy_folder(base, tmp_path_factory)
    raw = (folder / which).read_bytes()
    kind = data.draw(st.sampled_from(["json", "bytes", "flips", "keys"]))
    if kind == "json":
        blob = dumps(data.draw(json_values())).encode()
    elif kind == "bytes":
        blob = data.draw(st.binary(max_size=200))
    elif kind == "flips":
        blob = mutate(raw, *data.draw(byte_mutations(len(raw))))
    else:                                     # the valid object with some keys' values replaced
        obj = json.loads(raw)
        for key in data.draw(st.lists(st.sampled_from(sorted(obj)), max_size=3, unique=True)):
            obj[key] = data.draw(json_values(6))
        blob = dumps(obj).encode()
    (folder / which).write_bytes(blob)
    model = guarded(minilm_edge.load, folder)
    if model is not None:
        guarded(model.tokenizer.render_chat, MESSAGES)
        guarded(model.tokenizer.encode, "hello <|im_start|> world")


# ---------------------------------------------------------------- 8. chat templates

ATOMS = st.sampled_from(["messages", "message", "m", "add_generation_prompt", "bos_token", "eos_token", "loop",
                         "messages[0]", "m['content']", "message.role", "m.content", "''.__class__", "x",
                         "cycler", "namespace", "self", "range(3)", "range(10**6)", "range(99999999)"])
LITERALS = st.sampled_from(["'a'", "'<|im_start|>'", "1", "0", "-1", "2", "10", "999999", "[1, 2]", "{'a': 1}",
                            "none", "true", "9e300", "1.5"])
FILTERS = st.sampled_from(["upper", "length", "join(',')", "list", "tojson", "trim", "first", "last", "int",
                           "string", "reverse", "sort", "unique", "attr('role')", "map(attribute='role')",
                           "replace('a', 'aaaa')", "center(99999)", "indent(9999)", "format(1)", "items", "sum"])


@st.composite
def expressions(draw, depth=2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(ATOMS | LITERALS)
    kind = draw(st.sampled_from(["binop", "filter", "attr", "item", "call", "paren"]))
    a = draw(expressions(depth - 1))
    if kind == "binop":
        op = draw(st.sampled_from(["*", "**", "+", "~", "-", "//", "%", "in", "==", "and"]))
        return f"{a} {op} {draw(expressions(depth - 1))}"
    if kind == "filter":
        return f"{a} | {draw(FILTERS)}"
    if kind == "attr":
        return f"{a}.{draw(st.sampled_from(['role', '__class__', 'mro', 'items', 'append', '__globals__']))}"
    if kind == "item":
        return f"{a}[{draw(expressions(depth - 1))}]"
    if kind == "call":
        return f"{a}({draw(expressions(depth - 1))})"
    return f"({a})"


@st.composite
def templates(draw, depth=2):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["text", "out", "for", "if", "set", "raw", "broken"]))
        inner = draw(templates(depth - 1)) if depth > 0 and kind in ("for", "if") else "x"
        e = draw(expressions())
        if kind == "text":
            parts.append(draw(st.text(max_size=8)))
        elif kind == "out":
            parts.append(f"{{{{ {e} }}}}")
        elif kind == "for":
            parts.append(f"{{% for x in {e} %}}{inner}{{% endfor %}}")
        elif kind == "if":
            parts.append(f"{{% if {e} %}}{inner}{{% else %}}{{{{ x }}}}{{% endif %}}")
        elif kind == "set":
            parts.append(f"{{% set x = {e} %}}")
        elif kind == "raw":
            parts.append("{% raw %}{{ x }}{% endraw %}")
        else:
            parts.append(draw(st.sampled_from(["{{", "{%", "{% for %}", "{% endif %}", "}}", "{# x", "{{ x |}}"])))
    return "".join(parts)


@FUZZ
@given(template=templates())
def test_chat_templates(base, tmp_path_factory, template):
    folder = copy_folder(base, tmp_path_factory)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg | {"chat_template": template}))
    model = minilm_edge.load(folder)        # the template is compiled only when rendered
    out = guarded(model.tokenizer.render_chat, MESSAGES)
    assert out is None or isinstance(out, str)

