"""A benchmark result (runner.run's dict) as text: a progress line per row, a markdown table, the paths moelm chose,
and the section `--markdown` appends to docs/benchmarks.md."""
from __future__ import annotations


def number(v) -> str:
    """A figure as the tables show it: one decimal below 1000, none above; None -> —, NaN -> n/a."""
    if v is None:
        return "—"
    if v != v:
        return "n/a"
    return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def row_line(r: dict, labels) -> str:
    """One result row as a progress line: `  name (unit): label value, ...`."""
    return f"  {r['name']} ({r['unit']}): " + ", ".join(f"{lib} {number(r.get(lib))}" for lib in labels)


def table(result: dict) -> str:
    """One column per label, then moelm's ratio to each other column (higher: moelm faster or bigger)."""
    first, others = result["labels"][0], result["labels"][1:]
    head = [first, *others] + [f"{first} ÷ {o}" for o in others]
    lines = [f"| metric | {' | '.join(head)} |", "|---|" + "---:|" * len(head)]
    for r in result["rows"]:
        a = r.get(first)
        ratios = []
        for o in others:
            b = r.get(o)
            ok = a is not None and b not in (None, 0) and a == a and b == b
            ratios.append(f"{a / b:.2f}×" if ok else "—")
        values = [number(r.get(label)) for label in result["labels"]]
        lines.append(f"| {r['name']} ({r['unit']}) | {' | '.join(values + ratios)} |")
    return "\n".join(lines)


def paths_report(paths: dict[str, str]) -> str:
    """The paths moelm chose, one line per op and shape: `op (x dtype, rows up to, out, in, ...) -> path`."""
    return "\n".join(f"{entry.replace('|', ' ')} -> {path}" for entry, path in sorted(paths.items()))


def markdown_section(result: dict) -> str:
    w = result["weights"]
    kl = "" if result["kl"] is None else (f" Mean KL divergence of next-token distributions vs fp32 (8 random "
                                          f"32-token prompts, every position): {result['kl']:.2e}.")
    paths = paths_report(result.get("paths") or {})
    paths = (f"\n<details><summary>Paths chosen on this CPU ({len(result['paths'])} op shapes)</summary>\n\n"
             f"```\n{paths}\n```\n</details>\n") if paths else ""
    return (f"\n### {result['model']}, {result['dtype']}, {result['device']}\n\n"
            f"Machine: {result['machine']}  \n"
            f"CPU: {result['cpu']}  \n"
            f"Streaming-read bandwidth: {result['bandwidth'] / 1e9:.1f} GB/s (1 GiB fp32 `x.sum()`, best of 10). "
            f"{w['params_total'] / 1e6:.0f}M parameters, {w['bytes_per_token'] / 1e6:.0f} MB of weights read per "
            f"decoded token. Decode: {result['decode_tokens']} steps after a {result['decode_context']}-token "
            f"context; median of {result['repeats']} alternating repeats.{kl}\n\n{table(result)}\n{paths}")
