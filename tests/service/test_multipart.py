"""The multipart parser: well-formed bodies, and malformed ones refused with a clear 400."""

from __future__ import annotations

import pytest

from service.errors import InvalidInput
from service.rest.multipart import parse_multipart

CT = "multipart/form-data; boundary=XyZ"


def body(*parts: bytes, close: bool = True) -> bytes:
    out = b"".join(b"--XyZ\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--XyZ--\r\n" if close else b"")


def file_part(name="file", filename="a.png", data=b"\x89PNG", content_type="image/png") -> bytes:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode() + data


def test_parses_files_and_fields_in_order():
    parts = parse_multipart(body(file_part(data=b"one"), b'Content-Disposition: form-data; name="top_k"\r\n\r\n3',
                                 file_part(name="files", filename="b.jpg", data=b"two\r\nwith crlf")), CT, 10)
    assert [(p.name, p.filename, p.data, p.is_file) for p in parts] == [
        ("file", "a.png", b"one", True), ("top_k", None, b"3", False), ("files", "b.jpg", b"two\r\nwith crlf", True)]


def test_quoted_boundary_and_preamble_are_accepted():
    data = b"preamble\r\n" + body(file_part())
    assert len(parse_multipart(data, 'multipart/form-data; boundary="XyZ"', 10)) == 1


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=",
                                          "multipart/form-data; boundary=" + "x" * 500])
def test_missing_or_absurd_boundary_is_refused(content_type):
    with pytest.raises(InvalidInput, match="boundary"):
        parse_multipart(body(file_part()), content_type, 10)


def test_unterminated_body_is_refused():
    with pytest.raises(InvalidInput, match="closing boundary"):
        parse_multipart(b"--XyZ\r\n" + file_part(), CT, 10)


def test_body_without_boundary_is_refused():
    with pytest.raises(InvalidInput, match="boundary not found"):
        parse_multipart(b"just some bytes", CT, 10)


def test_huge_part_headers_are_refused():
    with pytest.raises(InvalidInput, match="headers missing or too long"):
        parse_multipart(body(b"X-Junk: " + b"a" * 20_000 + b"\r\n\r\ndata"), CT, 10)


def test_too_many_parts_are_refused():
    with pytest.raises(InvalidInput, match="too many parts"):
        parse_multipart(body(*[file_part()] * 5), CT, 4)
