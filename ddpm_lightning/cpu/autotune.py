"""Which implementation ("route") a CPU layer takes, chosen by measurement, and the optional C++ kernels.

The convolutions (`cpu.conv.Conv2d`) and GroupNorms (`cpu.norm.GroupNorm`) of the U-Net have several routes on
channels-last CPU tensors: PyTorch's own operator (oneDNN's convolution, `F.group_norm`), always a candidate and
the default, and the speed paths (Winograd F(4x4, 3x3) in fp32 and F(2x2, 3x3) with bf16 products, the
matrix-product weight gradient, the fused GroupNorm kernel). Which one is fastest depends on the CPU (AMX or not, AVX-512 or not), the shape, the dtype and whether
gradients are needed, so, as `torch.backends.cudnn.benchmark` does, the first call with a new (layer shape, input
shape, dtype, training or not, threads) times every candidate on copies of its inputs (forward, plus backward
when training; two warm-up rounds, then a few timed rounds, alternating the candidates) and keeps the fastest. A speed path
is taken only if its median beats the default's by more than MARGIN and it won most rounds, so the choice is never
worse than PyTorch's operator by more than the measurement noise.

Decisions are kept in memory and in `<cache>/routes-<machine>.json` (cache: $DDPM_LIGHTNING_CACHE or
~/.cache/ddpm_lightning; machine: a hash of the CPU model and flags, torch's version and the kernels' and routes'
sources), so later runs start without measuring and take the same routes. A file that cannot be read (bad
JSON, nesting too deep, wrong types, no permission), or that was written for another machine, is ignored with
one notice naming it and written afresh; where something other than a file (a directory) stands in its place,
or it cannot be written, the routes are kept in memory for the run, again with one notice.

`configure("off")` (conf `kernels: off`, or $DDPM_LIGHTNING_KERNELS=off) takes PyTorch's operators everywhere:
no kernel is built and nothing is timed. Tensors on other devices (CUDA) never reach this module.

The kernels (`kernels/*.cpp`) are compiled with `torch.utils.cpp_extension` on first use, into a folder named by
the source's hash and path (two checkouts never rebuild each other's). The build runs in a separate process
(about 45 s per kernel) while the layers take PyTorch's operators; the routes are measured once it is done. Where
no compiler is found, or the build fails, a one-line notice says so and PyTorch's operators are used.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "off")
MARGIN = 0.05  # a speed path is taken only when its median time is below (1 - MARGIN) x the default's
WARMUP = 2  # untimed rounds first: a route's first calls in a process can take 1.5-2x its later ones (measured)
ROUNDS = 5  # timed rounds per candidate after them (3 when a call takes over SLOW seconds)
SLOW = 0.05
FORMAT = 1  # of the cache file

_KERNELS = Path(__file__).with_name("kernels")
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512_fp16", "avx2", "fma")

_settings = {"mode": os.environ.get("DDPM_LIGHTNING_KERNELS", "auto"), "wait": False}
_kernels: dict = {}  # name -> the loaded extension, or False once it is known to be unavailable
_builds: dict[str, subprocess.Popen] = {}  # name -> the build process under way
_deferred: dict[str, float] = {}  # kernel -> when its build was put off (no core to spare): see DEFER_S
DEFER_S = 600.0  # ... it starts once the run has gone on this long (long enough to repay the compile), or at its end
_decisions: dict[str, dict] = {}  # key -> {"route": name, "ms": {candidate: median ms}} (this process and the file)
_used: dict[str, str] = {}  # key -> route, of the keys met by this process
_forced: dict[str, str] = {}  # op -> route (tests and benchmarks)
_pinned: dict[str, str] = {}  # key -> route, of the run being resumed (its checkpoint's `decisions()`)
_NEEDS = {"winograd": "winograd", "winograd_bf16": "winograd", "fused": "group_norm"}  # route -> the kernel it runs
_file: dict = {"loaded": False, "noticed": set(), "memory_only": set()}  # the last two: cache paths (str)


def configure(kernels: str | None = None, wait: bool | None = None) -> None:
    """Set the routes' mode ("auto": measured; "off": PyTorch's operators only) and whether a first use of a kernel
    waits for its build (True) or takes PyTorch's operators meanwhile (False, the default)."""
    if kernels is not None:
        if kernels not in MODES:
            raise ValueError(f"kernels={kernels!r} must be one of {', '.join(MODES)} (conf kernels, or $DDPM_LIGHTNING_KERNELS)")
        _settings["mode"] = kernels
    if wait is not None:
        _settings["wait"] = bool(wait)


def mode() -> str:
    if _settings["mode"] not in MODES:
        raise ValueError(f"$DDPM_LIGHTNING_KERNELS={_settings['mode']!r} must be one of {', '.join(MODES)}")
    return _settings["mode"]


# ---------------------------------------------------------------------------------------------------------------
# The C++ kernels


def source_hash(name: str) -> str:
    """Hash of kernels/<name>.cpp and its compiler flags: part of the route cache's key."""
    flags = _CFLAGS + _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    return hashlib.sha256((_KERNELS / f"{name}.cpp").read_bytes() + " ".join(flags).encode()).hexdigest()[:12]


def _extension_name(name: str) -> str:
    """The build folder's name: the source's hash and its path (ninja rebuilds a folder for a source elsewhere, so
    two checkouts, even of the same source, must not share one)."""
    where = hashlib.sha256(str((_KERNELS / f"{name}.cpp").resolve()).encode()).hexdigest()[:6]
    return f"ddpm_lightning_{name}_{torch.backends.cpu.get_cpu_capability().lower()}_{source_hash(name)}{where}"


def _load(name: str):
    """Build (if its folder holds no up-to-date build) and import kernels/<name>.cpp; raises where it cannot."""
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    return load(
        _extension_name(name),
        [str(_KERNELS / f"{name}.cpp")],
        extra_cflags=_CFLAGS + _ISA_FLAGS.get(capability, []),
        extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP in torch's builds; libgomp is torch's own
    )


def _built(name: str) -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(_extension_name(name), verbose=False))
    return (folder / f"{_extension_name(name)}.so").exists()


def _unavailable(name: str, why: str) -> None:
    warnings.warn(f"ddpm_lightning: C++ kernel {name}.cpp unavailable ({why}); using PyTorch's operators", stacklevel=3)
    _kernels[name] = False


def kernel(name: str = "group_norm", wait: bool | None = None):
    """The compiled extension kernels/<name>.cpp, or None: where it cannot be built (a one-line notice, once), with
    kernels off, or while its build runs in the background (`wait` false; default: configure's)."""
    if name in _kernels:
        return _kernels[name] or None
    if mode() == "off":
        return None
    wait = _settings["wait"] if wait is None else wait
    building = _builds.get(name)
    if not wait and _waiting(name, building):  # before the compiler and build-folder checks: see _waiting
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _unavailable(name, f"no C++ compiler {compiler!r} on PATH")
        return None
    if building is None and not wait and not _built(name):
        if name in _deferred or spare_core():
            _deferred.pop(name, None)
            _builds[name] = _start_build(name)
            log.info("building the C++ kernel %s.cpp in the background; PyTorch's operators meanwhile", name)
        else:
            if not _deferred:
                atexit.register(_build_deferred)
            _deferred[name] = time.monotonic()
            log.info("the C++ kernel %s.cpp will build after %.0f minutes of this run or when it ends, whichever comes "
                     "first (its %d threads use every core); PyTorch's operators meanwhile", name, DEFER_S / 60,
                     torch.get_num_threads())
        return None
    if building is not None and building.wait() != 0:
        _unavailable(name, f"its build failed; see {_build_log(name)}")
        return None
    _deferred.pop(name, None)  # built meanwhile (by another run): nothing left to build when this one ends
    try:
        _kernels[name] = _load(name)
    except Exception as e:  # no headers, a compiler error, another platform: the plain path still works
        _unavailable(name, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    return _kernels[name] or None


def _waiting(name: str, building: subprocess.Popen | None) -> bool:
    """Whether the build of kernels/<name>.cpp is under way, or put off and DEFER_S not yet passed. Every layer asks
    `kernel` on every call, so this is answered first: looking for the compiler and the build folder takes about
    0.2 ms a call, a tenth of a small model's training step."""
    if building is not None:
        return building.poll() is None
    return name in _deferred and time.monotonic() - _deferred[name] < DEFER_S


def building(name: str) -> bool:
    """Whether kernels/<name>.cpp is being built in the background or will be later in this run or when it ends
    (its routes are measured once it is built)."""
    return kernel(name) is None and (name in _builds or name in _deferred) and name not in _kernels


def _build_deferred() -> None:
    """Start the builds put off until this process ends (it exits; the builds go on)."""
    while _deferred:
        name = next(iter(_deferred))
        _deferred.pop(name)
        _builds[name] = _start_build(name)


def spare_core() -> bool:
    """Whether this process may use more cores than torch's threads, so that a compiler beside them does not slow
    them: on a 2-core machine running 2 threads, even a compiler at the lowest priority made a small model's
    training steps 10 times slower (its threads wait on each other hundreds of times a step). Without one, the
    build waits DEFER_S seconds: a short run (the quickstart) never pays for it, a long one soon repays it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


def _build_log(name: str) -> Path:
    return cache_dir() / f"build-{name}-{source_hash(name)}.log"


def _start_build(name: str) -> subprocess.Popen:
    """A separate process that builds the kernel: beside training on a spare core, else after DEFER_S or as this
    process ends (`kernel`); it finishes the build even if this process ends first, leaving it for the next run."""
    root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {root!r}); from ddpm_lightning.cpu.autotune import _load; _load({name!r})"
    return background(code, _build_log(name))


_IDLE = "import os; os.nice(19); hasattr(os, 'SCHED_IDLE') and os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))"


def background(code: str, log_path: Path) -> subprocess.Popen:
    """Run Python `code` in a process of its own session (it outlives this one) at the lowest CPU priority (nice 19
    and, on Linux, SCHED_IDLE, inherited by the compiler it starts), output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        return subprocess.Popen([sys.executable, "-c", f"{_IDLE}; {code}"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


# ---------------------------------------------------------------------------------------------------------------
# Route decisions


def cache_dir() -> Path:
    return Path(os.environ.get("DDPM_LIGHTNING_CACHE") or Path.home() / ".cache" / "ddpm_lightning")


@functools.cache
def machine() -> dict:
    """What the timings depend on: CPU model and flags, torch's version, the kernels' and the routes' sources."""
    cpu, flags = "", set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "flags": [f for f in _CPU_FLAGS if f in flags],
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "kernels": {n: source_hash(n) for n in ("group_norm", "winograd")},
        "routes": _routes_hash(),
    }


def _routes_hash() -> str:
    """Hash of the Python side of the routes (cpu/conv.py, cpu/norm.py: chunk sizes, conversions), which the
    timings depend on as much as on the kernels."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / f).read_bytes() for f in ("conv.py", "norm.py"))).hexdigest()[:12]


def cache_path() -> Path:
    key = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"routes-{key}.json"


def _notice(path: Path, text: str) -> None:
    """One notice per cache file and process, however many decisions meet it."""
    if str(path) not in _file["noticed"]:
        _file["noticed"].add(str(path))
        warnings.warn(f"ddpm_lightning: {text}", stacklevel=5)


def _read_file() -> dict:
    """The decisions in the cache file: {} where it is missing, and (with a notice) where it is unreadable or
    written for another machine. Only a regular file is opened (a FIFO in its place would block the run); where
    something else stands there, the run keeps its routes in memory (`_write_file` leaves it alone)."""
    path = cache_path()
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            _file["memory_only"].add(str(path))
            _notice(path, f"ignoring the route cache {path} (not a regular file); measuring the routes again and "
                          "keeping them for this run only (remove it to have them kept)")
            return {}
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("routes"), dict):
            raise ValueError("not a route cache of this version")
        if data.get("machine") != machine():
            raise ValueError("written for another machine, torch or kernel source")
        if not all(isinstance(v, dict) and isinstance(v.get("route"), str) for v in data["routes"].values()):
            raise ValueError("malformed entries")
        return data["routes"]
    except FileNotFoundError:
        return {}
    except RecursionError:  # json's decoder on deeply nested brackets
        _notice(path, f"ignoring the route cache {path} (nested too deeply to be one); measuring the routes again")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        _notice(path, f"ignoring the route cache {path} ({e}); measuring the routes again")
    return {}


def _write_file() -> None:
    """Merge this process's decisions into the cache file (written whole to a temporary file, then renamed; the
    temporary file never outlives the call). Where that fails (a read-only home, a directory in the file's place),
    one notice, and the decisions stay in memory."""
    path = cache_path()
    if str(path) in _file["memory_only"]:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        routes = {**_read_file(), **_decisions}  # a bad file was noticed when first read: no second notice
        if str(path) in _file["memory_only"]:
            return
        tmp.write_text(json.dumps({"format": FORMAT, "machine": machine(), "routes": routes}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        _file["memory_only"].add(str(path))
        _notice(path, f"could not write the route cache {path} ({e}); the routes are kept for this run only")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def decisions() -> dict[str, str]:
    """key -> route of every (layer, input) this process has met (with kernels auto)."""
    return dict(_used)


def reset() -> None:
    """Forget the decisions held in memory (the next call reads the cache file again) and the pinned routes."""
    _decisions.clear()
    _used.clear()
    _pinned.clear()
    _file.update(loaded=False, noticed=set(), memory_only=set())


def state() -> dict:
    """What a checkpoint keeps so that a resumed run takes the same routes (`restore`)."""
    return {"mode": mode(), "routes": decisions()}


def restore(saved: dict) -> None:
    """Take again the routes of the run that wrote `saved` (`state()` in its checkpoint): a resumed run computes
    what the uninterrupted one would have only with the same routes, as they differ in rounding and were timed
    in another process. A run measured with kernels off continues with them off; otherwise every key the run
    met takes its recorded route without measuring, and the kernels those routes run are built (waited for)
    first. Keys met for the first time after the resume are measured as usual."""
    if saved.get("mode") == "off" and mode() != "off":
        log.info("kernels=off: the resumed run was trained with PyTorch's operators only")
        configure("off")
    _pinned.clear()
    _pinned.update(saved.get("routes") or {})
    missing = sorted({_NEEDS[r] for r in _pinned.values() if r in _NEEDS} - ({k for k in _NEEDS.values() if kernel(k, wait=True)} if mode() != "off" else set()))
    if missing:
        log.warning("the resumed run took routes of the kernels %s, unavailable here: it continues, not bitwise as the uninterrupted run would", ", ".join(missing))


@contextlib.contextmanager
def forcing(**routes: str) -> Iterator[None]:
    """Take the given route per op (e.g. conv3x3="winograd") wherever it is a candidate, without measuring."""
    before = dict(_forced)
    _forced.update(routes)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)


def time_routes(bench: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Seconds of each call of each candidate: WARMUP untimed rounds, then ROUNDS rounds, each calling every
    candidate once (so a burst of load on a shared machine hits all alike). The global random state is left as it
    was."""
    with torch.random.fork_rng(devices=[]):
        start = time.perf_counter()
        for _ in range(WARMUP):
            for run in bench.values():
                run()
        rounds = ROUNDS if (time.perf_counter() - start) / (WARMUP * len(bench)) < SLOW else 3
        times: dict[str, list[float]] = {k: [] for k in bench}
        for _ in range(rounds):
            for k, run in bench.items():
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
    return times


def pick(times: dict[str, list[float]], default: str) -> str:
    """The candidate with the lowest median time if that median is below (1 - MARGIN) x the default's and it beat
    the default in most rounds (paired, as the rounds alternate); else `default` (ties go to it)."""
    median = {k: statistics.median(v) for k, v in times.items()}
    best = min(median, key=median.get)
    wins = sum(a < b for a, b in zip(times[best], times[default]))
    return best if median[best] < (1 - MARGIN) * median[default] and 2 * wins > len(times[default]) else default


def choose(key: str, candidates: list[str], bench: Callable[[str], Callable[[], object]], pending: bool = False) -> str:
    """The route for `key` among `candidates` (the first is PyTorch's operator, the default): the forced one, the
    resumed run's (`restore`), the decision already made (this process or the cache file), or the fastest by `time_routes` over `bench(route)`
    (a function running one call of that route on copies of the inputs). While a kernel is `pending` (building),
    the default, without deciding."""
    op = key.split("|", 1)[0]
    if _forced.get(op) in candidates:
        return _forced[op]
    if mode() == "off":
        return candidates[0]
    if _pinned.get(key) in candidates:
        _used[key] = _pinned[key]
        return _pinned[key]
    if len(candidates) == 1:  # recorded too (here and below): a run resumed from here takes the same
        _used[key] = candidates[0]
        return candidates[0]
    if not _file["loaded"]:
        _decisions.update(_read_file())
        _file["loaded"] = True
    known = _decisions.get(key)
    if known is not None and known["route"] in candidates:
        _used[key] = known["route"]
        return known["route"]
    if pending:
        _used[key] = candidates[0]
        return candidates[0]
    times = time_routes({c: bench(c) for c in candidates})
    route = pick(times, candidates[0])
    ms = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
    _decisions[key] = {"route": route, "ms": ms}
    _used[key] = route
    log.debug("route %s: %s (%s)", key, route, ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    _write_file()
    return route


def layer_key(op: str, x: torch.Tensor, dtype: torch.dtype, train: bool, *extra) -> str:
    """The key of a decision: op and layer shape, input shape without the batch size and dtype, compute dtype,
    training, threads. The batch size is left out so that a sample does not depend on the batch it is drawn in:
    routes differ in rounding, and every batch size takes the route decided first."""
    parts = [op, *map(str, extra), "x".join(map(str, x.shape[1:])), str(x.dtype).removeprefix("torch."), str(dtype).removeprefix("torch."),
             "train" if train else "eval", f"threads{torch.get_num_threads()}"]
    return "|".join(parts)


def training(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether a call builds a graph for a backward pass (its routes are then timed forward and backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))


def copies(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Detached copies with the same requires_grad, for timing a route without touching the real ones."""
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad and torch.is_grad_enabled()) for t in tensors]


def runner(forward: Callable[[], torch.Tensor], train: bool, leaves: list[torch.Tensor | None]) -> Callable[[], None]:
    """One call of a route: forward, and when training, backward with a fixed random output gradient."""
    dy: list[torch.Tensor] = []

    def run() -> None:
        for t in leaves:
            if t is not None:
                t.grad = None
        y = forward()
        if train:
            if not dy:
                dy.append(torch.randn_like(y))
            with torch.autocast("cpu", enabled=False):
                y.backward(dy[0])

    return run

