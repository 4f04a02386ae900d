"""Every response a test client receives, checked against the OpenAPI schema the app publishes.

`checked_client(app)` is a TestClient whose response hook fails the test when a response of a
documented route has a status the schema does not declare, lacks a header it declares as
required, has another media type, or a JSON body that does not validate (jsonschema, draft
2020-12, which OpenAPI 3.1 uses). Routes the schema does not list (404s, /docs) are not checked.
"""

from __future__ import annotations

import jsonschema
from fastapi.testclient import TestClient


class SchemaMismatch(AssertionError):
    pass


def check_response(doc: dict, method: str, path: str, response) -> None:
    """SchemaMismatch unless `response` (httpx, body read) is one the schema `doc` declares."""
    operations = doc["paths"].get(path)
    if operations is None:
        return
    where = f"{method} {path} -> {response.status_code}"
    op = operations.get(method.lower())
    if op is None:
        raise SchemaMismatch(f"{where}: the schema has no {method} for this path")
    declared = op["responses"].get(str(response.status_code)) or op["responses"].get("default")
    if declared is None:
        raise SchemaMismatch(f"{where}: status not declared (declared: {', '.join(op['responses'])})")
    for name, spec in declared.get("headers", {}).items():
        if spec.get("required") and name not in response.headers:
            raise SchemaMismatch(f"{where}: required header {name} missing")
    content = declared.get("content", {})
    if method.upper() == "HEAD" or not response.content:
        if content and method.upper() != "HEAD":
            raise SchemaMismatch(f"{where}: empty body where the schema declares {', '.join(content)}")
        return
    media = response.headers.get("content-type", "").split(";")[0].strip()
    if media not in content:
        raise SchemaMismatch(f"{where}: {media or 'no media type'} not declared (declared: {', '.join(content) or 'no body'})")
    schema = content[media].get("schema", {})
    if media == "application/json":
        try:
            jsonschema.validate(response.json(), {**schema, "components": doc.get("components", {})},
                                cls=jsonschema.Draft202012Validator)
        except jsonschema.ValidationError as e:
            raise SchemaMismatch(f"{where}: body does not match the schema: {e.message}") from None


def checked_client(app, **kwargs) -> TestClient:
    """A TestClient (use it in `with`) that checks every response against app.openapi()."""
    client = TestClient(app, **kwargs)
    doc = app.openapi()

    def hook(response):
        response.read()
        check_response(doc, response.request.method, response.request.url.path, response)

    client.event_hooks = {**client.event_hooks, "response": [*client.event_hooks.get("response", []), hook]}
    return client
