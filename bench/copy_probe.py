"""Diagnostic: where the time between an upload-to-URL's PUT and its first download goes,
in the store alone: what the bench S3 server (SeaweedFS) takes for each way of moving an
object out of the upload URL's reach, beside the PUT that wrote it.

For each size, on a fresh store (SeaweedFS reclaims deleted space only by
vacuum), PUT ``size`` random MiB to ``incoming/x`` once, then time each of these in turn,
``--repeat`` times (medians):

* ``copy``: CopyObject (MetadataDirective REPLACE, ``CopySourceIfMatch``), as
  ``S3MediaStore._copy_object`` sends it without ``S3_COPY_CHECKSUM``;
* ``copy+sha256``: the same with ``ChecksumAlgorithm=SHA256`` (the default), and whether
  the answer carries the object's SHA-256;
* ``parts PxC``: UploadPartCopy in parts of P MiB, C at once (``_copy_in_parts``);
* ``read``: one whole GET, streamed (what a check reading every byte costs);
* ``ranged``: a ranged GET of the first 8 KiB with ``IfMatch`` (what the sniff costs).

``--versioning`` asks instead whether the store could serve the checked version without a
copy: in a bucket with versioning on, a second PUT to the same presigned URL, then a GET
and a presigned GET of the first PUT's ``VersionId``.

    .venv/bin/python bench/copy_probe.py --sizes 32,256 --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boto3
from _shared import S3_BUCKET, S3_PORT, S3Server, load_average, markdown_table, s3_env
from botocore.config import Config

MiB = 1024 * 1024


def client() -> Any:
    env = s3_env()
    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{S3_PORT}",
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(max_pool_connections=32),
    )


def put(s3: Any, key: str, size: int) -> tuple[float, str]:
    """A single PutObject of random bytes, as a client's PUT to the presigned URL does."""
    body = os.urandom(size)
    started = time.monotonic()
    etag = s3.put_object(Bucket=S3_BUCKET, Key=key, Body=body)["ETag"]
    return time.monotonic() - started, etag


def copy(s3: Any, etag: str, checksum: bool) -> tuple[float, str]:
    extra = {"ChecksumAlgorithm": "SHA256"} if checksum else {}
    started = time.monotonic()
    answer = s3.copy_object(
        Bucket=S3_BUCKET,
        Key="media/x",
        CopySource={"Bucket": S3_BUCKET, "Key": "incoming/x"},
        MetadataDirective="REPLACE",
        ContentType="application/octet-stream",
        CopySourceIfMatch=etag,
        **extra,
    )
    seconds = time.monotonic() - started
    return seconds, "sha256 answered" if answer["CopyObjectResult"].get(
        "ChecksumSHA256"
    ) else "no sha256"


def parts(s3: Any, etag: str, size: int, part_mib: int, concurrency: int) -> tuple[float, str]:
    part = part_mib * MiB
    ranges = [(start, min(start + part, size) - 1) for start in range(0, size, part)]
    started = time.monotonic()
    upload_id = s3.create_multipart_upload(Bucket=S3_BUCKET, Key="media/x")["UploadId"]

    def one(numbered: tuple[int, tuple[int, int]]) -> dict[str, Any]:
        number, (first, last) = numbered
        result = s3.upload_part_copy(
            Bucket=S3_BUCKET,
            Key="media/x",
            UploadId=upload_id,
            PartNumber=number,
            CopySource={"Bucket": S3_BUCKET, "Key": "incoming/x"},
            CopySourceRange=f"bytes={first}-{last}",
            CopySourceIfMatch=etag,
        )
        return {"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]}

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        done = list(pool.map(one, enumerate(ranges, start=1)))
    s3.complete_multipart_upload(
        Bucket=S3_BUCKET, Key="media/x", UploadId=upload_id, MultipartUpload={"Parts": done}
    )
    return time.monotonic() - started, f"{len(ranges)} parts"


def read(s3: Any, etag: str) -> tuple[float, str]:
    started = time.monotonic()
    body = s3.get_object(Bucket=S3_BUCKET, Key="incoming/x", IfMatch=etag)["Body"]
    total = 0
    while chunk := body.read(MiB):
        total += len(chunk)
    return time.monotonic() - started, f"{total // MiB} MiB"


def ranged(s3: Any, etag: str) -> tuple[float, str]:
    started = time.monotonic()
    s3.get_object(Bucket=S3_BUCKET, Key="incoming/x", Range="bytes=0-8191", IfMatch=etag)[
        "Body"
    ].read()
    return time.monotonic() - started, ""


def versioning() -> None:
    import requests

    s3 = client()
    bucket = "probe-versioned"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    print("versioning:", s3.get_bucket_versioning(Bucket=bucket).get("Status"))
    signing = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{S3_PORT}",
        region_name="us-east-1",
        aws_access_key_id=s3_env()["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_env()["AWS_SECRET_ACCESS_KEY"],
        config=Config(signature_version="s3v4"),
    )
    params = {"Bucket": bucket, "Key": "incoming/x"}
    url = signing.generate_presigned_url("put_object", Params=params, HttpMethod="PUT")
    first = requests.put(url, data=b"checked bytes", timeout=10)
    second = requests.put(url, data=b"<html>swapped</html>", timeout=10)
    checked = first.headers.get("x-amz-version-id")
    print("PUT answers:", first.status_code, checked, second.status_code,
          second.headers.get("x-amz-version-id"))  # fmt: skip
    pinned = s3.get_object(**params, VersionId=checked)["Body"].read()
    latest = s3.get_object(**params)["Body"].read()
    signed = signing.generate_presigned_url("get_object", Params={**params, "VersionId": checked})
    print("GET VersionId:", pinned, "latest:", latest)
    print("presigned GET VersionId:", requests.get(signed, timeout=10).content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,256")
    parser.add_argument("--parts", default="32x8,16x16", help="part MiB x concurrency")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeat", type=int, default=3, help="each case this many times")
    parser.add_argument("--versioning", action="store_true")
    args = parser.parse_args()
    s3_server = S3Server(manage=True, wait_for_ports=60)
    if args.versioning:
        s3_server.start()
        try:
            versioning()
        finally:
            s3_server.stop()
        return
    cases: list[tuple[str, Any]] = [
        ("copy", lambda s3, etag, size: copy(s3, etag, False)),
        ("copy+sha256", lambda s3, etag, size: copy(s3, etag, True)),
        ("read", lambda s3, etag, size: read(s3, etag)),
        ("ranged 8 KiB", lambda s3, etag, size: ranged(s3, etag)),
    ]
    for spec in args.parts.split(","):
        part_mib, concurrency = (int(v) for v in spec.split("x"))
        cases.append(
            (
                f"parts {part_mib} MiB x {concurrency}",
                lambda s3, etag, size, p=part_mib, c=concurrency: parts(s3, etag, size, p, c),
            )
        )
    raw: list[dict[str, Any]] = []
    rows = []
    try:
        for size_mib in (int(s) for s in args.sizes.split(",")):
            # One object per size, the cases taken in turn: each repeat sees every case
            # under the same load (the machine may be shared).
            s3_server.start()
            s3 = client()
            put_s, etag = put(s3, "incoming/x", size_mib * MiB)
            seconds: dict[str, list[float]] = {name: [] for name, _ in cases}
            notes: dict[str, str] = {}
            for _ in range(args.repeat):
                for name, case in cases:
                    took, notes[name] = case(s3, etag, size_mib * MiB)
                    seconds[name].append(took)
                    s3.delete_object(Bucket=S3_BUCKET, Key="media/x")
                    print(size_mib, name, f"{took:.3f}", file=sys.stderr, flush=True)
            for name, _ in cases:
                raw.append({"size_mib": size_mib, "case": name, "put_s": put_s, "s": seconds[name]})
                middle = median(seconds[name])
                rows.append(
                    [
                        f"{size_mib} MiB",
                        name,
                        f"{put_s:.2f}",
                        f"{middle:.3f}",
                        f"{min(seconds[name]):.3f} to {max(seconds[name]):.3f}",
                        f"{middle / put_s:.2f}",
                        notes[name],
                    ]
                )
    finally:
        s3_server.stop()
    print(f"load average at the end: {load_average()}")
    headers = ["size", "case", "PUT s", "median s", "range s", "median / PUT", "note"]
    print(markdown_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps({"load_average_end": load_average(), "runs": raw}))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    main()
