"""The documentation: the README as a front door that reaches every guide in one click, a site that builds with
`mkdocs build --strict` (no broken link, no missing page), a configuration reference generated from conf/ that
covers every key, benchmarks/README.md equal to what its script writes from the results, and a layout in
CONTRIBUTING.md that matches the tree. (Every command in these pages is composed by tests/test_quickstart.py.)"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(heading: str) -> str:
    """The anchor of a Markdown heading, as Python-Markdown's toc and GitHub make it."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s]+", "-", text).strip("-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(h.replace("`", "")) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


# The README --------------------------------------------------------------------------------------


def _readme_links() -> list[tuple[str, str, str]]:
    """(text, file, anchor) of the README's relative links."""
    links = []
    for text, target in re.findall(r"!?\[([^\]]*)\]\(([^)\s]+)\)", README):
        if not re.match(r"[a-z]+:", target):
            file, _, anchor = target.partition("#")
            links.append((text, file, anchor))
    return links


def test_the_readme_is_short_and_free_of_measurement_logs():
    assert len(README.splitlines()) <= 300
    for word in ("Xeon", "EPYC", "AMX", "load average", "idle", "min 58 s", "other runs"):
        assert word not in README, f"README.md names {word!r}: machine-specific numbers go to benchmarks/README.md"
    # the two quickstart commands, word for word (CI reads the second one; .ci/run runs it)
    assert "pip install -e . && python train.py experiment=quickstart" in README
    assert 'pip install -q -e ".[dev,slurm]" && python -m pytest -q' in README
    assert 'pip install -q -e ".[dev,slurm]" && python -m pytest -q' in (ROOT / ".ci" / "run").read_text()


def test_every_readme_link_reaches_a_file_and_its_heading():
    links = _readme_links()
    assert links
    for text, file, anchor in links:
        path = ROOT / file
        assert path.exists(), f"README link [{text}]({file}) points at nothing"
        if anchor:
            assert anchor in _anchors(path), f"README link [{text}]({file}#{anchor}): no such heading"


@pytest.mark.parametrize(
    "need,target",
    [
        ("install", "docs/install.md"),
        ("quickstart", "docs/quickstart.md"),
        ("resume", "docs/training.md#resume"),
        ("own images", "docs/data.md#your-own-images"),
        ("FID", "docs/evaluation.md"),
        ("ControlNet", "docs/controlnet.md"),
        ("SLURM", "docs/clusters.md"),
        ("benchmarks", "benchmarks/README.md"),
        ("config reference", "docs/reference/config.md"),
    ],
)
def test_a_newcomer_finds_each_topic_in_one_click_from_the_readme(need, target):
    assert f"]({target})" in README, f"README.md has no direct link to {target} ({need})"


def test_the_readme_results_are_the_benchmarks_numbers():
    """The one results table of the README quotes benchmarks/results/digits_quality_*.json, rounded."""
    for name, command in (("quickstart", "experiment=quickstart`"), ("digits_quickstart", "experiment=digits`"),
                          ("cfg_digits_800", "experiment=cfg_digits ")):
        r = json.loads((ROOT / "benchmarks" / "results" / f"digits_quality_{name}.json").read_text())
        row = next(line for line in README.splitlines() if line.startswith("| `python train.py") and command in line)
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == str(r["global_step"])
        assert cells[2] == f"{r['fd_digits']:.2f}" and cells[3] == f"{r['fd_digits_real_train_vs_val']:.2f}"
        assert cells[4] == f"{r['confidence']:.3f}"
        assert cells[5] == (f"{r['accuracy']:.3f}" if "accuracy" in r else "")


# The site ----------------------------------------------------------------------------------------


def test_mkdocs_build_strict(tmp_path):
    """What CI builds: any warning (a broken link or anchor, a page missing from the nav or a nav entry without a
    page, a docstring mkdocstrings cannot read) fails the build."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "sampler=dpmpp_2m" in config and "data.image_size" in config
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "ddpm_lightning.diffusion.samplers.dpmpp_2m" in api and "ddpm_lightning.diffusion.schedules" in api
    assert "Results at a glance" in (site / "benchmarks" / "index.html").read_text()
    assert (site / "physics" / "1_random_walk.png").is_file()


def test_every_page_of_docs_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages, "docs/ has no pages"
    for page in pages:
        assert re.search(rf":\s+{re.escape(page)}\s*$", nav, flags=re.M), f"docs/{page} is not in mkdocs.yml's nav"


# The configuration reference ---------------------------------------------------------------------


def _leaf_keys(value, prefix=""):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix


def test_the_config_reference_lists_every_option_and_key_of_conf():
    gen = _load(ROOT / "docs" / "gen_config_reference.py", "gen_config_reference")
    page = gen.render()
    conf = ROOT / "conf"
    for path in sorted(conf.rglob("*.yaml")):
        if path.parent != conf:
            group = path.parent.relative_to(conf).as_posix()
            assert f"### `{group}={path.stem}`" in page, f"conf/{group}/{path.name} missing"
        data = yaml.safe_load(path.read_text()) or {}
        data.pop("defaults", None)
        for key in _leaf_keys(data):
            assert f"{key}` |" in page, f"{key} of {path.relative_to(ROOT)} missing from the reference"


def test_the_stored_config_reference_is_what_the_generator_writes():
    gen = _load(ROOT / "docs" / "gen_config_reference.py", "gen_config_reference")
    assert (ROOT / "docs" / "reference" / "config.md").read_text() == gen.render(), (
        "docs/reference/config.md differs from conf/: run python docs/gen_config_reference.py docs/reference/config.md"
    )


def test_the_config_reference_takes_meanings_from_the_yaml_comments():
    gen = _load(ROOT / "docs" / "gen_config_reference.py", "gen_config_reference")
    description, comments = gen._comments(
        "# What this option is.\n_target_: a.B\n# the first key\nfirst: 1  # and more\nnested:\n  # inner\n  k: [1, 2]\nlast: 3 # tail\n"
    )
    assert description == "What this option is."
    assert comments == {"first": "the first key and more", "nested.k": "inner", "last": "tail"}
    page = gen.render()
    # a key whose meaning is a comment in conf/train.yaml, and one of a group's option
    assert re.search(r"\| `ckpt_path` \| `null` \| Resume: a checkpoint path", page)
    assert re.search(r"\| `sampler.clip_denoised` \| `true` \| Clip the x\\_0 prediction", page)


# Benchmarks --------------------------------------------------------------------------------------


def test_benchmarks_readme_is_what_its_script_writes():
    make_readme = _load(ROOT / "benchmarks" / "make_readme.py", "make_readme")
    assert (ROOT / "benchmarks" / "README.md").read_text() == make_readme.render(), (
        "benchmarks/README.md is not generated from benchmarks/results: run python benchmarks/make_readme.py"
    )


def test_benchmarks_readme_names_machine_torch_and_date_of_every_result():
    make_readme = _load(ROOT / "benchmarks" / "make_readme.py", "make_readme")
    text = make_readme.render()
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        machine = json.loads(path.read_text()).get("machine") or {}
        row = next(line for line in text.splitlines() if f"| `{path.name}` |" in line)
        assert make_readme.machine_class(machine) in row and (machine.get("torch") or "not recorded") in row
        assert (machine.get("date") or "not recorded") in row
    # a missing field is said to be missing, never guessed
    assert make_readme.machine_line({}) .count("not recorded") >= 5
    assert make_readme.script_of("sample_throughput_unet_cifar10_fp32", ["sample_throughput", "sampler_nfe"]) == "sample_throughput"
    assert make_readme.script_of("sampler_nfe_quickstart", ["sample_throughput", "sampler_nfe"]) == "sampler_nfe"


# CONTRIBUTING.md's layout ------------------------------------------------------------------------


def _layout_paths() -> list[str]:
    """The paths of the layout block: each line's first word, nested under the folder lines above it."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths, parents = [], []
    for line in block.splitlines():
        m = re.match(r"^( *)([\w./-]+)\s", line + " ")
        if not m or not m.group(2) or line.lstrip().startswith("#"):
            continue
        depth = len(m.group(1)) // 2
        parents = parents[:depth]
        path = "/".join([*parents, m.group(2).rstrip("/")])
        paths.append(path)
        if m.group(2).endswith("/"):
            parents.append(m.group(2).rstrip("/"))
    return paths


def test_the_contributing_layout_matches_the_tree():
    paths = _layout_paths()
    assert "ddpm_lightning/diffusion/samplers" in paths and "train.py" in paths
    for path in paths:
        assert (ROOT / path).exists(), f"CONTRIBUTING.md's layout lists {path}, which does not exist"
    listed = set(paths)
    package = ROOT / "ddpm_lightning"
    for folder in [package, *(d for d in package.iterdir() if d.is_dir() and f"ddpm_lightning/{d.name}" in listed and any(
            p.startswith(f"ddpm_lightning/{d.name}/") for p in listed))]:
        for item in sorted(folder.iterdir()):
            if item.name.startswith("_") or item.name == "__pycache__" or (item.is_file() and item.suffix != ".py"):
                continue
            name = item.relative_to(ROOT).as_posix()
            assert name in listed, f"{name} is missing from CONTRIBUTING.md's layout"
