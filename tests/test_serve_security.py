"""Requests a web page cannot forge: JSON bodies only (a form or text/plain POST needs no CORS
preflight), Host names on an allow-list (DNS rebinding), API keys compared as bytes (non-ASCII
keys are no 500), and a warning when the server listens beyond loopback without a key."""

from __future__ import annotations

import ipaddress
import re

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_support import MODEL, make_run, serving

from chargpt.cli.main import main
from chargpt.config import ServeConfig
from chargpt.errors import ChargptError
from chargpt.runs.directory import load_run
from chargpt.serve.app import create_app
from chargpt.serve.server import banner, exposure_warning

pytestmark = pytest.mark.usefixtures("one_thread")
BODY = {"model": MODEL, "prompt": "A", "max_tokens": 2}
JSON_BODY = b'{"model": "' + MODEL.encode() + b'", "prompt": "A", "max_tokens": 2}'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve_security"))


@pytest.fixture(scope="module")
def served(run_dir):
    with serving(run_dir, allowed_host=("chargpt.lan",)) as served:
        yield served


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/inspect"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_refused(served, path, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    sent = httpx.post(served.url + path, content=JSON_BODY, headers=headers, timeout=30)
    error = error_of(sent, 415)
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]


def test_json_with_a_charset_is_json(served):
    headers = {"Content-Type": "application/json; charset=utf-8"}
    sent = httpx.post(served.v1 + "/completions", content=JSON_BODY, headers=headers, timeout=30)
    assert sent.status_code == 200


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "chargpt.lan"])
def test_loopback_names_and_allowed_hosts_are_served(served, host):
    port = served.url.rsplit(":", 1)[1]
    sent = httpx.get(served.v1 + "/models", headers={"Host": f"{host}:{port}"}, timeout=30)
    assert sent.status_code == 200, sent.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example"])
def test_other_host_names_are_refused(served, host):
    """A rebinding page's requests carry its own name: they never reach the model."""
    sent = httpx.post(served.v1 + "/completions", json=BODY, headers={"Host": host}, timeout=30)
    error = error_of(sent, 400)
    assert error["code"] == "invalid_host" and "--allowed-host" in error["message"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.2", ()),
        ("0:0:0:0:0:0:0:1", ()),
        ("::1", ()),
        ("0.0.0.0", ("chargpt.lan",)),
        ("2001:db8:0:0:0:0:0:1", ("chargpt.lan",)),
    ],
)
def test_the_server_answers_to_the_url_its_banner_prints(run_dir, host, allowed):
    """What `chargpt serve --host HOST` prints is what its users open (the app alone, through
    ASGI: 127.0.0.2 or ::1 may not be reachable here); IPv6 also as browsers write it."""
    settings = ServeConfig(host=host, allowed_host=allowed)
    app = create_app(load_run(run_dir), run_dir, settings)
    url = re.search(r"at (http://\S+)/v1 ", banner(MODEL, settings, 8000)).group(1)  # type: ignore[union-attr]
    written = [url, url.removesuffix(":8000")]  # with and without the port
    if ":" in host:
        written.append(f"http://[{ipaddress.ip_address(host).compressed}]:8000")
    for base in written:
        sent = TestClient(app, base_url=base).get("/v1/models")
        assert sent.status_code == 200, (base, sent.text)
    refused = TestClient(app, base_url="http://evil.example:8000").get("/v1/models")
    assert error_of(refused, 400)["code"] == "invalid_host"


def test_keys_are_compared_as_bytes_and_401s_say_bearer(run_dir):
    with serving(run_dir, api_key="cl\u00e9") as served:
        url = served.v1 + "/completions"

        def post(authorization: bytes | None) -> httpx.Response:
            headers = {"Authorization": authorization} if authorization else {}
            return httpx.post(url, json=BODY, headers=headers, timeout=30)

        assert post("Bearer clé".encode()).status_code == 200  # the right key, in UTF-8
        for wrong in [b"Bearer cl\xe9", "Bearer \u00e9t\u00e9".encode(), b"Bearer cle", None]:
            refused = post(wrong)
            assert error_of(refused, 401)["code"] == "invalid_api_key"
            assert refused.headers["WWW-Authenticate"] == "Bearer"


def test_listening_beyond_loopback_without_a_key_is_warned_about():
    assert exposure_warning(ServeConfig()) is None
    assert exposure_warning(ServeConfig(host="::1")) is None
    assert exposure_warning(ServeConfig(host="0.0.0.0", api_key="k")) is None
    warning = exposure_warning(ServeConfig(host="0.0.0.0"))
    assert warning is not None and "CHARGPT_API_KEY" in warning and "0.0.0.0" in warning


def test_the_key_comes_from_the_environment_and_host_patterns_are_checked(run_dir, monkeypatch):
    import chargpt.serve.server as server

    seen = []
    monkeypatch.setattr(server, "serve", lambda run, settings: seen.append(settings) or 0)
    monkeypatch.setenv("CHARGPT_API_KEY", "from-env")
    assert main(["serve", "--run", str(run_dir), "--allowed-host", "*.lan"]) == 0
    assert seen[0].api_key == "from-env" and seen[0].allowed_host == ("*.lan",)
    with pytest.raises(ChargptError, match="allowed_host"):
        ServeConfig(allowed_host=("chargpt.*",)).validate()
