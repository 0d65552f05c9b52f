"""The service's OpenAPI page as a user of it needs it: what the service is, which models answer
(the version is the served model versions, so a client can tell a promotion happened), the limits
a request must keep, and request bodies "Try it out" can send.

BentoML generates the page from the endpoints' signatures, docstrings and typed answers; what it
cannot know (the served models, the limits) is filled in here when ``/docs.json`` is asked for.
"""
from __future__ import annotations

from serving.guard import IMAGE_ROUTES

TITLE = "Vision Foundry"


def describe(spec: dict, serving: tuple, target: tuple[str, str], limits: dict[str, int]) -> dict:
    name, alias = target
    served = [uri for uri in serving if uri]
    info = spec.setdefault("info", {})
    info["title"] = TITLE
    info["version"] = " + ".join(served) or f"{name}@{alias} (loading)"
    info["description"] = "\n".join([
        f"The models of family **{name}** promoted to **@{alias}**: "
        + (", ".join(f"`{uri}`" for uri in served) or "loading") + ".",
        "",
        "Send images as multipart files under the field `images` (several per request are answered in "
        "order). Answers name the model versions that computed them. A promotion is picked up without a "
        "restart (`/reload`, or the periodic check); `/readyz` says what is served and why a new set was refused.",
        "",
        "Limits per request (413 names the one passed): "
        + ", ".join(f"`{key}` = {value:,}" for key, value in limits.items()) + ".",
        "",
        "Errors are JSON `{\"error\": \"...\"}` naming the field or image at fault (`images[2]: ...`).",
    ])
    info.pop("contact", None)
    for route in IMAGE_ROUTES:
        operation = spec.get("paths", {}).get(route, {}).get("post")
        if not operation:
            continue
        body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
        # BentoML declares text fields as JSON parts, which Swagger UI sends as a file named
        # "blob": plain form fields are what a browser, curl -F and the guard take.
        body.pop("encoding", None)
    _singular_examples(spec)
    return spec


def _singular_examples(node) -> None:
    """OpenAPI 3.0's ``example`` beside pydantic's JSON-Schema ``examples``: the Swagger UI BentoML
    bundles shows only the former (and ``"string"`` without it)."""
    if isinstance(node, dict):
        if isinstance(node.get("examples"), list) and node["examples"] and "example" not in node:
            node["example"] = node["examples"][0]
        for value in node.values():
            _singular_examples(value)
    elif isinstance(node, list):
        for value in node:
            _singular_examples(value)
