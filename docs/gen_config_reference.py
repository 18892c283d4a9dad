"""The configuration reference page, generated from `conf/` so that it cannot drift from it.

Every config group (a folder of `conf/`), each of its options (a YAML file) and each key with its default, the
meaning taken from the YAML comments: the comment lines right above a key, or the comment at the end of its line.
A comment at the top of a file, followed by a blank line, `defaults:` or `_target_:`, describes the whole option.

Used two ways:
- as a script, `python docs/gen_config_reference.py docs/reference/config.md`, which writes the page kept in the
  repository (so that it reads on GitHub too; tests/test_docs.py fails when it differs from conf/);
- as an MkDocs hook (`hooks:` in mkdocs.yml): every build renders the page afresh from conf/, so the site cannot
  drift even from an uncommitted change.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGE = "reference/config.md"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*|'[^']*'|\"[^\"]*\")\s*:(?P<rest>.*)$")


def _inline_comment(rest: str) -> str:
    """The comment at the end of a `key: value  # comment` line (a # inside quotes is not one)."""
    quote = None
    for i, ch in enumerate(rest):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or rest[i - 1] in " \t"):
            return rest[i + 1 :].strip()
    return ""


def _comments(text: str) -> tuple[str, dict[str, str]]:
    """(the file's description, {dotted key: its comment}) from the YAML text."""
    lines = text.splitlines()
    description: list[str] = []
    pending: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    found: dict[str, str] = {}
    seen_key = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("# @package"):
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            if not seen_key and pending and not description:
                description, pending = pending, []
            else:
                pending = []
            continue
        m = _KEY.match(line)
        if not m or stripped.startswith("-"):
            pending = []
            continue
        indent, key = len(m["indent"]), m["key"].strip("'\"")
        if not seen_key and pending and not description and key in ("defaults", "_target_"):
            description, pending = pending, []
        seen_key = True
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        comment = " ".join([*pending, _inline_comment(m["rest"])]).strip()
        if comment:
            found[dotted] = comment
        pending = []
        stack.append((indent, key))
    return " ".join(description), found


def _flatten(value, prefix: str = ""):
    """(dotted key, leaf value) pairs; lists and empty mappings are leaves."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, value


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _md(text: str) -> str:
    """Text for a table cell: backticked spans kept as code, the rest escaped for Markdown and HTML."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        parts = [text.replace("`", "'")]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"`{part}`")
        else:
            for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"), ("_", "\\_"), ("[", "\\["), ("]", "\\]")):
                part = part.replace(a, b)
            out.append(part)
    return "".join(out).replace("|", "\\|")


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _package(path: Path, text: str) -> str:
    """Where the option's keys land in the composed config (Hydra's default package, or `# @package`)."""
    m = re.search(r"^# @package (\S+)", text, flags=re.M)
    group = path.parent.relative_to(CONF).as_posix()
    if m:
        pkg = m.group(1)
        return "" if pkg == "_global_" else pkg.replace("_group_", group.replace("/", "."))
    return "" if group == "." else group.replace("/", ".")


def _option(path: Path) -> list[str]:
    text = path.read_text()
    description, comments = _comments(text)
    data = yaml.safe_load(text) or {}
    defaults = data.pop("defaults", None) if isinstance(data, dict) else None
    package = _package(path, text)
    out = []
    if description:
        out += [_md(description), ""]
    if defaults:
        out += ["Composes: " + ", ".join(_code(_show(d)) for d in defaults), ""]
    rows = []
    for key, value in _flatten(data):
        full = f"{package}.{key}" if package and key else (key or package)
        rows.append(f"| {_code(full)} | {_code(_show(value))} | {_md(comments.get(key, ''))} |")
    if rows:
        out += ["| key | default | meaning |", "|---|---|---|", *rows, ""]
    return out


def render(conf: Path = CONF) -> str:
    """The whole reference page."""
    out = [
        "# Configuration reference",
        "",
        "Every config group of `conf/`, its options and their keys with the default and meaning (from the YAML",
        "comments). This page is generated from `conf/` by `docs/gen_config_reference.py` (at every documentation",
        "build, and into the repository), so it always matches the code. Pick an option with `group=option` and set a key with `key=value` on the",
        "`python train.py` / `python evaluate.py` command line; `experiment` options set keys of several groups at once.",
        "",
    ]
    primary = sorted(p for p in conf.glob("*.yaml"))
    groups = sorted({p.parent for p in conf.rglob("*.yaml")} - {conf})
    for path in primary:
        out += [f"## `{path.stem}.py`: `conf/{path.name}`", "", *_option(path)]
    for group in groups:
        name = group.relative_to(conf).as_posix()
        options = sorted(group.glob("*.yaml"))
        out += [f"## Group `{name}`", "", "Options: " + ", ".join(f"`{p.stem}`" for p in options) + ".", ""]
        for path in options:
            out += [f"### `{name}={path.stem}`", "", *_option(path)]
    return "\n".join(out).rstrip() + "\n"


def on_files(files, config):
    """MkDocs hook: add the generated page to the build."""
    from mkdocs.structure.files import File

    stored = files.get_file_from_path(PAGE)
    if stored is not None:
        files.remove(stored)
    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    page = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(page)
    else:
        sys.stdout.write(page)
