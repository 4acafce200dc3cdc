"""`avatarforcing demo`: the bundled speech and face through the service, into an MP4."""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path

from avatarforcing_client import AvatarForcingClient, pb, read_wav, record_session

from .common import assets_dir, server_config

ENCODINGS = {"raw": pb.VIDEO_ENCODING_RAW_RGB24, "jpeg": pb.VIDEO_ENCODING_JPEG, "h264": pb.VIDEO_ENCODING_H264,
             "fmp4": pb.VIDEO_ENCODING_FMP4}



async def run_demo(a: argparse.Namespace) -> int:
    from avatarforcing_service.telemetry import configure_logging

    wav = a.wav or assets_dir() / "speech_16k.wav"
    image = a.image or assets_dir() / "reference_face.png"
    out: Path = a.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the folder for {out}: {e.strerror}", e.filename) from None
    # The inputs are read before a server starts: a missing or unusable file is one line naming it.
    samples, rate = read_wav(wav)  # 16-bit PCM, stereo mixed down; any rate the server takes (8-48 kHz)
    image_bytes = Path(image).read_bytes()
    seconds = samples.shape[0] / rate
    app = None
    if a.connect:
        target = a.connect
    else:
        cfg = server_config(a, port=a.port if a.port is not None else 0,
                             metrics_port=a.metrics_port if a.metrics_port is not None else -1)
        configure_logging(cfg.log_level, cfg.log_format)
        from avatarforcing_service.server import App  # torch: only once the settings are known to be good

        app = App(cfg)
        await app.start()
        target = f"{cfg.host}:{app.port}"
    try:
        pacing = pb.PACING_REALTIME if a.realtime else pb.PACING_ASAP
        async with AvatarForcingClient(target) as client:
            info = await client.server_info()
            print(f"server {target}: model {info.model.name} ({'trained' if info.model.trained else 'RANDOM INIT'}), "
                  f"{info.stream.width}x{info.stream.height} @ {info.stream.fps:g} fps, "
                  f"look-ahead {info.stream.lookahead_ms:.0f} ms")
            t0 = time.monotonic()
            async with client.session(image=image_bytes, sample_rate=rate,
                                      video_encoding=ENCODINGS[a.encoding], pacing=pacing,
                                      utterance_id="demo") as s:
                sender = asyncio.create_task(s.stream_wav(wav, realtime=a.realtime))
                max_frames = None
                if a.realtime:  # the stream idles on after the speech: stop once it has been shown
                    max_frames = math.ceil((seconds + s.started.latency_ms / 1000) * s.fps) + s.started.frames_per_block
                stats = await record_session(s, out, max_frames=max_frames)
                await sender
            dt = time.monotonic() - t0
        print(f"wrote {out}: {stats.frames} frames ({stats.frames / info.stream.fps:.1f} s of video) for "
              f"{seconds:.1f} s of speech in {dt:.1f} s; end: "
              f"{pb.EndReason.Name(stats.end_reason) if stats.end_reason is not None else 'stopped by the client'}")
        view = f"avatarforcing view --target {target}" if a.connect else "avatarforcing serve` and `avatarforcing view"
        print(f"watch it live in a browser: `{view}`, then open http://127.0.0.1:8080/")
        if not info.model.trained:
            print("note: the server runs a randomly initialised model (no trained checkpoint yet): the video "
                  "shows the pipeline working, not a face.")
        return 0
    finally:
        if app is not None:
            await app.stop(grace=0.5)
