"""A new user's first runs: a quiet log (benign third-party messages filtered, ours never), configs that compose
(every data option with every model option), an end-of-run summary that names files that exist and commands
that compose, and every command of the documentation (README.md, CONTRIBUTING.md, docs/**/*.md) and the SLURM
scripts: `python train.py` / `python evaluate.py` composed with Hydra, `python -m <module>` and
`python benchmarks/<script>.py` checked against the module or script they run."""

from __future__ import annotations

import importlib.util
import logging
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from helpers.config import CONF, TINY, compose_cfg
from ddpm_lightning import tasks
from ddpm_lightning.benign_warnings import LOG_RECORDS, WARNINGS, filter_benign_messages
from ddpm_lightning.compose import fit_attention, fit_model_to_data
from ddpm_lightning.compose import build

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# A quiet log -------------------------------------------------------------------------------------


def _shown(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_benign_messages()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    return len(caught) == 1


def test_benign_warnings_are_hidden_only_where_they_come_from():
    set_vital = "'set_vital' is deprecated, please do not call"
    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."
    assert not _shown(set_vital, UserWarning, "torchdata.stateful_dataloader.stateful_dataloader")
    assert not _shown(leaf, FutureWarning, "lightning.pytorch.utilities._pytree")
    # the same messages raised by our own code, or another warning of those modules, stay
    for module in ("ddpm_lightning.data.base", "ddpm_lightning.training.module", "ddpm_lightning"):
        assert _shown(set_vital, UserWarning, module) and _shown(leaf, FutureWarning, module)
    assert _shown("data.num_workers=0 is slow", UserWarning, "torchdata.stateful_dataloader.stateful_dataloader")
    assert _shown("something else is deprecated", FutureWarning, "lightning.pytorch.utilities._pytree")
    assert len(WARNINGS) == 2 and all(why for *_, why in WARNINGS)


def test_the_real_set_vital_warning_is_hidden():
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(StatefulDataLoader(list(range(4)), batch_size=2))
        assert any("set_vital" in str(w.message) for w in caught)  # what a new user saw
        caught.clear()
        filter_benign_messages()
        list(StatefulDataLoader(list(range(4)), batch_size=2))
    assert not any("set_vital" in str(w.message) for w in caught)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_benign_log_records_are_dropped_only_from_their_logger():
    filter_benign_messages()
    names = ("lightning.pytorch.utilities.rank_zero", "torch.utils.cpp_extension", "ddpm_lightning.cpu.norm")
    seen = _Records()
    loggers = [logging.getLogger(n) for n in names]  # torch's loggers do not propagate: a handler on each
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(seen)
        lg.setLevel(logging.INFO)
    try:
        tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://pypi.org/project/litlogger/)"
        loggers[0].info(tip)
        loggers[1].warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        assert seen.messages == []
        loggers[0].info("GPU available: False, used: False")
        loggers[1].warning("Error building extension 'group_norm'")
        loggers[2].warning("No CUDA runtime is found (ours: shown)")
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(seen)
            lg.setLevel(level)
    assert [m[:12] for m in seen.messages] == ["GPU availabl", "Error buildi", "No CUDA runt"]
    assert {name for name, *_ in LOG_RECORDS} == set(names[:2])


def test_filtering_twice_adds_no_second_filter():
    filter_benign_messages()
    filter_benign_messages()
    assert len(logging.getLogger("torch.utils.cpp_extension").filters) == 1


# Defaults that compose ---------------------------------------------------------------------------

# image data modules x image networks, and the toy (vector) data x the MLP: an MLP on images, or a U-Net on
# vectors, is a real contradiction
_ALL_DATA = sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml"))
_ALL_MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
PAIRS = [(d, m) for d in _ALL_DATA for m in _ALL_MODELS if d.startswith("toy") == (m == "mlp")]


def test_fit_attention_moves_out_of_range_resolutions_only():
    assert fit_attention([8], 64, 3) == [16]  # unet_small on 64x64 images: levels 64, 32, 16
    assert fit_attention([16], 8, 4) == [8]  # unet_cifar10 on 8x8 digits: levels 8, 4, 2, 1
    assert fit_attention([16], 32, 4) == [16]  # as made for
    assert fit_attention([4, 8], 64, 3) == [16]
    assert fit_attention([24], 64, 3) == [24]  # between two levels: left for the U-Net to refuse


@pytest.mark.parametrize("data,model", PAIRS)
def test_every_data_option_composes_with_every_model_option(data, model, tmp_path):
    """Each image `data=` with each image `model=` at the data's default image size builds (files are not read)."""
    module = "classifier" if model.startswith("classifier") else "diffusion"
    cfg = compose_cfg([f"data={data}", f"model={model}", f"module={module}"], tmp_path, tiny=False)
    fit_model_to_data(cfg)
    OmegaConf.resolve(cfg)
    if model == "mlp":
        build(cfg.model)
        return
    size = cfg.data.image_size
    levels = [size // 2**i for i in range(len(cfg.model.ch_mult))]
    assert set(cfg.model.attn_resolutions) <= set(levels)
    with torch.device("meta"):  # shapes only: the 35M-parameter models build in milliseconds
        net = build(cfg.model)
    assert net.image_size == size and net.in_channels == cfg.data.channels


def test_a_real_contradiction_is_still_refused(tmp_path):
    cfg = compose_cfg(["data=image_folder", "data.path=/any", "model.attn_resolutions=[24]"], tmp_path, tiny=False)
    fit_model_to_data(cfg)
    with pytest.raises(ValueError, match="model.attn_resolutions contains \\[24\\]"):
        build(cfg.model)


# Every command of the documentation and the SLURM scripts ----------------------------------------

PLACEHOLDER = re.compile(r"<[^>\n]+>")
# The pages a user reads: README.md, CONTRIBUTING.md and the MkDocs pages (the configuration reference among them,
# whose commands are those of conf/'s comments).
DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _python_lines(text: str, fenced_only: bool = True) -> list[list[str]]:
    """The words after `python` of every python command in the text's fenced code blocks and inline code spans that
    start with `python ` (continuation lines joined, comments dropped, `<placeholders>` replaced by a path,
    `a && b` split)."""
    if fenced_only:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        outside = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
        blocks += [m for m in re.findall(r"``?([^`\n]+?)``?", outside) if m.strip().startswith("python ")]
    else:
        blocks = [text]
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = PLACEHOLDER.sub("placeholder", line)
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                for i, w in enumerate(words[:-1]):
                    if w == "python":
                        found.append(words[i + 1 :])
    return found


def _commands(text: str, fenced_only: bool = True) -> list[tuple[str, list[str]]]:
    """(script, argv) of every `python train.py ...` / `python evaluate.py ...` in the text."""
    return [(w[0], w[1:]) for w in _python_lines(text, fenced_only) if w[0] in ("train.py", "evaluate.py")]


def _other_commands(text: str) -> list[tuple[str, list[str]]]:
    """(`-m module` or a script path, argv) of every other `python -m ...` / `python <file>.py ...` command
    (`python -c` snippets are left out)."""
    found = []
    for w in _python_lines(text):
        if w[0] == "-m" and len(w) > 1 and re.fullmatch(r"[A-Za-z_][\w.]*", w[1]):  # not prose's `python -m ...`
            found.append((f"-m {w[1]}", w[2:]))
        elif w[0].endswith(".py") and w[0] not in ("train.py", "evaluate.py"):
            found.append((w[0], w[1:]))
    return found


def _sbatch_commands(path: Path) -> list[tuple[str, list[str]]]:
    """The `sbatch <script> overrides...` examples in a SLURM script's header, as the python command it runs."""
    script = "evaluate.py" if "evaluate" in path.name else "train.py"
    found = []
    for line in path.read_text().splitlines():
        m = re.match(r"#\s+sbatch .*?slurm/\S+\.sbatch(.*)", line)
        if m:
            found.append((script, shlex.split(PLACEHOLDER.sub("placeholder", m.group(1)), comments=True)))
    return found


def _first_of_sweep(args: list[str]) -> list[str]:
    """A multirun's `key=a,b` becomes `key=a` (the first job of the sweep); -m / --multirun is dropped."""
    out = []
    for a in args:
        if a in ("-m", "--multirun"):
            continue
        key, _, value = a.partition("=")
        if "," in value and not value.startswith(("[", "{")):
            value = value.split(",")[0]
        out.append(f"{key}={value}" if _ else a)
    return out


def _compose(script: str, args: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    args = _first_of_sweep(args)
    hydra_args = [a for a in args if a.startswith("hydra")]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            config_name=script.removesuffix(".py"),
            overrides=[*args, f"paths.output_dir={tmp_path}"],
            return_hydra_config=bool(hydra_args),
        )
    if hydra_args:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def check_command(script: str, args: list[str], tmp_path: Path) -> None:
    """Compose the command's config as Hydra would and build what is built before any data is read: for
    train.py the model (with the module and its sampler) and the data module; for evaluate.py the checks of
    its options, the sampler and the guidance."""
    cfg = _compose(script, args, tmp_path)
    if script == "train.py":
        fit_model_to_data(cfg)
        OmegaConf.resolve(cfg)
        if cfg.module._target_.endswith("ControlNetModule"):  # built from base_ckpt, a trained model's file
            return
        with torch.device("meta"):  # the network's shapes and checks; its 35M weights need not be drawn
            build(cfg.model)
        if cfg.module._target_.endswith("DiffusionModule"):  # schedule, sampler and their pairing, optimiser
            # the same kind of network at its smallest (the full one was built above on the meta device)
            small = {"ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": []} if str(cfg.model._target_).endswith("UNet") else {}
            build(cfg.module, net=small)
        else:  # the (small) noise-aware classifier
            build(cfg.module)
        if not cfg.data._target_.endswith("ImageFolderDataModule"):  # which needs its folder to exist
            build(cfg.data)
        for c in (cfg.get("callbacks") or {}).values():
            if c and not str(c._target_).endswith("FID"):
                instantiate(c)
    else:
        from ddpm_lightning import metrics as M
        from ddpm_lightning.evaluation import _check

        _check(cfg, M.check_metric_names(cfg.metrics))
        if cfg.get("sampler"):
            instantiate(cfg.sampler)


README_COMMANDS = _commands((ROOT / "README.md").read_text())
DOC_COMMANDS = list(dict.fromkeys((s, tuple(a)) for p in DOC_FILES for s, a in _commands(p.read_text())))
OTHER_COMMANDS = list(dict.fromkeys((s, tuple(a)) for p in DOC_FILES for s, a in _other_commands(p.read_text())))
SBATCH_COMMANDS = [c for p in sorted((ROOT / "slurm").glob("*.sbatch")) for c in _sbatch_commands(p)]


def test_the_documented_commands_are_found():
    assert {s for s, _ in README_COMMANDS} == {"train.py", "evaluate.py"}
    assert ("train.py", ["experiment=quickstart"]) in README_COMMANDS
    assert {s for s, _ in DOC_COMMANDS} == {"train.py", "evaluate.py"} and len(DOC_COMMANDS) >= 60
    # every guide of the site is read, the generated configuration reference aside
    assert {"training.md", "data.md", "sampling.md", "controlnet.md", "clusters.md"} <= {p.name for p in DOC_FILES}
    others = {s for s, _ in OTHER_COMMANDS}
    assert {"-m pytest", "-m ddpm_lightning.interop.diffusers", "-m ddpm_lightning.physics.figures"} <= others
    assert any(s.startswith("benchmarks/") for s in others)
    assert {s for s, _ in SBATCH_COMMANDS} == {"train.py", "evaluate.py"}


@pytest.mark.parametrize("script,args", [(s, list(a)) for s, a in DOC_COMMANDS] + SBATCH_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_documented_command_composes_and_builds(script, args, tmp_path):
    check_command(script, args, tmp_path)


def _source_of(target: str) -> str:
    """The source text of what `python -m <module>` or `python <script>.py` runs (a package: its __main__)."""
    if target.startswith("-m "):
        name = target.removeprefix("-m ")
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"python -m {name}: no such module"
        if spec.submodule_search_locations:  # a package runs its __main__
            spec = importlib.util.find_spec(f"{name}.__main__")
            assert spec is not None, f"python -m {name}: the package has no __main__"
        return Path(spec.origin).read_text() if spec.origin and spec.origin.endswith(".py") else ""
    path = ROOT / target
    assert path.is_file(), f"python {target}: no such file"
    return path.read_text()


@pytest.mark.parametrize("target,args", OTHER_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_every_documented_module_and_script_command_exists_with_its_options(target, args):
    """`python -m X` runs an installed module and `python benchmarks/Y.py` an existing script, and every `--option`
    the documentation passes is one that module or script defines (`pytest`'s own options aside)."""
    source = _source_of(target)
    if target == "-m pytest":
        return
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        assert f'"{option}"' in source or f"'{option}'" in source, f"python {target}: {option} is not an option of it"


# The end-of-run summary ----------------------------------------------------------------------------


def _paths_and_commands(text: str) -> tuple[list[Path], list[tuple[str, list[str]]]]:
    paths = [Path(p) for p in re.findall(r"(/\S+\.(?:ckpt|png|npz|json))", text)]
    return paths, _commands(text, fenced_only=False)


@pytest.mark.slow
def test_train_and_evaluate_end_with_a_summary_of_existing_files_and_working_commands(tmp_path, capsys, monkeypatch):
    run = ["trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"]
    monkeypatch.setattr(tasks, "cli_overrides", lambda: [*TINY, *run])  # what `python train.py <TINY> <run>` passes
    tasks.train(compose_cfg(run, tmp_path / "run"))
    text = capsys.readouterr().out
    summary = text[text.index("Finished at step 2."):]
    paths, commands = _paths_and_commands(summary)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"run directory    {tmp_path / 'run'}" in summary and f"last checkpoint  {last}" in summary
    assert f"latest samples   {tmp_path / 'run' / 'samples' / 'step_0000002.png'}" in summary
    assert re.search(r"final metrics    .*train/loss \d", summary)
    assert paths and all(p.is_file() for p in paths), paths
    assert [s for s, _ in commands] == ["train.py", "evaluate.py", "evaluate.py"]
    for script, args in commands:
        assert f"ckpt_path={last}" in args
        check_command(script, args, tmp_path / "check")
    # "train further" describes the same model as the checkpoint, so the resume is accepted
    further = _compose("train.py", [a for a in commands[0][1] if not a.startswith("ckpt_path")], tmp_path / "check")
    fit_model_to_data(further)
    from ddpm_lightning.training.module import DiffusionModule

    tasks.check_resumable(last, build(further.module))
    assert isinstance(build(further.module), DiffusionModule)

    # evaluate.py ends the same way; the "other sampler" command of the training summary, run as written
    script, args = commands[2]
    assert "sampler=ddpm" in args  # the run's is DDIM (TINY); its schedule is DDPM's
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*args, "num_samples=4", "batch_size=4", f"output_dir={tmp_path / 'eval'}"])
    capsys.readouterr()
    tasks.evaluate(cfg)
    text = capsys.readouterr().out
    paths, commands = _paths_and_commands(text[text.index("Evaluated 4 samples"):])
    assert tmp_path / "eval" / "grid.png" in paths and all(p.is_file() for p in paths), paths
    assert [s for s, _ in commands] == ["evaluate.py", "evaluate.py"]
    for script, args in commands:
        check_command(script, args, tmp_path / "check")
