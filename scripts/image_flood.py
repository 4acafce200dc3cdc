"""One tenant floods a replica with new 4096x4096 reference images while another tenant streams: how much does
the streaming tenant's video stutter? (issue 13: "one tenant stalls everyone").

Starts `avatarforcing serve` (the shipped tiny model, CPU) with two tenants, opens one REALTIME session for
tenant "bob" and records the arrival gap between its frames, first quietly (baseline), then while tenant
"alice", from a process of her own, sends RegisterAvatar with a new 4096x4096 JPEG as fast as the server's
per-tenant image rate lets her (after each RESOURCE_EXHAUSTED she waits what its retry-after-ms says).
Prints the gap percentiles of both phases and how many images were accepted and refused.

    .venv/bin/python scripts/image_flood.py [--seconds 30] [--image-rate 1]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from avatarforcing_client import AvatarForcingClient, pb
from avatarforcing_tools.common import free_port

ROOT = Path(__file__).resolve().parents[1]
ALICE, BOB = "alice-flood-token-0123456789abcdef", "bob-stream-token-0123456789abcdef"


def big_jpeg(i: int, side: int = 4096) -> bytes:
    """A photo-like 4096x4096 JPEG (smooth gradients and noise), different for each ``i``."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 90 + 20], -1)
    img = np.clip(base + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def pct(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        return {}
    a = np.asarray(gaps) * 1000
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())}


async def flood(target: str, seconds: float, images: list[bytes]) -> dict[str, int]:
    """Tenant alice: new images as fast as the server's rate lets her (after each refusal, its retry-after-ms)."""
    accepted = refused = 0
    t_end = time.monotonic() + seconds
    async with AvatarForcingClient(target, token=ALICE) as alice:
        i = 0
        while time.monotonic() < t_end and i < len(images):
            try:
                await alice.register_avatar(images[i], timeout=30)
                accepted += 1
                i += 1
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused += 1
                md = dict(e.trailing_metadata() or ())
                await asyncio.sleep(int(str(md.get("retry-after-ms", "200"))) / 1000)
    return {"images_accepted": accepted, "images_refused_rate_limited": refused}


def alice_process(target: str, seconds: float, n: int) -> None:
    """Runs in its own process (its 6 MB requests are serialized on its own event loop, not the measuring one):
    makes the images, says "ready", waits for a line on stdin, floods, prints the counts as JSON."""
    images = [big_jpeg(i) for i in range(n)]
    print(f"ready {np.mean([len(x) for x in images]) / 1e6:.1f}", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(flood(target, seconds, images))), flush=True)


async def measure(target: str, seconds: float, n: int) -> dict[str, object]:
    gaps: dict[str, list[float]] = {"baseline": [], "flood": []}
    phase = "warmup"
    alice = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--alice", target, "--seconds", str(seconds), "--images", str(n),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    assert alice.stdin is not None and alice.stdout is not None
    ready = (await alice.stdout.readline()).decode().split()
    print(f"alice made {n} distinct 4096x4096 JPEGs, {ready[1]} MB each", flush=True)
    async with AvatarForcingClient(target, token=BOB) as bob:
        async with bob.session(image=small_png(), pacing=pb.PACING_REALTIME) as s:
            async def watch() -> None:
                last = None
                async for ev in s.events():
                    if isinstance(ev, pb.VideoFrame):
                        now = time.monotonic()
                        if last is not None and phase in gaps:
                            gaps[phase].append(now - last)
                        last = now

            watcher = asyncio.create_task(watch())  # a listening avatar: the SDK sends the keepalives
            await asyncio.sleep(3.0)  # the stream settles
            phase = "baseline"
            await asyncio.sleep(seconds)
            phase = "flood"
            alice.stdin.write(b"go\n")
            await alice.stdin.drain()
            counts = json.loads(await alice.stdout.readline())
            phase = "done"
            watcher.cancel()
    await alice.wait()
    return {"baseline": pct(gaps["baseline"]), "flood": pct(gaps["flood"]), **counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default 30)")
    ap.add_argument("--image-rate", type=float, default=1.0, help="the server's per-tenant image rate (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    ap.add_argument("--alice", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.alice:
        alice_process(a.alice, a.seconds, a.images)
        return 0
    n = int(a.seconds * a.image_rate) + 8
    port = free_port()
    env = dict(os.environ, AVATARFORCING_AUTH_TOKENS=f"alice:{ALICE},bob:{BOB}",
               AVATARFORCING_IMAGE_RATE_PER_S=str(a.image_rate), AVATARFORCING_MAX_IMAGE_BYTES=str(32 << 20))
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "server.log"
        proc = subprocess.Popen([sys.executable, "-m", "avatarforcing_tools.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--metrics-port", "-1", "--device", "cpu"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        try:
            t_end = time.monotonic() + 120
            while time.monotonic() < t_end:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.2)
            time.sleep(1.0)
            res = asyncio.run(measure(f"127.0.0.1:{port}", a.seconds, n))
        finally:
            proc.terminate()
            proc.wait(20)
    res.update(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
               image_rate_per_s=a.image_rate, seconds=a.seconds)
    print(json.dumps(res, indent=2))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
