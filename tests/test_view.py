"""`avatarforcing view`: the live page and its WebSocket bridge, against a real server.

The bridge is spoken to directly (aiohttp's WebSocket client), and the page is played in a real
headless Chromium: Debian's `chromium` (scripts/bootstrap.sh installs it), driven by playwright through
its executable path (never `playwright install`). Two pages run two sessions at once: one uploads a face
and a WAV through the page's file inputs, the other speaks into the microphone (Chromium's fake capture
device, fed with the bundled speech). In both, Media Source Extensions must decode and play the fMP4
stream and WebAudio must play the returned speech.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from avatarforcing_client import AvatarForcingClient, pb, read_wav
from avatarforcing_service.codecs import make_encoder
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.server import App
from avatarforcing_tools.view import KIND_AUDIO, KIND_FRAME, KIND_INIT, ViewServer, avc_codec, pack

from .conftest import png_bytes, speechlike_pcm

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "avatarforcing" / "assets"
CHROMIUM = shutil.which("chromium")
AppFactory = Callable[..., "asyncio.Future[App]"]


@pytest_asyncio.fixture
async def view_of() -> AsyncIterator[Callable[[App], Any]]:
    """Starts a ViewServer on a free loopback port in front of an App; stops it after the test."""
    views: list[ViewServer] = []

    async def factory(app: App) -> ViewServer:
        v = ViewServer(f"127.0.0.1:{app.port}")
        await v.start("127.0.0.1", 0)
        views.append(v)
        return v

    yield factory
    for v in views:
        await v.stop()


@pytest_asyncio.fixture
async def shipped_app() -> AsyncIterator[App]:
    """A real server with the shipped trained model (as `avatarforcing serve` runs it): its frames show a face."""
    app = App(ServerConfig(port=0, metrics_port=-1, max_sessions=4, grace_s=0.5))
    await app.start()
    yield app
    await app.stop(grace=0.2)


def face_similarity(shot: bytes, reference: Path) -> float:
    """Correlation of a screenshot of the video element (object-fit: contain, square) with the reference face."""
    ref = Image.open(reference).convert("L")
    img = Image.open(io.BytesIO(shot)).convert("L").resize(ref.size, Image.Resampling.BILINEAR)
    a, b = np.asarray(img, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def unpack(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    kind, n = struct.unpack_from(">BI", data)
    return kind, json.loads(data[5 : 5 + n]), data[5 + n :]


def test_codec_string_from_the_servers_init_segment() -> None:
    # x264's ultrafast preset: Constrained Baseline (0x42, constraint flags 0xC0); the level follows the size.
    small = make_encoder(pb.VIDEO_ENCODING_FMP4, 128, 128, 25.0)
    big = make_encoder(pb.VIDEO_ENCODING_FMP4, 832, 480, 25.0)
    assert avc_codec(small.init_segment) == "avc1.42C00B"
    assert avc_codec(big.init_segment) == "avc1.42C01E"
    with pytest.raises(ValueError, match="moov"):
        avc_codec(b"\x00\x00\x00\x08free")
    kind, header, payload = unpack(pack(KIND_FRAME, {"i": 7}, b"xyz"))
    assert (kind, header, payload) == (KIND_FRAME, {"i": 7}, b"xyz")


async def test_bridge_streams_a_session(make_app: AppFactory, view_of: Any, png: bytes) -> None:
    """One WebSocket = one session: init segment, fMP4 frames, the speech back, stats; closing ends it."""
    app = await make_app()
    view = await view_of(app)
    rate = 16000
    pcm = speechlike_pcm(1.0, rate)
    async with aiohttp.ClientSession() as http:
        async with http.get(view.url + "api/info") as r:
            info = await r.json()
        assert info["width"] == 128 and 16000 in info["supported_sample_rates_hz"]
        assert "speech_16k.wav" in info["assets"] and "reference_face.png" in info["assets"]
        async with http.get(view.url) as r:
            assert r.status == 200 and "static/view.js" in await r.text()
        async with http.get(view.url + "static/view.js") as r:
            assert r.status == 200 and "MediaSource" in await r.text()
        for bad in ("static/../view.py", "assets/..%2Fengine.py", "static/nope.js", "assets/nope.wav"):
            async with http.get(view.url + bad) as r:
                assert r.status == 404, bad

        async with http.ws_connect(view.url + "ws") as ws:
            await ws.send_json({"type": "start", "sample_rate": rate, "image": base64.b64encode(png).decode(),
                                "seed": 3})
            started = await ws.receive_json(timeout=30)
            assert started["type"] == "started", started
            assert started["codec"] == 'video/mp4; codecs="avc1.42C00B"'
            assert started["width"] == 128 and started["audio_sample_rate_hz"] == rate
            assert started["latency_ms"] > 0
            kind, header, init = unpack(await ws.receive_bytes(timeout=10))
            assert kind == KIND_INIT and header == {"first_frame_index": 0} and init[4:8] == b"ftyp"
            assert view.sessions_live == 1
            for i in range(0, len(pcm), rate // 25):
                await ws.send_bytes(pcm[i : i + rate // 25].tobytes())
            await ws.send_json({"type": "end_of_audio"})
            frames: list[dict[str, Any]] = []
            speech = b""
            stats = 0
            while len(speech) < pcm.nbytes or not stats:  # every sample sent came back, and a Stats (1 per s)
                msg = await ws.receive(timeout=30)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    body = json.loads(msg.data)
                    assert body["type"] == "stats", body
                    stats += 1
                    continue
                kind, header, payload = unpack(msg.data)
                if kind == KIND_FRAME:
                    assert payload[4:8] == b"moof"
                    frames.append(header)
                else:
                    assert kind == KIND_AUDIO
                    speech += payload[2 * header["o"] : 2 * (header["o"] + header["n"])]
            assert speech == pcm.tobytes()  # the page gets the client's own samples back, bit for bit
            assert [f["i"] for f in frames] == list(range(len(frames)))
            assert frames[0]["k"]
        assert stats >= 1
        # The page went away: its session ends on the server.
        async with AvatarForcingClient(f"127.0.0.1:{app.port}") as c:
            for _ in range(100):
                if (await c.server_info()).active_sessions == 0:
                    break
                await asyncio.sleep(0.1)
            assert (await c.server_info()).active_sessions == 0
        assert view.sessions_started == 1 and view.sessions_live == 0


async def test_bridge_reports_bad_requests_and_server_errors(make_app: AppFactory, view_of: Any) -> None:
    app = await make_app()
    view = await view_of(app)
    async with aiohttp.ClientSession() as http:
        cases = [
            ({"type": "start", "sample_rate": 16000}, "INVALID_ARGUMENT", "exactly one of image"),
            ({"type": "start", "image": "***"}, "INVALID_ARGUMENT", "base64"),
            ({"type": "hello"}, "INVALID_ARGUMENT", '"type": "start"'),
            ({"type": "start", "avatar_id": "nobody"}, "NOT_FOUND", "nobody"),
            ({"type": "start", "sample_rate": 7000, "image": base64.b64encode(png_bytes()).decode()},
             "INVALID_ARGUMENT", "7000"),
        ]
        for start, code, text in cases:
            async with http.ws_connect(view.url + "ws") as ws:
                await ws.send_json(start)
                err = await ws.receive_json(timeout=30)
                assert err["type"] == "error" and err["code"] == code and text in err["message"], (start, err)
                assert (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert view.sessions_live == 0


def test_cli_view_help() -> None:
    out = subprocess.run([sys.executable, "-m", "avatarforcing_tools.cli", "view", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--target" in out.stdout and "--port" in out.stdout


PAGE_STATE = """() => {
  const v = document.getElementById('video'), s = window.avatarView, q = v.getVideoPlaybackQuality();
  return {state: s.state, error: s.error, time: v.currentTime, width: v.videoWidth, height: v.videoHeight,
          decoded: q.totalVideoFrames, received: s.framesReceived, session: s.started && s.started.session_id,
          latency: s.started && s.started.latency_ms, sent: s.sentSeconds, source: s.source, rate: s.sampleRate,
          speech: s.speechSecondsScheduled, audio: s.audioSecondsScheduled, stats: s.serverStats,
          paused: v.paused, table: document.getElementById('stats').innerText, s2s: s.speechToScreenMeanMs,
          s2sCount: s.speechToScreenCount, s2p: s.speechToPageMeanMs,
          buffered: v.buffered.length ? v.buffered.end(v.buffered.length - 1) - v.currentTime : 0,
          lateBlocks: s.audioBlocksLate, catchUps: s.catchUps, gaps: s.frameGaps, jitter: s.avOffsetMs};
}"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/bootstrap.sh installs it "
                                             "as root): the live page is tested in a real browser only")
@pytest.mark.timeout(180)
async def test_two_pages_play_two_live_sessions_in_chromium(shipped_app: App, view_of: Any, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    app = shipped_app
    view = await view_of(app)
    reference = ASSETS / "reference_face.png"
    face = tmp_path / "face.jpg"  # the upload: the bundled face as a JPEG
    Image.open(reference).save(face, quality=95)
    wav = ASSETS / "speech_16k.wav"
    wav_seconds = len(read_wav(wav)[0]) / 16000
    async with AvatarForcingClient(f"127.0.0.1:{app.port}") as client, async_playwright() as p:
        stream = (await client.server_info()).stream
        size = (stream.width, stream.height)
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream",  # grant the microphone
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",  # the microphone says the bundled speech
        ])
        try:
            # Page 1: a person uploads a face and a WAV, and presses Start.
            one = await browser.new_page()
            one.on("pageerror", lambda e: print("page 1 error:", e))
            await one.goto(view.url)
            await one.check("input[name=face][value=upload]")
            await one.set_input_files("#face-file", str(face))
            await one.check("input[name=speech][value=wav]")
            await one.set_input_files("#wav-file", str(wav))
            await one.click("#start")
            # Page 2: the bundled face and the microphone, started from the URL.
            two = await browser.new_page()
            two.on("pageerror", lambda e: print("page 2 error:", e))
            await two.goto(view.url + "?speech=mic&autostart=1")

            playing = ("() => { const v = document.getElementById('video'); return window.avatarView.error !== null"
                       " || (v.currentTime > 1.2 && v.getVideoPlaybackQuality().totalVideoFrames > 25"
                       " && window.avatarView.speechSecondsScheduled > 0.5); }")
            await one.wait_for_function(playing, timeout=60_000, polling=100)
            await two.wait_for_function(playing, timeout=60_000, polling=100)
            s1, s2 = await one.evaluate(PAGE_STATE), await two.evaluate(PAGE_STATE)
            # Both live at once: two sessions on the server.
            info = await client.server_info()
            assert info.active_sessions == 2 and view.sessions_live == 2
            shot1 = await one.locator("#video").screenshot()
            shot2 = await two.locator("#video").screenshot()
            # The video goes on advancing (the session idles on after the WAV, as REALTIME sessions do).
            await one.wait_for_function(f"() => document.getElementById('video').currentTime > {s1['time'] + 0.5}",
                                        timeout=30_000, polling=100)
        finally:
            await browser.close()

    for s in (s1, s2):
        assert s["error"] is None and s["state"] == "live", s
        assert s["time"] > 1.2 and not s["paused"], s  # the video element plays
        assert s["decoded"] > 25 and s["received"] >= s["decoded"] - 1, s  # Chromium decoded the fMP4 frames
        assert (s["width"], s["height"]) == size, s
        assert s["speech"] > 0.5, s  # the session's speech came back and was scheduled in WebAudio
        assert s["latency"] > 0 and "latency (server)" in s["table"] and "buffered" in s["table"], s
        assert s["s2sCount"] > 0 and s["s2s"] > 0, s  # frames showing the speech sent were displayed
        print(f"page {s['source']}: speech to screen {s['s2s']:.0f} ms over {s['s2sCount']} frames, to page "
              f"{s['s2p']:.0f} ms "
              f"(server latency {s['latency']:.0f} ms), "
              f"buffered {s['buffered']:.2f} s, decoded {s['decoded']} of {s['received']} frames, "
              f"{s['lateBlocks']} late audio blocks, {s['catchUps']} catch-ups, {s['gaps']} missing frames")
    assert s1["source"] == wav.name and s1["session"] != s2["session"]
    assert s1["rate"] == 16000 and s1["sent"] <= wav_seconds + 0.05
    assert s2["source"] == "microphone" and s2["rate"] in info.supported_sample_rates_hz and s2["sent"] > 1.0
    for shot in (shot1, shot2):  # the face, not a blank element
        px = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float64)
        similarity = face_similarity(shot, reference)
        print(f"screenshot: pixel variance {px.var():.0f}, correlation with the reference face {similarity:.3f}")
        assert px.var() > 200.0, px.var()
        assert similarity > 0.6, similarity
