"""The route cache file (ddpm_lightning.cpu.autotune) when it cannot be read: one notice naming it, the routes
measured again, the file rebuilt where it can be (else the run keeps its routes in memory), no temporary file left
behind, and never a crash or a hang. Decisions are made through `choose` with stand-in routes, so no kernel is
built."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import warnings

import pytest

from helpers.promptly import promptly
from ddpm_lightning.cpu import autotune as routes

DECISIONS = 13  # keys a short run meets: each one writes the file


def decide_all() -> None:
    for i in range(DECISIONS):
        routes.choose(f"test|{i}", ["a", "b"], lambda route: (lambda: None))


def notices_while_deciding(cache, caplog) -> list[str]:
    """The warnings and logged warnings that name the cache file while a run makes its decisions, which must end
    promptly (a FIFO in the file's place must not block it)."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        promptly(decide_all, fifos=[cache] if cache.is_fifo() else [], timeout=60)
    return [str(w.message) for w in caught if str(cache) in str(w.message)] + \
        [r.getMessage() for r in caplog.records if str(cache) in r.getMessage()]


def keys() -> set[str]:
    return {f"test|{i}" for i in range(DECISIONS)}


@pytest.mark.parametrize("content", ["bad json", "deep nesting", "wrong types", "a list", "no permission"])
def test_an_unreadable_route_cache_gives_one_notice_naming_it_and_is_rebuilt(cache, caplog, monkeypatch, content):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text({
        "bad json": "{not json",
        "deep nesting": "[" * 200_000,
        "wrong types": json.dumps({"format": routes.FORMAT, "machine": routes.machine(), "routes": {"k": {"route": 5}}}),
        "a list": "[]",
        "no permission": "{}",
    }[content])
    if content == "no permission":  # chmod 000 does not stop root: its read fails as it would for a user
        read_text = pathlib.Path.read_text

        def denied(self, *args, **kwargs):
            if self == cache:
                raise PermissionError(13, "Permission denied", str(self))
            return read_text(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "read_text", denied)
    notices = notices_while_deciding(cache, caplog)
    assert len(notices) == 1 and "ignoring the route cache" in notices[0], notices
    monkeypatch.undo()
    data = json.loads(cache.read_text())  # written afresh: this machine's, with every decision
    assert data["machine"] == routes.machine() and set(data["routes"]) == keys()
    assert not list(cache.parent.glob("*.tmp"))


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_something_other_than_a_file_in_the_caches_place_gives_one_notice_and_is_left_alone(cache, caplog, kind):
    cache.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        cache.mkdir()
    else:
        os.mkfifo(cache)
    notices = notices_while_deciding(cache, caplog)
    assert len(notices) == 1 and "not a regular file" in notices[0] and "this run only" in notices[0], notices
    assert set(routes.decisions()) == keys()  # kept in memory for the run
    assert (cache.is_dir() if kind == "directory" else cache.is_fifo())
    assert not list(cache.parent.glob("*.tmp"))


def test_a_cache_that_cannot_be_written_gives_one_notice_and_leaves_no_temporary_file(cache, caplog, monkeypatch):
    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(routes.os, "replace", refused)
    notices = notices_while_deciding(cache, caplog)
    assert len(notices) == 1 and "could not write the route cache" in notices[0], notices
    assert set(routes.decisions()) == keys() and not cache.exists()
    assert not list(cache.parent.glob("*.tmp"))
