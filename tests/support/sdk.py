"""What the official-SDK tests (``openai``, ``anthropic``) share: one gateway per test
module in front of the fake provider, its per-test fixture, clients built as users
build them (only ``base_url`` and ``api_key``, and the options a scenario needs: the
SDK's retries stay on), and the cases of a troubled upstream."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest

from support import Harness, harness

# The SDK's side of a troubled upstream (every hostile usage, on every route, is in
# test_gateway_clients.py): a cut answer, and answers without or with absurd usage.
TROUBLE = ["cut", "usage=omit", "usage=huge"]


def module_gateway(tier: Dict[str, Any], n_keys: int = 200) -> Tuple[Callable[..., Any], Callable[..., Any]]:
    """The fixtures ``shared`` (the module's gateway with one ``tier`` and ``n_keys``
    keys, started once) and ``h`` (that gateway; after each test, its requests are all
    settled). In a test module: ``shared, h = module_gateway(TIER)``."""

    @pytest.fixture(scope="module", name="shared")
    def shared(tmp_path_factory: Any) -> Any:
        with harness(tmp_path_factory.mktemp("gw"), tier, n_keys=n_keys) as one:
            yield one

    @pytest.fixture(name="h")
    def h(shared: Harness) -> Any:
        """The module's gateway; after each test, its requests are all settled."""
        yield shared
        shared.quiesce()

    return shared, h


def openai_client(h: Harness, key: str, **options: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{h.url}/v1", api_key=key, **options)


def openai_aclient(h: Harness, key: str, **options: Any) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key=key, **options)


def anthropic_client(h: Harness, key: str, **options: Any) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=h.url, api_key=key, **options)


def anthropic_aclient(h: Harness, key: str, **options: Any) -> Any:
    import anthropic

    return anthropic.AsyncAnthropic(base_url=h.url, api_key=key, **options)


def trouble_cases(cut_json: bool = True) -> List[Any]:
    """``(fake, stream)`` for each kind of :data:`TROUBLE`, as JSON and as a stream
    (``cut_json`` False: without a cut JSON answer, which an SDK retries with back-off)."""
    return [
        pytest.param(fake, stream, id=f"{fake}-{'sse' if stream else 'json'}")
        for fake in TROUBLE
        for stream in (False, True)
        if stream or cut_json or fake != "cut"
    ]
