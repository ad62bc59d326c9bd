"""Reports: one checkpoint's report as JSON + Markdown, and a comparison of several (table, JSON, PNG plot)."""

from __future__ import annotations

from pathlib import Path

from vpmoe import provenance
from vpmoe.artifacts.files import write_json, write_text

SCHEMA = "vpmoe.eval/1"

# Comparison columns: (key, header, path into the report, format).
METRICS = (
    ("loss", "loss", ("heldout", "spans", "all", "loss"), "{:.4f}"),
    ("ppl", "ppl", ("heldout", "spans", "all", "perplexity"), "{:.2f}"),
    ("bpb", "bits/byte", ("heldout", "spans", "all", "bits_per_byte"), "{:.4f}"),
    ("loss_reasoning", "loss reasoning", ("heldout", "spans", "reasoning", "loss"), "{:.4f}"),
    ("loss_final", "loss final", ("heldout", "spans", "final", "loss"), "{:.4f}"),
    ("bpb_reasoning", "bpb reasoning", ("heldout", "spans", "reasoning", "bits_per_byte"), "{:.4f}"),
    ("bpb_final", "bpb final", ("heldout", "spans", "final", "bits_per_byte"), "{:.4f}"),
    ("teacher_kl", "KL teacher", ("teacher_kl", "all", "kl"), "{:.4f}"),
    ("suite", "suite acc", ("suite", "accuracy"), "{:.3f}"),
    ("parsed", "parsed", ("suite", "parse_valid_share"), "{:.2f}"),
    ("stopped", "<|return|>", ("suite", "stop_with_return_share"), "{:.2f}"),
    ("valid", "valid harmony", ("suite", "valid_harmony_share"), "{:.2f}"),
    ("sanity", "sanity", ("sanity", "ok"), "{}"),
)


def _get(report: dict, path: tuple):
    node = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _fmt(value, fmt: str = "{:.4f}") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "ok" if value else "FAIL"
    return fmt.format(value)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


# ------------------------------------------------------------------------------------------ one checkpoint


def markdown(report: dict) -> str:
    ck, model = report["checkpoint"], report.get("model", {})
    prov = report.get("provenance", {})
    lines = [f"# Core eval: {ck['label']}", ""]
    step = f", step {ck['step']}" if ck.get("step") is not None else ""
    lines.append(f"Checkpoint `{ck['path']}`{step}; model `{model.get('name', '?')}` "
                 f"({model.get('params_total', 0):,} parameters, {model.get('params_active', 0):,} active). "
                 f"Eval took {report.get('seconds', 0):.1f} s.")
    lines.append("")

    heldout = report.get("heldout")
    if heldout:
        lines += ["## Held-out loss", "",
                  f"Dataset `{heldout['dataset']}`, split `{heldout['split']}`, first {heldout['samples']} of "
                  f"{heldout['split_samples']} samples. Loss is mean cross-entropy (nats/token) over the span's "
                  "target tokens; bits/byte divides the summed nats by ln 2 times the UTF-8 bytes of those tokens.",
                  ""]
        rows = [[name, f"{m['tokens']:,}", f"{m['bytes']:,}", _fmt(m["loss"]), _fmt(m["perplexity"], "{:.2f}"),
                 _fmt(m["bits_per_byte"])] for name, m in heldout["spans"].items()]
        lines += _md_table(["span", "tokens", "bytes", "loss", "perplexity", "bits/byte"], rows) + [""]

    suite = report.get("suite")
    if suite:
        d = suite["decoding"]
        lines += ["## Micro-suite", "",
                  f"Suite `{suite['suite']}` {suite['version']} (sha256 {suite['sha256'][:12]}), {suite['items']} "
                  f"prompts, greedy, at most {d['max_new_tokens']} new tokens, reasoning effort "
                  f"{d['reasoning_effort']}; scored on the final channel.", ""]
        rows = [[cat, f"{e['correct']}/{e['total']}", f"{e['accuracy']:.3f}"]
                for cat, e in suite["by_category"].items()]
        rows.append(["**all**", f"{suite['correct']}/{suite['items']}", f"{suite['accuracy']:.3f}"])
        lines += _md_table(["category", "correct", "accuracy"], rows) + [""]
        lines += [f"Harmony: {suite['parse_valid_share']:.0%} parse, {suite['stop_with_return_share']:.0%} stop "
                  f"with `<|return|>`, {suite['valid_harmony_share']:.0%} valid with a final message; "
                  f"{suite['mean_tokens']:.1f} tokens per completion on average.", ""]
        lines += ["<details><summary>Items</summary>", ""]
        rows = [[r["id"], "yes" if r["correct"] else "no", "yes" if r["parsed"] else "no",
                 "yes" if r["stopped"] else "no", str(r["tokens"]),
                 "–" if r["final"] is None else repr(r["final"][:80])] for r in suite["results"]]
        lines += _md_table(["item", "correct", "parsed", "<|return|>", "tokens", "final"], rows)
        lines += ["", "</details>", ""]

    kl = report.get("teacher_kl")
    if kl:
        lines += ["## Held-out KL to the teacher", "",
                  "KL(teacher || student) per supervised token over the teacher's stored top-K plus a tail bucket.",
                  ""]
        rows = [[name, f"{m['tokens']:,}", _fmt(m["kl"])] for name, m in kl.items()]
        lines += _md_table(["span", "tokens", "KL (nats/token)"], rows) + [""]

    sanity = report.get("sanity")
    if sanity:
        lines += ["## Sanity", ""]
        rows = [[c["name"], "ok" if c["ok"] else "FAIL", c.get("detail", "")] for c in sanity["checks"]]
        lines += _md_table(["check", "result", "detail"], rows) + [""]

    lines += ["## Provenance", "",
              f"git `{prov.get('git_sha', '?')}`, settings hash `{report.get('settings_hash', '?')[:16]}`, "
              f"tokenizer `{prov.get('tokenizer_sha256', '?')[:16]}`, created {prov.get('created', '?')}; "
              f"{len(prov.get('parents', []))} parent record(s) (full record in the JSON report).", ""]
    return "\n".join(lines)


def write_report(report: dict, json_path: Path, md_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, report)
    write_text(md_path, markdown(report))


# ---------------------------------------------------------------------------------------------- comparison


def comparison_rows(reports: list[dict]) -> list[dict]:
    rows = []
    for report in reports:
        row = {"label": report["checkpoint"]["label"], "step": report["checkpoint"].get("step")}
        for key, _, path, _ in METRICS:
            row[key] = _get(report, path)
        for cat, entry in (_get(report, ("suite", "by_category")) or {}).items():
            row[f"suite_{cat}"] = entry["accuracy"]
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The metric columns that at least one row has, in METRICS order, with per-category accuracies after suite."""
    cols = []
    categories = sorted({k[len("suite_"):] for row in rows for k in row if k.startswith("suite_")})
    for key, header, _, fmt in METRICS:
        if any(row.get(key) is not None for row in rows):
            cols.append((key, header, fmt))
        if key == "suite":
            cols += [(f"suite_{c}", c, "{:.3f}") for c in categories]
    return cols


def comparison_table(rows: list[dict], markdown_table: bool = False) -> str:
    cols = _columns(rows)
    header = ["checkpoint"] + [h for _, h, _ in cols]
    body = [[row["label"]] + [_fmt(row.get(k), f) for k, _, f in cols] for row in rows]
    if markdown_table:
        return "\n".join(_md_table(header, body))
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Held-out loss, bits/byte, suite accuracy and Harmony validity across the checkpoints (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    numeric = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    x = steps if numeric else list(range(len(rows)))
    categories = sorted({k[len("suite_"):] for row in rows for k in row if k.startswith("suite_")})
    panels = [
        ("held-out loss (nats/token)", [("all", "loss"), ("reasoning", "loss_reasoning"), ("final", "loss_final")]),
        ("bits per byte", [("all", "bpb"), ("reasoning", "bpb_reasoning"), ("final", "bpb_final")]),
        ("micro-suite accuracy", [("all", "suite")] + [(c, f"suite_{c}") for c in categories]),
        ("Harmony validity (share)", [("parsed", "parsed"), ("<|return|>", "stopped"), ("valid", "valid")]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (name, series) in zip(axes.flat, panels):
        drawn = False
        for label, key in series:
            ys = [row.get(key) for row in rows]
            if all(y is None for y in ys):
                continue
            ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", label=label)
            drawn = True
        ax.set_title(name)
        if not drawn:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(series) > 1:
            ax.legend(fontsize=8)
        if name != panels[0][0] and name != panels[1][0]:
            ax.set_ylim(-0.05, 1.05)
        if numeric:
            ax.set_xlabel("step")
        else:
            ax.set_xticks(x)
            ax.set_xticklabels([row["label"] for row in rows], rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(reports: list[dict], out: Path, title: str = "Core eval comparison") -> dict[str, Path]:
    """compare.md (table + links), compare.json (rows + provenance) and compare.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(reports)
    paths = {"md": out / "compare.md", "json": out / "compare.json", "png": out / "compare.png"}
    plot(rows, paths["png"], title)
    parents = [r.get("provenance", {}) for r in reports]
    record = provenance.record("eval_comparison", "", parents=parents)
    write_json(paths["json"], {"schema": SCHEMA, "rows": rows, "provenance": record})
    md = [f"# {title}", "", comparison_table(rows, markdown_table=True), "", "![metrics](compare.png)", "",
          "Reports:", ""]
    md += [f"- {r['checkpoint']['label']}: checkpoint `{r['checkpoint']['path']}`, report "
           f"`{r['checkpoint'].get('report', '?')}`" for r in reports]
    write_text(paths["md"], "\n".join(md) + "\n")
    return paths
