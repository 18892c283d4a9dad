"""Write benchmarks/README.md from the benchmark scripts' docstrings and benchmarks/results/*.json.

    python benchmarks/make_readme.py            # rewrite benchmarks/README.md
    python benchmarks/make_readme.py --check    # exit 1 if benchmarks/README.md is not what this script writes

The README is never edited by hand: run a benchmark (its JSON lands in benchmarks/results/), then this script.
How to run each benchmark comes from the usage lines of its docstring; every result names the machine it was
measured on (CPU or GPU, cores, threads), torch's version and the date, as recorded in its JSON's `machine`
(a field a JSON lacks is shown as "not recorded", never guessed).
"""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
NOT_SCRIPTS = {"common", "make_readme"}
NOT_RECORDED = "not recorded"


def scripts() -> dict[str, str]:
    """{script stem: its module docstring} of every benchmark script."""
    out = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem not in NOT_SCRIPTS:
            out[path.stem] = ast.get_docstring(ast.parse(path.read_text())) or ""
    return out


def script_of(result_stem: str, stems) -> str | None:
    """The script that writes a result file: the longest script name the file's name starts with."""
    matches = [s for s in stems if result_stem == s or result_stem.startswith(s + "_")]
    return max(matches, key=len) if matches else None


def _num(v) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "-"
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 1e5:
            digits = max(0, 2 - math.floor(math.log10(abs(v))))
            return f"{v:.{digits}f}"
        return f"{v:.2e}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _recorded(machine: dict, key: str) -> str:
    v = machine.get(key)
    return NOT_RECORDED if v is None or v == "" else str(v)


def machine_class(machine: dict) -> str:
    """What the numbers depend on most: the GPU, or the CPU model and whether it has AMX (bf16 matrix units)."""
    if machine.get("gpu"):
        return f"GPU: {machine['gpu']}"
    cpu = machine.get("cpu") or machine.get("device") or "CPU " + NOT_RECORDED
    amx = {True: ", with AMX", False: ", without AMX"}.get(machine.get("amx"), ", AMX " + NOT_RECORDED)
    return f"CPU: {cpu}{amx}"


def machine_line(machine: dict) -> str:
    cores, threads = _recorded(machine, "cores"), _recorded(machine, "threads")
    load = machine.get("load_avg_1min")
    parts = [
        machine_class(machine),
        f"{cores} cores, {threads} threads",
        f"torch {_recorded(machine, 'torch')}",
        f"date {_recorded(machine, 'date')}",
        f"1-min load average when written {_num(float(load)) if load is not None else NOT_RECORDED}",
    ]
    if machine.get("kernels"):
        parts.append(f"kernels={machine['kernels']}")
    return "; ".join(parts)


def _table(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for r in rows:
        columns += [k for k, v in r.items() if k not in columns and not isinstance(v, (dict, list))]
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_num(r.get(c)) for c in columns) + " |" for r in rows]
    return out


def result_section(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    machine = data.get("machine") or {}
    out = [f"#### `results/{path.name}`", "", machine_line(machine), ""]
    rows = data.get("rows")
    extra = {k: v for k, v in data.items() if k not in ("machine", "rows")}
    if not isinstance(rows, list):  # a single result: its scalar fields are the row
        rows = [{k: v for k, v in extra.items() if not isinstance(v, (dict, list))}]
        extra = {k: v for k, v in extra.items() if isinstance(v, (dict, list))}
    if rows:
        out += [*_table(rows), ""]
    flat = {k: v for k, v in extra.items() if not isinstance(v, (dict, list))}
    flat.update({k: v for k, v in extra.items() if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values())})
    for k, v in flat.items():
        shown = ", ".join(f"{a}: {_num(b)}" for a, b in v.items()) if isinstance(v, dict) else _num(v)
        out.append(f"- {k}: {shown}")
    nested = [k for k in extra if k not in flat]
    if nested:
        out.append("- also in the JSON: " + ", ".join(f"`{k}`" for k in nested))
    if flat or nested:
        out.append("")
    return out


def _how_to_run(doc: str) -> list[str]:
    lines = doc.splitlines()
    summary = lines[0] if lines else ""
    usage = [line.strip() for line in lines if line.strip().startswith("python benchmarks/")]
    out = [summary, ""]
    if usage:
        out += ["```bash", *usage, "```", ""]
    return out


def render() -> str:
    docs = scripts()
    results: dict[str, list[Path]] = {s: [] for s in docs}
    orphans = []
    for path in sorted(RESULTS.glob("*.json")):
        s = script_of(path.stem, docs)
        (results[s] if s else orphans).append(path)

    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/make_readme.py from the scripts' docstrings and results/*.json: do not edit by hand. -->",
        "",
        "Speed and quality measurements, run on demand (they are not part of the tests, and tests never assert",
        "wall-clock times). Each script writes its JSON to `benchmarks/results/`, replacing the previous result of the",
        "same configuration; `python benchmarks/make_readme.py` then rewrites this file. Speed benchmarks run every",
        "implementation in one process, alternating them round by round, and report medians and the ratio",
        "ours / peer (`ours_over_this`); compare absolute numbers only within one result, since a shared or virtual",
        "machine's speed drifts between runs. The peers come with `pip install -e \".[bench]\"`.",
        "",
        "## Results at a glance",
        "",
        "| benchmark | result | machine | cores / threads | torch | date |",
        "|---|---|---|---|---|---|",
    ]
    for s, paths in results.items():
        for path in paths:
            m = json.loads(path.read_text()).get("machine") or {}
            out.append(
                f"| [{s}](#{s}) | `{path.name}` | {machine_class(m)} | {_recorded(m, 'cores')} / "
                f"{_recorded(m, 'threads')} | {_recorded(m, 'torch')} | {_recorded(m, 'date')} |"
            )
    out.append("")
    for s, doc in docs.items():
        out += [f"## {s}", "", *_how_to_run(doc)]
        paths = results[s]
        if not paths:
            out += ["No result committed.", ""]
            continue
        by_class: dict[str, list[Path]] = {}
        for path in paths:
            by_class.setdefault(machine_class(json.loads(path.read_text()).get("machine") or {}), []).append(path)
        for cls, group in sorted(by_class.items()):
            out += [f"### {cls}", ""]
            for path in group:
                out += result_section(path)
    if orphans:
        out += ["## Results of no current script", ""]
        for path in orphans:
            out += result_section(path)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if README.read_text() != text:
            print("benchmarks/README.md is out of date: run python benchmarks/make_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
