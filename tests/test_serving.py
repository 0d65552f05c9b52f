"""The service's request guard, as an ASGI app over a stand-in endpoint, and its in-process
adaptive batching (the served demo models are exercised in test_pipeline.py)."""
import asyncio
import json

import httpx
import numpy as np
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


def test_micro_batcher_coalesces_concurrent_calls_and_routes_results():
    import asyncio

    from serving.batching import MicroBatcher

    calls = []

    class Model:
        def double(self, batch):
            calls.append(len(batch))
            return batch * 2

    model = Model()

    async def main():
        batcher = MicroBatcher(max_batch=8, max_wait_ms=50)
        requests = [np.full((n, 3), i, np.float32) for i, n in enumerate([1, 2, 1, 3, 1])]
        # Each request names the model's method anew, as the service does: a new bound method object.
        return await asyncio.gather(*(batcher(r, model.double) for r in requests)), requests

    results, requests = asyncio.run(main())
    assert calls == [8]  # five requests, one forward pass
    for got, sent in zip(results, requests):
        np.testing.assert_array_equal(got, sent * 2)


def test_micro_batcher_caps_batches_separates_models_and_fails_only_the_failed_batch():
    import asyncio

    from serving.batching import MicroBatcher

    def fn(batch):
        if (batch < 0).any():
            raise ValueError("bad pixels")
        return batch

    def other(batch):  # a newly loaded model: never batched with the old one
        return batch + 100

    async def main():
        batcher = MicroBatcher(max_batch=2, max_wait_ms=20)
        results = await asyncio.gather(batcher(np.ones((2, 1)), fn), batcher(-np.ones((1, 1)), fn),
                                       batcher(np.ones((1, 1)), fn), batcher(np.ones((1, 1)), other),
                                       return_exceptions=True)
        return results, batcher.batch_sizes

    (first, bad, shared, swapped), sizes = asyncio.run(main())
    assert first.shape == (2, 1) and isinstance(bad, ValueError) and isinstance(shared, ValueError)
    assert swapped.tolist() == [[101.0]] and sizes == [2, 2, 1]


def test_segment_masks_are_sized_as_the_upright_image(tmp_path):
    from PIL import Image

    from serving.service import _check_sizes

    photo = Image.fromarray(np.zeros((4, 8, 3), np.uint8))  # stored 8 wide, 4 high ...
    exif = photo.getexif()
    exif[0x0112] = 8  # ... and seen turned 90 degrees: 4 wide, 8 high
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert _check_sizes([tmp_path / "phone.jpg"]) == [(4, 8)]
