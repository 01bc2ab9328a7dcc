"""featurestore.io.objects: s3:// URLs, and list/get/put/delete against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from featurestore.config import Settings
from featurestore.errors import InvalidInputError
from featurestore.io import objects
from featurestore.io.objects import (
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    ObjectURL,
)


def test_parse_url() -> None:
    assert objects.parse_url("s3://photos/a/b.jpg") == ObjectURL("photos", "a/b.jpg")
    assert objects.parse_url("s3://photos") == ObjectURL("photos", "")
    assert str(objects.parse_url("s3://photos/dir/")) == "s3://photos/dir/"
    for bad in ("s3://", "s3:///key", "/tmp/x", "S3:/photos/x", "s3://b/\0"):
        with pytest.raises(InvalidInputError, match="s3://BUCKET/PREFIX"):
            objects.parse_url(bad)
    assert objects.is_object_url("s3://b/k") and not objects.is_object_url("./s3:/b")


def test_settings_read_the_standard_aws_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("FS_S3_ENDPOINT", "http://127.0.0.1:9")
    s = Settings()
    assert (s.aws_access_key_id, s.aws_secret_access_key, s.aws_region, s.s3_endpoint) == (
        "key", "secret", "eu-west-3", "http://127.0.0.1:9")
    assert "secret" not in repr(s)


@pytest.mark.s3
def test_put_list_get_range_delete(s3_prefix: str) -> None:
    base = objects.parse_url(s3_prefix)
    keys = ["b/2.bin", "a/1.bin", "a/deep/er/3.bin"]
    for i, key in enumerate(keys):
        objects.write_object(str(base.child(base.key + key)), bytes([i]) * (10 + i))
    listed = objects.list_objects(s3_prefix)
    assert [o.url.key[len(base.key):] for o in listed] == ["a/1.bin", "a/deep/er/3.bin", "b/2.bin"]  # recursive, sorted
    assert [o.size for o in listed] == [11, 12, 10]
    bucket = objects.bucket(base.bucket)
    key = base.key + "a/deep/er/3.bin"
    assert bucket.get(key) == b"\x02" * 12
    assert bucket.get_range(key, 3, 7) == b"\x02" * 4 and bucket.get_range(key, 5, 5) == b""
    assert bucket.size(key) == 12
    objects.write_object(f"s3://{base.bucket}/{key}", b"new")  # a PUT replaces the whole object
    assert objects.read_object(f"s3://{base.bucket}/{key}") == b"new"
    with pytest.raises(ObjectTooLargeError, match="larger than the limit"):
        objects.read_object(f"s3://{base.bucket}/{base.key}a/1.bin", max_bytes=10)
    objects.delete_object(f"s3://{base.bucket}/{key}")
    with pytest.raises(ObjectNotFoundError, match=f"no object at s3://{base.bucket}/{key}"):
        objects.read_object(f"s3://{base.bucket}/{key}")
    assert len(objects.list_objects(s3_prefix)) == 2
    odd = f"{s3_prefix}odd/my photo é+%20#.jpg"  # keys are taken as written, not URL-decoded
    objects.write_object(odd, b"odd")
    assert [str(o.url) for o in objects.list_objects(s3_prefix + "odd/")] == [odd]
    assert objects.read_object(odd) == b"odd"


@pytest.mark.s3
def test_missing_bucket_is_one_line(s3_prefix: str) -> None:
    for call in (lambda: objects.list_objects("s3://no-such-bucket-here/x/"),
                 lambda: objects.read_object("s3://no-such-bucket-here/x.jpg")):
        with pytest.raises(BucketNotFoundError) as info:
            call()
        msg = str(info.value)
        assert "'no-such-bucket-here' does not exist" in msg and "FS_S3_ENDPOINT" in msg and "\n" not in msg


def test_unreachable_endpoint_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FS_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("FS_S3_TIMEOUT", "2")
    with pytest.raises(EndpointUnreachableError) as info:
        objects.list_objects("s3://photos/")
    msg = str(info.value)
    assert f"http://127.0.0.1:{port}" in msg and "set FS_S3_ENDPOINT" in msg and "\n" not in msg


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request as S3 does for an unknown access key (403 InvalidAccessKeyId)."""

    def _refuse(self) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
                b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _refuse

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    # SeaweedFS in the tests accepts any key (no identities configured), so the refusal a real server sends
    # for a wrong key is replayed by a loopback HTTP server.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_wrong_credentials_name_the_variables(refusing_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_S3_ENDPOINT", refusing_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    for call in (lambda: objects.list_objects("s3://photos/"), lambda: objects.read_object("s3://photos/a.jpg"),
                 lambda: objects.write_object("s3://photos/a.jpg", b"x")):
        with pytest.raises(CredentialsError) as info:
            call()
        msg = str(info.value)
        assert "refused access to s3://photos/" in msg and "AWS_ACCESS_KEY_ID" in msg and "\n" not in msg


def test_a_bucket_store_without_postgres_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from featurestore.cli.main import app

    with pytest.raises(InvalidInputError, match=r"FS_STORE=s3://b/p: .*PostgreSQL catalog.*set FS_DATABASE_URL="):
        Settings(store="s3://b/p")
    with pytest.raises(InvalidInputError, match="set FS_DATABASE_URL"):
        Settings(store="s3://b/p", database_url="sqlite:///x.db")
    assert Settings(store="s3://b/p", database_url="postgresql+psycopg2://u@h/db").store_url == "s3://b/p"
    monkeypatch.setenv("FS_STORE", "s3://photos/store")
    for args in (["status"], ["--store", "s3://photos/store", "status"]):
        result = CliRunner().invoke(app, args)
        err = result.stderr.strip()
        assert result.exit_code == 1, result.output
        assert "s3://photos/store" in err and "FS_DATABASE_URL" in err and "Traceback" not in result.output, err
    assert not (Path.cwd() / "s3:").exists()  # no local folder named after the URL


def test_reader_threads_keep_more_gets_in_flight_for_objects() -> None:
    assert objects.reader_threads(2, [Path("/a.jpg"), "/b.jpg"]) == 2
    assert objects.reader_threads(2, ["/a.jpg", "s3://b/c.jpg"]) == 16
    assert objects.reader_threads(16, ["s3://b/c.jpg"]) == 64 and objects.reader_threads(100, ["s3://b/"]) == 100
