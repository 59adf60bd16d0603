"""Probe: how fast the bench S3 server (SeaweedFS) deletes with DeleteObjects, and its
CPU, by requests in flight: 8 requests of 1,000 keys each, at 1, 4 and 16 at once, then
8,000 keys that were never written, 4 at once.

    MEDIAREPO_BENCH_SLOT=1 .venv/bin/python bench/s3_delete_probe.py
"""

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boto3
from _shared import S3Server, s3_env
from botocore.config import Config

s3 = S3Server(manage=True, wait_for_ports=60)
s3.start()
try:
    env = s3_env()
    c = boto3.client(
        "s3",
        endpoint_url=env["AWS_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(max_pool_connections=64, s3={"addressing_style": "path"}),
    )
    b = env["AWS_STORAGE_BUCKET_NAME"]
    pid = s3.pid()

    def weed_cpu() -> float:
        """CPU seconds of the S3 server and its children."""
        total = 0.0
        for p in [pid] + [int(x) for x in os.popen(f"pgrep -P {pid}").read().split()]:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    for conc, existing in ((1, True), (4, True), (16, True), (4, False)):
        keys = [f"incoming/p{conc}{existing}{i:05d}" for i in range(8000)]
        if existing:
            with ThreadPoolExecutor(32) as pool:
                list(pool.map(lambda k: c.put_object(Bucket=b, Key=k, Body=b"bench"), keys))
        batches = [keys[i : i + 1000] for i in range(0, len(keys), 1000)]
        cpu0, t0 = weed_cpu(), time.monotonic()
        with ThreadPoolExecutor(conc) as pool:
            list(
                pool.map(
                    lambda ks: c.delete_objects(
                        Bucket=b, Delete={"Objects": [{"Key": k} for k in ks], "Quiet": True}
                    ),
                    batches,
                )
            )
        wall, cpu = time.monotonic() - t0, weed_cpu() - cpu0
        print(
            f"concurrency {conc:2d}, keys exist {existing}: 8 x 1000-key DeleteObjects "
            f"in {wall:6.1f} s, SeaweedFS CPU {cpu:5.1f} s, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
finally:
    s3.stop()
