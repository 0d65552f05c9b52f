"""The request guard in front of the service, as an ASGI app over a stand-in endpoint (the served
demo models are exercised in test_pipeline.py)."""
import asyncio
import json

import httpx
import pytest

from serving.guard import RequestGuard


async def _endpoint(scope, receive, send):
    """Echoes the body it got; /big answers a client error with a long body, as pydantic's can be."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    status, payload = (400, json.dumps({"detail": ["x" * 100] * 500}).encode()) if scope["path"] == "/big" else (200, body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _post(path: str, token: str = "", **kwargs) -> httpx.Response:
    app = RequestGuard(_endpoint, max_body_bytes=1000, max_images=2, reload_token=token)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard") as client:
            return await client.post(path, **kwargs)

    return asyncio.run(go())


PNG = ("images", ("a.png", b"\x89PNG", "image/png"))


def test_image_endpoints_take_multipart_files_under_known_fields():
    ok = _post("/classify", files=[PNG], data={"head": "knn"})
    assert ok.status_code == 200 and b"\x89PNG" in ok.content  # the body reaches the endpoint whole
    cases = {
        "unknown field 'file'; expected files under 'images', text 'head'": dict(files=[("file", ("a.png", b"x"))]),
        "images: expected image files, got a text value (URLs are not fetched)": dict(data={"images": "http://x/y"}, files=[PNG]),
        "head: expected a text value, got a file": dict(files=[PNG, ("head", ("h", b"knn"))]),
        "images: send at least one image file": dict(files=[("head", (None, "knn"))]),
    }
    for message, request in cases.items():
        answer = _post("/classify", **request)
        assert answer.status_code == 400 and message in answer.json()["error"], (message, answer.text)
    assert _post("/embed", files=[PNG] * 3).status_code == 400  # more files than max_images


def test_bodies_are_bounded_before_they_are_parsed():
    as_json = _post("/embed", json={"images": ["x"] * 10})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["error"]
    declared = _post("/embed", files=[("images", ("a.png", b"x" * 2000))])
    assert declared.status_code == 413 and "at most 1000 (VF_MAX_REQUEST_BYTES)" in declared.json()["error"]

    async def chunks():  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b"--b\r\n" + b"x" * 100

    streamed = _post("/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413


def test_error_bodies_are_capped_and_other_routes_pass_through():
    big = _post("/big", json={})
    assert big.status_code == 400 and len(big.content) < 2048 and big.json()["truncated"] is True
    assert int(big.headers["content-length"]) == len(big.content)
    assert _post("/other", json={"a": 1}).json() == {"a": 1}


@pytest.mark.parametrize("token, header, status", [("", "", 403), ("s3cret", "", 401), ("s3cret", "Bearer nope", 401),
                                                   ("s3cret", "Bearer s3cret", 200)])
def test_reload_needs_the_operator_token(token, header, status):
    assert _post("/reload", token=token, headers={"Authorization": header} if header else {}).status_code == status
