"""``ahn-merge``: base Qwen2.5 checkpoint + AHN-only weights -> one merged AHN checkpoint.

    ahn-merge --base Qwen2.5-3B-Instruct --ahn AHN-GDN-for-Qwen-2.5-Instruct-3B --out Qwen2.5-3B-AHN-GDN
    python -m ahn_ops.merge --base ... --ahn ... --out ... [--force] [--window W] [--sinks S]

The output directory holds the base safetensors shards (copied byte for byte), one
``model-ahn.safetensors`` with the ``model.layers.{i}.ahn.fn.*`` tensors, a
``model.safetensors.index.json`` over all of them, ``config.json`` = base config + the AHN
fields (``_layer_implementation``, ``_ahn_implementation``, ``sliding_window``,
``num_attn_sinks``, ``fa_layer_ids``, ``use_q_proj``, ``use_ahn_router``), and the
tokenizer / generation files of the base. ``ahn_ops.from_pretrained(OUT)`` loads it.

Everything is checked before anything is written: both configs, hidden sizes and head
shapes, every safetensors file's header, the AHN key set (missing / unexpected keys are named),
every tensor shape and dtype. AHN tensors of ``fa_layer_ids`` layers (the official checkpoints
carry them) are left out with a warning. The files are written into a temporary directory next
to ``--out`` and moved in at the end, so a failed merge leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .files import read_json_object

AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
             "added_tokens.json", "generation_config.json", "chat_template.jinja", "tokenizer.model")
AHN_SHARD = "model-ahn.safetensors"


class MergeError(ValueError):
    """Bad merge inputs (message says what and where)."""


class MissingDependencyError(ImportError):
    """transformers or tqdm is not installed (message says what to install)."""


# transformers (ahn_ops.models imports it) and tqdm come with the [hf] extra, not with ahn_ops
# itself: imported when a merge starts, so that `import ahn_ops.merge` and `ahn-merge --help`
# work without them and a merge says what to install instead of a ModuleNotFoundError
HF_EXTRA = ("transformers", "tqdm")


def _require_hf() -> None:
    try:
        import tqdm  # noqa: F401

        from . import models  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in HF_EXTRA:
            raise
        raise MissingDependencyError(f"ahn-merge needs {' and '.join(HF_EXTRA)} (the [hf] extra): {e}. Install "
                                     "them with: pip install \"ahn_ops[hf]\"") from e


# a Qwen2 config.json without these cannot be checked against the AHN weights
REQUIRED_BASE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


def _load_json(path: Path, what: str) -> Dict:
    if not path.exists():
        raise MergeError(f"{what}: {path} not found")
    try:
        return read_json_object(path)
    except ValueError as e:
        raise MergeError(f"{what}: {e}") from None


def _safetensors_keys(path: Path, what: str) -> List[str]:
    """The tensor names of a safetensors file; its header is parsed and its size checked against it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as sf:
            return list(sf.keys())
    except Exception as e:  # SafetensorError and OSError: name the file, not a traceback
        raise MergeError(f"{what}: {path} is not a readable safetensors file, corrupt or truncated? ({e})") from e


def _base_files(base: Path) -> Tuple[List[Path], Dict[str, str]]:
    """Safetensors files of the base and its weight map (key -> file name), every file's header checked."""
    index = base / "model.safetensors.index.json"
    if index.exists():
        weight_map = _load_json(index, "--base index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"--base index: {index} has no weight_map")
        files = [base / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(base.glob("*.safetensors"))
        if not files:
            raise MergeError(f"--base {base}: no *.safetensors files (convert .bin checkpoints with "
                             "transformers' save_pretrained first)")
        weight_map = {}
    missing = [f for f in files if not f.exists()]
    if missing:
        raise MergeError(f"--base {base}: files listed in the index are missing: {[m.name for m in missing]}")
    for f in files:
        keys = _safetensors_keys(f, "--base")
        if index.exists():
            absent = sorted(k for k, fn in weight_map.items() if fn == f.name and k not in set(keys))
            if absent:
                raise MergeError(f"--base index: {index} places {absent[0]} in {f.name}, which does not hold it "
                                 f"({len(absent)} such key(s))")
        else:
            weight_map.update({k: f.name for k in keys})
    return files, weight_map


def _shape_of(directory: Path, file_name: str, key: str) -> Tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(directory / file_name), framework="pt") as sf:
        return tuple(sf.get_slice(key).get_shape())


def plan_merge(base: Path, ahn: Path, kind: Optional[str] = None, window: Optional[int] = None,
               sinks: Optional[int] = None, fa_layer_ids: Optional[str] = None):
    """Validate the inputs; return ``(base_files, base_map, ahn_tensors, merged_config)``. Writes nothing."""
    _require_hf()
    from .models.modules import KIND_TO_IMPL, ahn_param_shapes, normalize_kind
    from .models.qwen2 import AHN_KEY_RE, drop_fa_layer_tensors, parse_fa_layer_ids, read_ahn_tensors

    base_cfg = _load_json(base / "config.json", "--base config")
    absent = [f for f in REQUIRED_BASE_FIELDS if f not in base_cfg]
    if absent:
        raise MergeError(f"--base config: {base / 'config.json'} has no {', '.join(absent)} (expected a Qwen2 "
                         "config.json)")
    bad = {f: base_cfg[f] for f in REQUIRED_BASE_FIELDS if not (isinstance(base_cfg[f], int) and base_cfg[f] > 0)}
    if bad:
        raise MergeError(f"--base config: {base / 'config.json'}: expected positive integers, got {bad}")
    if base_cfg.get("_ahn_implementation"):
        raise MergeError(f"--base {base} is already an AHN checkpoint (_ahn_implementation="
                         f"{base_cfg['_ahn_implementation']!r})")
    if base_cfg.get("model_type") not in (None, "qwen2"):
        raise MergeError(f"--base {base}: model_type {base_cfg.get('model_type')!r}, expected 'qwen2'")
    ahn_dir = ahn if ahn.is_dir() else ahn.parent
    if (ahn_dir / "config.json").exists():
        ahn_cfg = _load_json(ahn_dir / "config.json", "--ahn config")
    elif kind is None or window is None:
        raise MergeError(f"--ahn config: {ahn_dir / 'config.json'} not found; it gives the AHN kind and window "
                         "(or pass --kind and --window)")
    else:
        ahn_cfg = {}

    impl = kind or ahn_cfg.get("_ahn_implementation")
    if not impl:
        raise MergeError(f"--ahn {ahn}: config.json has no _ahn_implementation; pass --kind")
    kind = normalize_kind(impl)
    window = window if window is not None else ahn_cfg.get("sliding_window")
    if window is None:
        raise MergeError(f"--ahn {ahn}: config.json has no sliding_window; pass --window")
    sinks = sinks if sinks is not None else int(ahn_cfg.get("num_attn_sinks") or 0)
    if int(window) < 1 or int(sinks) < 0:
        raise MergeError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    fa_ids = parse_fa_layer_ids(fa_layer_ids if fa_layer_ids is not None else ahn_cfg.get("fa_layer_ids"))
    for flag in ("use_q_proj", "use_ahn_router"):
        if ahn_cfg.get(flag):
            raise MergeError(f"--ahn {ahn}: {flag}=true is not supported")

    hidden, L = base_cfg["hidden_size"], base_cfg["num_hidden_layers"]
    H = base_cfg["num_attention_heads"]
    D = base_cfg.get("head_dim") or hidden // H
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        if field in ahn_cfg and field in base_cfg and ahn_cfg[field] != base_cfg[field]:
            raise MergeError(f"mismatch: base {field}={base_cfg[field]} but the AHN weights were trained for "
                             f"{field}={ahn_cfg[field]} (an AHN for another model size?)")
    bad = [i for i in fa_ids if not 0 <= i < L]
    if bad:
        raise MergeError(f"fa_layer_ids {bad} out of range for a base with {L} layers")

    base_files, base_map = _base_files(base)
    already = [k for k in base_map if ".ahn.fn." in k]
    if already:
        raise MergeError(f"--base {base} already holds AHN tensors (e.g. {already[0]})")

    try:
        tensors = read_ahn_tensors(ahn)
    except (ValueError, FileNotFoundError) as e:
        raise MergeError(f"--ahn {ahn}: {e}") from e
    shapes = ahn_param_shapes(kind, hidden, H, D)
    expected = {f"model.layers.{i}.ahn.fn.{n}": s for i in range(L) if i not in fa_ids for n, s in shapes.items()}
    canon = {}
    for k, v in tensors.items():
        m = AHN_KEY_RE.match(k)
        canon[f"model.layers.{m.group(1)}.ahn.fn.{m.group(2)}" if m else k] = v
    canon = drop_fa_layer_tensors(canon, fa_ids, f"--ahn {ahn}")
    missing = sorted(set(expected) - set(canon))
    unexpected = sorted(set(canon) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:6])}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
        raise MergeError(f"--ahn {ahn} does not match kind={kind!r} on a {L}-layer base with fa_layer_ids={fa_ids}: "
                         + "; ".join(parts))
    for k, s in expected.items():
        if not hasattr(canon[k], "is_floating_point"):
            raise MergeError(f"--ahn {ahn}: {k} is a {type(canon[k]).__name__}, expected a tensor")
        if tuple(canon[k].shape) != s:
            raise MergeError(f"{k}: shape {list(canon[k].shape)} in --ahn, expected {list(s)} for the base "
                             f"(hidden_size={hidden}, heads={H}, head_dim={D})")
    not_float = [k for k in expected if not canon[k].is_floating_point()]
    if not_float:
        raise MergeError(f"--ahn {ahn}: {not_float[0]} has dtype {canon[not_float[0]].dtype}, expected a "
                         f"floating-point dtype ({len(not_float)} such tensor(s))")
    # the projections read the base's hidden state: its width must match
    emb = base_map.get("model.embed_tokens.weight")
    if emb is not None:
        emb_shape = _shape_of(base, emb, "model.embed_tokens.weight")
        if emb_shape[1] != hidden:
            raise MergeError(f"--base {base}: embed_tokens has width {emb_shape[1]} but config hidden_size={hidden}")

    merged_cfg = dict(base_cfg)
    merged_cfg.update({
        "_layer_implementation": "Qwen2MemDecoderLayer",
        "_ahn_implementation": KIND_TO_IMPL[kind],
        "sliding_window": int(window),
        "num_attn_sinks": int(sinks),
        "fa_layer_ids": ",".join(str(i) for i in fa_ids),
        "use_q_proj": False,
        "use_ahn_router": False,
    })
    return base_files, base_map, canon, merged_cfg


def _write_merged(stage: Path, base: Path, ahn: Path, base_files: List[Path], base_map: Dict[str, str],
                  ahn_tensors: Dict, merged_cfg: Dict, progress: bool) -> List[str]:
    """Write the merged checkpoint into ``stage``; returns the file names written."""
    _require_hf()
    from tqdm import tqdm

    from .models.qwen2 import write_safetensors

    total = sum(f.stat().st_size for f in base_files) + sum(t.numel() * t.element_size() for t in ahn_tensors.values())
    # a single-file base is renamed: a "model.safetensors" next to an index would shadow the index
    renames = {f.name: ("model-base.safetensors" if f.name == "model.safetensors" else f.name) for f in base_files}
    with tqdm(total=total, unit="B", unit_scale=True, desc="ahn-merge", disable=not progress) as bar:
        for f in base_files:
            with open(f, "rb") as src, open(stage / renames[f.name], "wb") as d:
                while True:
                    chunk = src.read(64 << 20)
                    if not chunk:
                        break
                    d.write(chunk)
                    bar.update(len(chunk))
        write_safetensors(ahn_tensors, stage / AHN_SHARD)
        bar.update(sum(t.numel() * t.element_size() for t in ahn_tensors.values()))
    weight_map = {k: renames[fname] for k, fname in base_map.items()}
    weight_map.update({k: AHN_SHARD for k in ahn_tensors})
    size = sum((stage / fn).stat().st_size for fn in set(weight_map.values()))
    with open(stage / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(stage / "config.json", "w") as f:
        json.dump(merged_cfg, f, indent=2, sort_keys=True)
    ahn_dir = ahn if ahn.is_dir() else ahn.parent
    for name in AUX_FILES:
        for src_dir in (base, ahn_dir):
            if (src_dir / name).exists():
                shutil.copyfile(src_dir / name, stage / name)
                break
    return sorted(p.name for p in stage.iterdir())


def merge(base, ahn, out, force: bool = False, kind: Optional[str] = None, window: Optional[int] = None,
          sinks: Optional[int] = None, fa_layer_ids: Optional[str] = None, progress: bool = True) -> Path:
    """Merge ``base`` + ``ahn`` into ``out`` (see module docstring). Returns ``out``."""
    base, ahn, out = Path(base), Path(ahn), Path(out)
    if not base.is_dir():
        raise MergeError(f"--base {base} is not a directory")
    if not ahn.exists():
        raise MergeError(f"--ahn {ahn} not found")
    if out.resolve() in (base.resolve(), (ahn if ahn.is_dir() else ahn.parent).resolve()):
        raise MergeError(f"--out {out} must differ from --base and --ahn")
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise MergeError(f"--out {out} exists and is not empty; pass --force to overwrite")

    base_files, base_map, ahn_tensors, merged_cfg = plan_merge(base, ahn, kind, window, sinks, fa_layer_ids)

    # written into a temporary directory beside --out and moved in at the end: a merge that fails
    # half-way (disk full, a read error) leaves no partial checkpoint behind
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        names = _write_merged(stage, base, ahn, base_files, base_map, ahn_tensors, merged_cfg, progress)
        out.mkdir(exist_ok=True)
        if force:  # stale shards of an earlier merge would be picked up by the loader
            for f in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
                f.unlink()
        for name in names:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ahn-merge", description="Merge a base Qwen2.5 checkpoint and AHN-only "
                                "weights into one checkpoint loadable by ahn_ops.from_pretrained.")
    p.add_argument("--base", required=True, help="base model directory (config.json + *.safetensors)")
    p.add_argument("--ahn", required=True, help="AHN-only directory (config.json + model.safetensors) or file")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.add_argument("--kind", default=None, help="gdn | dn | mamba2 (default: the AHN config)")
    p.add_argument("--window", type=int, default=None, help="sliding window W (default: the AHN config)")
    p.add_argument("--sinks", type=int, default=None, help="sink tokens S (default: the AHN config or 0)")
    p.add_argument("--fa-layer-ids", default=None, help="comma-separated full-attention layers (default: config)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        out = merge(a.base, a.ahn, a.out, force=a.force, kind=a.kind, window=a.window, sinks=a.sinks,
                    fa_layer_ids=a.fa_layer_ids, progress=not a.quiet)
    # OSError: FileNotFoundError, permissions, disk full; MissingDependencyError: no [hf] extra
    except (ValueError, NotImplementedError, OSError, MissingDependencyError) as e:
        msg = " ".join(str(e).split())  # one line, however the message was built
        print(f"ahn-merge: error: {msg}", file=sys.stderr)
        return 2
    print(f"ahn-merge: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
