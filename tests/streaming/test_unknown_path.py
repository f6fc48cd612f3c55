"""A WebSocket to a path with no route is refused cleanly at the handshake (HTTP 403), not with a
server error; the stream route beside it still accepts and answers in its own protocol."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.slow


async def handshake_status(url: str) -> int:
    try:
        async with websockets.connect(url, open_timeout=10):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


@pytest.mark.parametrize(
    "path",
    ["/nope", "/v1/modules/scaiecho/stream/transcribe/extra", "/v1/modules/scaiecho/stream", "/oai/v1/nowhere?token=x"],
)
def test_unknown_websocket_path_is_refused_with_403(live_daphne, path):
    url = live_daphne.url.replace("http://", "ws://") + path
    assert asyncio.run(handshake_status(url)) == 403
    log = live_daphne.log_path.read_text()
    assert "No route found" not in log
    assert "Traceback" not in log


def test_the_stream_route_still_accepts(live_daphne):
    url = live_daphne.url.replace("http://", "ws://") + "/v1/modules/scaiecho/stream/transcribe"

    async def first_frame() -> tuple[dict, int | None]:
        async with websockets.connect(url, open_timeout=10) as ws:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.wait_closed()
            return frame, ws.close_code

    frame, close_code = asyncio.run(first_frame())
    assert frame["type"] == "error"
    assert frame["code"] == "AUTH_TOKEN_MISSING"
    assert close_code == 4401
