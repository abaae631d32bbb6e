"""A readable summary of an adapter, a combined adapter or a merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..adapters import inside, manifest_kind, read_manifest, verify_files
from ..errors import IntegrityError
from ..report import precisions_line


def _size_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def describe(directory: str | Path) -> dict:
    """Everything `icu-peft inspect` shows, as a dict (no sample text: ids and scores only)."""
    directory = Path(directory)
    m = read_manifest(directory)
    try:
        verify_files(directory, m)
        integrity = "ok"
    except IntegrityError as e:
        integrity = f"FAILED: {e}"
    kind = manifest_kind(m)
    base = m.get("base", {})
    out = {
        "path": str(directory),
        "kind": kind,
        "integrity": integrity,
        "request_id": m.get("request_id"),
        "created_at": m.get("created_at"),
        "method": m.get("method"),
        "status": m.get("status"),
        "base": {"name_or_path": base.get("name_or_path"), "gguf_file": base.get("gguf_file"),
                 "quantized": base.get("quantized"), "fingerprint": base.get("fingerprint", {}).get("sha256")},
        "size_bytes": _size_on_disk(directory),
        "files": len(m.get("files", {})),
    }
    if kind == "adapter":
        cfg = m.get("config", {})
        out["lora"] = {"r": cfg.get("lora_r"), "alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules")}
        out["thresholds"] = m.get("thresholds")
        out["forget"] = m.get("forget")
        out["retain"] = m.get("retain")
        out["precisions"] = m.get("precisions")
        out["epochs"] = m.get("epochs")
        out["wall_time_s"] = m.get("wall_time_s")
        out["samples"] = [{k: s[k] for k in ("id", "forgotten", "band", "before", "after") if k in s}
                          for s in m.get("samples", [])]  # before / after: only in manifests older than disclosure.py
    else:
        parts = m.get("adapters" if kind == "merged" else "components", [])
        out["forget"] = {"count": sum(int(p["forget"]["count"] or 0) for p in parts),
                         "forgotten": sum(int(p["forget"]["forgotten"] or 0) for p in parts)}
        out["parts"] = []
        for p in parts:
            try:
                d = describe(inside(directory, p.get("relpath")))
                d.pop("samples", None)
            except IntegrityError as e:
                d = {"integrity": f"FAILED: {e}"}
            d.update(request_id=p["request_id"], source=p.get("source"))
            out["parts"].append(d)
        if kind == "merged":
            out["merge"] = m.get("merge")
            out["history"] = m.get("history", [])
        else:
            out["lora"] = m.get("lora")
    return out


def _fmt_scores(block: Optional[dict]) -> str:
    if not block:
        return "-"
    b, a = block.get("before") or {}, block.get("after") or {}
    if not b and not a:
        return "-"
    def num(v) -> str:  # None: not measured (the retain set's EL is off by default)
        return "-" if v is None else f"{v:.3f}"

    parts = []
    for k in ("ma", "el"):
        if b.get(k) is not None or a.get(k) is not None:
            parts.append(f"{k.upper()} {num(b.get(k))} -> {num(a.get(k))}")
    return ", ".join(parts)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_description(d: dict, indent: str = "") -> str:
    """The human-readable form of `describe`."""
    lines = []
    add = lines.append
    title = {"adapter": "forget adapter", "combined": "combined forget adapter", "merged": "merged model"}[d["kind"]]
    add(f"{indent}{title}: {d['path']}")
    if d.get("request_id"):
        add(f"{indent}  request id:  {d['request_id']}")
    b = d["base"]
    fp = (b.get("fingerprint") or "")[:12]
    q = " (4-bit at training)" if b.get("quantized") else ""
    add(f"{indent}  base:        {b.get('name_or_path')}{' / ' + b['gguf_file'] if b.get('gguf_file') else ''}"
        f"  [fingerprint {fp}]{q}")
    add(f"{indent}  created:     {d.get('created_at')}   method: {d.get('method')}   status: {d.get('status') or '-'}")
    add(f"{indent}  size:        {_human_size(d['size_bytes'])} in {d['files'] + 1} files   integrity: {d['integrity']}")
    f = d.get("forget") or {}
    add(f"{indent}  forget set:  {f.get('forgotten')} of {f.get('count')} samples forgotten"
        + (f"; {_fmt_scores(f)}" if d["kind"] == "adapter" else ""))
    if d["kind"] == "adapter":
        t = d.get("thresholds") or {}
        if t:
            add(f"{indent}  thresholds:  MA <= {t.get('ma', float('nan')):.3f}, EL <= {t.get('el', float('nan')):.3f} "
                f"({t.get('source')})")
        add(f"{indent}  retain set:  {_fmt_scores(d.get('retain'))}")
        add(f"{indent}  forgotten in: {precisions_line({'precisions': d.get('precisions'), 'forget': f})}")
        lora = d.get("lora") or {}
        add(f"{indent}  LoRA:        r={lora.get('r')} alpha={lora.get('alpha')}   epochs: {d.get('epochs')}   "
            f"train time: {d.get('wall_time_s')} s")
    elif d["kind"] == "merged":
        mg = d.get("merge") or {}
        add(f"{indent}  merged in:   {mg.get('compute_dtype')}, saved as {mg.get('dtype')}")
        for h in d.get("history", []):
            add(f"{indent}  history:     {h.get('op')} {', '.join(h.get('request_ids', [])) or h.get('into', '')} "
                f"at {h.get('at')}")
    if d.get("parts") is not None:
        add(f"{indent}  parts ({len(d['parts'])}): {', '.join(str(p['request_id']) for p in d['parts'])}")
        for p in d["parts"]:
            if "kind" in p:
                lines.append(format_description(p, indent + "    "))
            else:
                add(f"{indent}    {p['request_id']}: integrity {p['integrity']}")
    return "\n".join(lines)
