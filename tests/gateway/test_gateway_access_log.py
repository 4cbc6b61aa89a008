"""The gateway writes uvicorn's access line itself when uvicorn's own logging setup is
in force: the bytes must be exactly those uvicorn's formatter writes, and any other
setup (colours, another format, a filter, a level that mutes it) must get the
standard logging path."""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator, Tuple

import pytest
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter

from nexus_limits.gateway import server

MSG = '%s - "%s %s HTTP/%s" %d'
FORMAT = LOGGING_CONFIG["formatters"]["access"]["fmt"]


@pytest.fixture
def loggers() -> Iterator[Any]:
    made = []

    def make(name: str, **formatter: Any) -> Tuple[logging.Logger, io.StringIO]:
        logger = logging.getLogger(f"nexus-test-access.{name}")
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(AccessFormatter(**{"fmt": FORMAT, "use_colors": False, **formatter}))
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
        made.append(logger)
        return logger, stream

    yield make
    for logger in made:
        logger.handlers = []


ARGS = [
    ("127.0.0.1:5555", "POST", "/v1/chat/completions", "1.1", 200),
    ("[::1]:40000", "GET", "/v1/models?limit=2&x=%20y", "1.0", 429),
    ("127.0.0.1:1", "DELETE", "/caf%C3%A9", "1.1", 599),  # no reason phrase
    ("127.0.0.1:1", "GET", "/", "1.1", 101),
    ("127.0.0.1:1", "GET", "/", "1.1", 504),
]


@pytest.mark.parametrize("args", ARGS)
def test_the_line_is_exactly_uvicorns(loggers, args):
    fast, fast_out = loggers("fast")
    slow, slow_out = loggers("slow")
    server._log_access(fast, MSG, args)
    slow.info(MSG, *args)
    assert fast_out.getvalue() == slow_out.getvalue()
    assert fast_out.getvalue().startswith("INFO:     ") and fast_out.getvalue().count("\n") == 1


@pytest.mark.parametrize(
    "setup",
    ["colours", "format", "logger-filter", "handler-filter", "propagate", "two-handlers", "handler-level"],
)
def test_any_other_setup_gets_what_logging_writes(loggers, setup):
    options = {"use_colors": True} if setup == "colours" else {}
    if setup == "format":
        options = {"fmt": "%(asctime)s " + FORMAT}
    ours, ours_out = loggers("ours", **options)
    theirs, theirs_out = loggers("theirs", **options)
    for logger in (ours, theirs):
        if setup == "logger-filter":
            logger.addFilter(lambda record: record.args[4] != 429)
        if setup == "handler-filter":
            logger.handlers[0].addFilter(lambda record: record.args[4] != 429)
        if setup == "handler-level":
            logger.handlers[0].setLevel(logging.WARNING)
        if setup == "two-handlers":
            logger.addHandler(logging.StreamHandler(logger.handlers[0].stream))
        if setup == "propagate":
            logger.propagate = True  # the root's handlers (pytest's capture) see it too
    for args in ARGS:
        server._log_access(ours, MSG, args)
        theirs.info(MSG, *args)
    if setup == "format":  # the time differs between the two loggers
        strip = lambda text: [line.split(" ", 2)[2] for line in text.splitlines()]  # noqa: E731
        assert strip(ours_out.getvalue()) == strip(theirs_out.getvalue())
    else:
        assert ours_out.getvalue() == theirs_out.getvalue()
    if setup in ("logger-filter", "handler-filter"):
        assert " 429 " not in ours_out.getvalue() and " 200 " in ours_out.getvalue()
    if setup == "handler-level":
        assert ours_out.getvalue() == ""
    if setup == "colours":
        assert "\x1b[" in ours_out.getvalue()


def test_a_muted_logger_writes_nothing(loggers):
    logger, out = loggers("muted")
    logger.setLevel(logging.WARNING)
    server._log_access(logger, MSG, ARGS[0])
    logger.setLevel(logging.INFO)
    logger.disabled = True
    server._log_access(logger, MSG, ARGS[0])
    logger.disabled = False
    assert out.getvalue() == ""
