"""CPU per GiB of reading one object from the bench SeaweedFS, by three readers, with and
without SHA-256 (issue 9: the screening's one read of the object):

- ``botocore``: ``StreamingBody.readinto`` (urllib3's: a new bytes object per chunk,
  copied into the buffer);
- ``store``: what ``S3MediaStore.read_whole`` does (``_readable``: the http.client
  response beneath urllib3 reads straight into the buffer);
- ``socket``: a presigned GET on a bare socket, ``recv_into`` one buffer (the floor).

Each figure is the best of ``--repeat`` reads, after one unmeasured read.

    .venv/bin/python bench/read_path.py --size-mib 256
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _shared import S3_BUCKET, S3Server, s3_env

MiB = 1024 * 1024
KEY = "read-path-probe"


def client() -> Any:
    import boto3
    from botocore.config import Config

    env = s3_env()
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


def through_botocore(s3: Any, buffer: bytearray, sink: Callable[[memoryview], Any]) -> int:
    body = s3.get_object(Bucket=S3_BUCKET, Key=KEY)["Body"]
    view, total = memoryview(buffer), 0
    while n := body.readinto(buffer):
        sink(view[:n])
        total += n
    body.close()
    return total


def through_store(s3: Any, buffer: bytearray, sink: Callable[[memoryview], Any]) -> int:
    from msc3870.stores.s3 import _readable

    body = s3.get_object(Bucket=S3_BUCKET, Key=KEY)["Body"]
    fill, view, total = _readable(body).readinto, memoryview(buffer), 0
    while n := fill(buffer):
        sink(view[:n])
        total += n
    body.close()
    return total


def through_socket(s3: Any, buffer: bytearray, sink: Callable[[memoryview], Any]) -> int:
    url = urlsplit(
        s3.generate_presigned_url("get_object", Params={"Bucket": S3_BUCKET, "Key": KEY})
    )
    view, total = memoryview(buffer), 0
    with socket.create_connection((url.hostname, url.port)) as sock:
        request = f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n"
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        head, _, first = head.partition(b"\r\n\r\n")
        length = int(
            next(
                v
                for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                if k.lower() == b"content-length"
            )
        )
        sink(memoryview(first))
        total = len(first)
        while total < length and (n := sock.recv_into(buffer)):
            sink(view[:n])
            total += n
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--buffer-kib", type=int, default=1024)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mediarepo.settings")
    import django

    django.setup()
    size = args.size_mib * MiB
    server = S3Server(manage=True)
    try:
        server.start()
        s3 = client()
        from boto3.s3.transfer import TransferConfig

        s3.upload_fileobj(
            io.BytesIO(os.urandom(size)),
            S3_BUCKET,
            KEY,
            Config=TransferConfig(multipart_threshold=size + 1),
        )
        buffer = bytearray(args.buffer_kib * 1024)
        best_of = f"best of {args.repeat}"
        print(f"{args.size_mib} MiB, {args.buffer_kib} KiB buffer: CPU-s per GiB ({best_of})")
        for hashing in (False, True):
            figures = []
            for name, reader in (
                ("botocore", through_botocore),
                ("store", through_store),
                ("socket", through_socket),
            ):
                best = float("inf")
                for attempt in range(args.repeat + 1):
                    sink = hashlib.sha256().update if hashing else (lambda _: None)
                    started = time.process_time()
                    assert reader(s3, buffer, sink) == size, name
                    if attempt:
                        best = min(best, time.process_time() - started)
                figures.append(f"{name} {best / (size / (1024 * MiB)):.3f}")
            print(("with SHA-256:    " if hashing else "read only:       ") + ", ".join(figures))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
