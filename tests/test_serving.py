"""The service's request guard, as an ASGI app over a stand-in endpoint, and its in-process
adaptive batching (the served demo models are exercised in test_pipeline.py)."""
import asyncio
import json
import os
import re
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.guard import RequestGuard, ServingState
from tests.conftest import sideways_photo


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


def _call(method: str, path: str, token: str = "", state: ServingState | None = None, describe=None,
          **kwargs) -> httpx.Response:
    app = RequestGuard(_endpoint, max_body_bytes=1000, max_images=2, reload_token=token, state=state, describe=describe)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _post(path: str, token: str = "", **kwargs) -> httpx.Response:
    return _call("POST", path, token, **kwargs)


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


def test_pixel_limits_are_checked_from_the_header_before_anything_is_decoded(tmp_path, monkeypatch):
    from PIL import Image, PngImagePlugin

    import serving.service as service

    Image.new("L", (300, 200)).save(big := tmp_path / "big.png")
    monkeypatch.setattr(service, "MAX_IMAGE_PIXELS", 300 * 200 - 1)

    def decoded(self):
        raise AssertionError("decoded before its size was checked")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decoded)
    with pytest.raises(service.TooLarge, match=r"images\[0\]: 300x200 = 60000 pixels; at most 59999 per image"):
        service._check_sizes([big.open("rb")])


def test_segment_masks_are_sized_as_the_upright_image(tmp_path):
    import torch

    from serving.service import _decode

    # Stored 8 wide, 4 high, and seen turned 90 degrees: 4 wide, 8 high.
    pixels, sizes = _decode([sideways_photo(tmp_path / "phone.jpg", orientation=8)], lambda images: torch.zeros(1, 3))
    assert sizes == [(4, 8)] and pixels.shape == (1, 3)


def test_while_loading_or_after_a_failed_load_readyz_and_the_endpoints_answer_503_with_the_reason():
    loading = ServingState(loading="loading demo@production")
    ready = _call("GET", "/readyz", state=loading)
    assert ready.status_code == 503 and ready.json() == {"ready": False, "error": "loading demo@production"}
    assert ready.headers["retry-after"] == "5"
    embed = _call("POST", "/embed", state=loading, files=[PNG])
    assert embed.status_code == 503 and "loading demo@production; retry shortly" in embed.json()["error"]
    failed = ServingState(failed="cannot serve demo@production: models:/demo-backbone/3 cannot be read")
    assert "cannot be read" in _call("GET", "/readyz", state=failed).json()["error"]
    served = ServingState(serving=("models:/demo-backbone/3", None))
    assert _call("POST", "/embed", state=served, files=[PNG]).status_code == 200
    assert _call("GET", "/readyz", state=served).json() == {"ready": True, "serving": ["models:/demo-backbone/3", None]}
    # Served, but unwatched: ready, and saying why.
    unwatched = ServingState(serving=("models:/demo-backbone/3", None), watch="no reference: not evaluated")
    assert _call("GET", "/readyz", state=unwatched).json() == {
        "ready": True, "serving": ["models:/demo-backbone/3", None], "watch": "no reference: not evaluated"}


def test_a_failed_load_is_said_once_and_served_on_no_guess(monkeypatch, caplog):
    import serving.service as service

    def unreadable(name, alias):
        raise OSError("models:/demo-backbone/3: no such file in the artifact store")

    monkeypatch.setattr(service, "load_at_start", unreadable)
    monkeypatch.setattr(service, "STATE", state := ServingState(loading="loading demo@production"))
    instance = object.__new__(service.VisionFoundry.inner)
    instance.name, instance.alias, instance.models = "demo", "production", None
    instance._load()
    assert instance.models is None and not instance.__is_ready__()
    assert state.loading is None and state.failed == ("cannot serve demo@production: "
                                                      "models:/demo-backbone/3: no such file in the artifact store")
    assert caplog.text.count("cannot serve demo@production") == 1


def test_the_openapi_page_says_what_is_served_and_sends_plain_form_fields():
    from serving.openapi import describe
    from serving.service import LIMITS, VisionFoundry

    generated = VisionFoundry.openapi_spec.asdict()
    spec = json.loads(_call("GET", "/docs.json", describe=lambda s: describe(
        s, ("models:/demo-backbone/3", "models:/demo-head/2"), ("demo", "production"), LIMITS),
        content=json.dumps(generated)).content)  # the stand-in endpoint echoes what BentoML would answer
    assert spec["info"]["title"] == "Vision Foundry"
    assert spec["info"]["version"] == "models:/demo-backbone/3 + models:/demo-head/2"
    assert "VF_MAX_IMAGES" in spec["info"]["description"] and "BentoML" not in spec["info"]["description"]
    classify = spec["paths"]["/classify"]["post"]
    assert "class of each image" in classify["description"]
    form = classify["requestBody"]["content"]["multipart/form-data"]
    assert "encoding" not in form  # Swagger UI then sends `head` as a text field, not a JSON "blob" file
    fields = form["schema"]["properties"]
    assert "EXIF orientation" in fields["images"]["description"] and "probe" in fields["head"]["description"]
    for route, schema in (("/embed", "Embeddings"), ("/classify", "Classification"), ("/segment", "Segmentation"),
                          ("/regress", "Regression"), ("/attention", "Attention")):
        answer = spec["paths"][route]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer["title"] == f"{schema}IODescriptor" and "model" in answer["required"], (route, answer)
    classified = spec["paths"]["/classify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert classified["properties"]["predictions"]["items"]["$ref"] == "#/components/schemas/ClassPrediction"
    assert spec["components"]["schemas"]["ClassPrediction"]["properties"]["probabilities"]["type"] == "object"
    embedded = spec["paths"]["/embed"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert embedded["properties"]["model"]["examples"] == ["models:/demo-backbone/3"]
    # OpenAPI 3.0's singular example too, which is what the bundled Swagger UI shows.
    assert embedded["properties"]["model"]["example"] == "models:/demo-backbone/3"
    assert spec["components"]["schemas"]["OODScore"]["properties"]["percentile"]["example"] == 62.5
    # The API page at the root and at /docs, where the README points: Swagger UI on the spec above,
    # with nothing loaded from outside the service.
    for path in ("/", "/docs"):
        docs = _call("GET", path)
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert "./docs.json" in docs.text and "swagger-ui-bundle.js" in docs.text
        assert not re.search(r"(src|href)=\"(https?:)?//", docs.text)


def test_an_alias_whose_files_cannot_be_read_is_refused_before_serving(monkeypatch, tmp_path, mlflow_store):
    import mlflow

    import serving.models as models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    client = mlflow.MlflowClient()
    client.create_registered_model("ct-backbone")
    client.create_model_version("ct-backbone", str(tmp_path / "gone"))  # its files were deleted from the store
    with pytest.raises(models.ServingError, match=r"models:/ct-backbone/1 cannot be read from the "
                                                  r"artifact store .*check the store's address and credentials"):
        models.download(("models:/ct-backbone/1", None), tmp_path / "fetched")
    with pytest.raises(models.ServingError, match=r"no version of ct-backbone holds @production: promote one"):
        models.servable_uris("ct", "production", client)


def test_slides_and_series_are_streamed_to_disk_checked_and_refused_by_field(tmp_path, monkeypatch):
    """The upload routes, answered by the guard over a real store: a real slide and a zipped series
    are kept under an id; what they are not is a 400 naming the field and leaves nothing stored."""
    import io
    import os
    import sys
    import zipfile
    from pathlib import Path

    from data.phantoms import blank, ct_series
    from serving import uploads

    monkeypatch.setenv(uploads.UPLOAD_DIR, str(tmp_path / "store"))
    slide = Path(os.environ.get("VF_TEST_SLIDE", Path(sys.prefix) / "testdata" / "cmu_small_region.svs"))
    app = RequestGuard(_endpoint, max_body_bytes=1000, max_images=2, max_upload_bytes=4 << 20)

    def upload(route: str, field: str, name: str, body: bytes) -> httpx.Response:
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard") as client:
                return await client.post(route, files={field: (name, body)})
        return asyncio.run(go())

    kept = upload("/upload_slide", "slide", "cmu.svs", slide.read_bytes())
    assert kept.status_code == 200 and (kept.json()["width"], kept.json()["height"]) == (2220, 2967)
    assert uploads.find(kept.json()["slide_id"], "slide").read_bytes() == slide.read_bytes()

    folder = ct_series(tmp_path / "series", [blank(), blank(), blank()])
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in folder.iterdir():
            zipped.write(path, f"export/{path.name}")
    series = upload("/upload_series", "series", "patient.zip", archive.getvalue())
    assert series.status_code == 200, series.text
    assert series.json()["series"]["slices"] == 3 and series.json()["series"]["pixel_spacing_mm"] == [0.5, 0.5]
    assert len(list(uploads.find(series.json()["series_id"], "series").rglob("*.dcm"))) == 3

    escaping = io.BytesIO()
    with zipfile.ZipFile(escaping, "w") as zipped:
        zipped.writestr("../../outside.dcm", b"x")
    stored = sorted(p.name for p in (tmp_path / "store").iterdir())
    for route, field, name, body, problem in (
        ("/upload_slide", "slide", "tile.png", b"x", "slide: 'tile.png' is not a whole-slide image file"),
        ("/upload_slide", "slide", "scan.svs", b"a report", "slide: not a readable whole-slide image"),
        ("/upload_series", "series", "scan.svs", b"x", "series: 'scan.svs' is not a .zip of one CT series"),
        ("/upload_series", "series", "p.zip", b"not a zip", "series: not a readable zip archive"),
        ("/upload_series", "series", "p.zip", escaping.getvalue(), "series: escapes the dataset root"),
        ("/upload_slide", "file", "cmu.svs", b"x", "slide: send exactly one file, in the field 'slide'"),
    ):
        answer = upload(route, field, name, body)
        assert answer.status_code == 400 and problem in answer.json()["error"], (problem, answer.text)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == stored  # nothing refused was kept
    assert upload("/upload_slide", "slide", "big.svs", b"0" * (4 << 20)).status_code == 413
    with pytest.raises(uploads.UploadRefused, match="slide_id: expected the 32 hex digits"):
        uploads.find("../etc", "slide")


def test_every_server_keeps_its_task_results_in_a_file_of_its_own(monkeypatch):
    """BentoML deletes and remakes its task store as a server starts; one shared file per host let a
    second service erase the first's tasks. Each server (not its workers) takes its own; an
    operator's setting stands."""
    from importlib.machinery import ModuleSpec

    from serving.service import TASK_STORE_CHOSEN, _task_store_of_this_server

    monkeypatch.setenv("BENTOML_RESULT_STORE", "")
    monkeypatch.setenv(TASK_STORE_CHOSEN, "")
    stores = []
    for _ in range(2):  # two servers started from this environment, as a test or a shell starts them
        _task_store_of_this_server()
        stores.append(os.environ["BENTOML_RESULT_STORE"])
    assert stores[0] != stores[1] and all(Path(s).parent.is_dir() and Path(s).name == "task_result.db" for s in stores)
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", ModuleSpec("_bentoml_impl.worker.service", None))
    _task_store_of_this_server()  # a worker: its server's
    assert os.environ["BENTOML_RESULT_STORE"] == stores[1]
    monkeypatch.undo()
    monkeypatch.setenv("BENTOML_RESULT_STORE", "/srv/vision-foundry/tasks.db")
    monkeypatch.delenv(TASK_STORE_CHOSEN, raising=False)
    _task_store_of_this_server()
    assert os.environ["BENTOML_RESULT_STORE"] == "/srv/vision-foundry/tasks.db"
