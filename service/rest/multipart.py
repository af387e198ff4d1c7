"""A small, strict multipart/form-data parser for image uploads.

The body is already in memory (read under the size limit), so splitting it on the boundary
with ``bytes.find`` is all that is needed; this is several times cheaper per request than a
general streaming parser, and it bounds the number of parts and the size of part headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import InvalidInput

MAX_HEADER_BYTES = 8 * 1024
MAX_BOUNDARY_LENGTH = 200  # RFC 2046 allows 70; be lenient, but not unbounded


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes

    @property
    def is_file(self) -> bool:
        """A file upload: it has a filename, or declares an image content type."""
        return self.filename is not None or self.content_type.startswith("image/")


def boundary_of(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            value = value.strip().strip('"')
            if not value or len(value) > MAX_BOUNDARY_LENGTH or not value.isascii():
                break
            return value.encode("ascii")
    raise InvalidInput("multipart body without a valid boundary parameter in its Content-Type")


def _disposition(header_value: str) -> tuple[str, str | None]:
    """(name, filename) from a Content-Disposition: form-data header value."""
    name, filename = "", None
    for param in header_value.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        key = key.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key == "name":
            name = value
        elif key == "filename":
            filename = value
    return name, filename


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """Split a multipart/form-data body into parts; malformed bodies raise InvalidInput."""
    delimiter = b"--" + boundary_of(content_type)
    start = body.find(delimiter)
    if start < 0:
        raise InvalidInput("malformed multipart body: boundary not found")
    parts: list[Part] = []
    position = start + len(delimiter)
    separator = b"\r\n" + delimiter
    while True:
        if body.startswith(b"--", position):
            return parts  # the closing delimiter
        if not body.startswith(b"\r\n", position):
            raise InvalidInput("malformed multipart body: bad delimiter line")
        position += 2
        header_end = body.find(b"\r\n\r\n", position, position + MAX_HEADER_BYTES)
        if header_end < 0:
            raise InvalidInput("malformed multipart body: part headers missing or too long")
        end = body.find(separator, header_end + 4)
        if end < 0:
            raise InvalidInput("malformed multipart body: missing closing boundary")
        if len(parts) >= max_parts:
            raise InvalidInput(f"too many parts in the multipart body (at most {max_parts})")
        name, filename, part_type = "", None, "text/plain"
        for line in body[position:header_end].split(b"\r\n"):
            key, _, value = line.decode("utf-8", "replace").partition(":")
            key = key.strip().lower()
            if key == "content-disposition":
                name, filename = _disposition(value)
            elif key == "content-type":
                part_type = value.strip().lower()
        parts.append(Part(name, filename, part_type, body[header_end + 4:end]))
        position = end + len(separator)
