"""Locust load test speaking the service's own streaming protocol.

Each simulated user opens one session (PACING_REALTIME, H.264), streams the bundled speech in real
time (looped) for as long as the user lives, and reports, as locust request events:

- ``time_to_first_frame``: session start to the first video frame;
- ``frame_latency``: a frame's audio sent to the frame received (the server's timeline starts with
  the client's first sample, which holds when audio streams from the session's start in real time);
- ``inter_frame_gap``: time between consecutive frames (real time at 25 fps: 40 ms);
- ``dropped_frames``: a failure event for every gap in the frame indices (the server dropped frames
  for a slow client); a clean run has none;
- ``session``: a failure when a session is refused or breaks.

Run headless:  locust -f loadtest/locustfile.py --headless -u 4 -r 1 -t 60s --host 127.0.0.1:50051 \
                  --csv out/load --html out/load.html
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, events, task
from locust.exception import StopUser

from avatarforcing_client import pb, pb_grpc, read_wav

grpc_gevent.init_gevent()

import gevent  # noqa: E402  (after grpc's gevent hook)

ASSETS = Path(__file__).resolve().parent.parent / "avatarforcing" / "assets"
CHUNK_MS = 20


@events.init_command_line_parser.add_listener
def _args(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--session-seconds", type=float, default=0.0,
                        help="end each session after this long (0: run until the test stops)")
    parser.add_argument("--encoding", default="h264", choices=["raw", "jpeg", "h264", "fmp4"])


class DroppedFrames(Exception):
    pass


class AvatarUser(User):
    """One avatar session per user, audio streamed in real time."""

    host = "127.0.0.1:50051"

    def on_start(self) -> None:
        self.wav, self.rate = read_wav(ASSETS / "speech_16k.wav")
        self.image = (ASSETS / "reference_face.png").read_bytes()
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.AvatarForcingStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type="grpc", name=name, response_time=ms,
                                             response_length=length, exception=exc, context={})

    def _requests(self, started: list[float]) -> Iterator[pb.StreamRequest]:
        enc = {"raw": pb.VIDEO_ENCODING_RAW_RGB24, "jpeg": pb.VIDEO_ENCODING_JPEG, "h264": pb.VIDEO_ENCODING_H264,
               "fmp4": pb.VIDEO_ENCODING_FMP4}[self.environment.parsed_options.encoding]
        yield pb.StreamRequest(config=pb.SessionConfig(
            reference_image=self.image, audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16LE,
                                                                     sample_rate_hz=self.rate, channels=1),
            video_encoding=enc, pacing=pb.PACING_REALTIME, utterance_id="locust"))
        while not started:
            gevent.sleep(0.005)
        n = self.rate * CHUNK_MS // 1000
        pos = int(np.random.default_rng().integers(0, len(self.wav)))
        sent = 0
        t0 = started[0]
        limit = self.environment.parsed_options.session_seconds
        while not limit or sent / self.rate < limit:
            chunk = np.take(self.wav, range(pos, pos + n), mode="wrap")
            pos = (pos + n) % len(self.wav)
            delay = t0 + sent / self.rate - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            yield pb.StreamRequest(audio=pb.AudioChunk(data=chunk.tobytes()))
            sent += n
        yield pb.StreamRequest(end_of_audio=pb.EndOfAudio())

    @task
    def session(self) -> None:
        started: list[float] = []
        t_open = time.monotonic()
        last_arrival = None
        last_index = -1
        try:
            for resp in self.stub.Stream(self._requests(started)):
                kind = resp.WhichOneof("message")
                now = time.monotonic()
                if kind == "started":
                    started.append(now)
                elif kind == "frame":
                    f = resp.frame
                    if last_index < 0:
                        self._fire("time_to_first_frame", (now - t_open) * 1000, len(f.data))
                    else:
                        self._fire("inter_frame_gap", (now - last_arrival) * 1000)  # type: ignore[operator]
                        if f.index != last_index + 1:
                            self._fire("dropped_frames", 0.0, 0,
                                       DroppedFrames(f"{f.index - last_index - 1} frames dropped before {f.index}"))
                    audio_sent_at = started[0] + f.audio_end_sample / self.rate
                    self._fire("frame_latency", max(0.0, now - audio_sent_at) * 1000, len(f.data))
                    last_arrival, last_index = now, f.index
                elif kind == "end":
                    break
        except grpc.RpcError as e:
            self._fire("session", (time.monotonic() - t_open) * 1000, 0,
                       RuntimeError(f"{e.code().name}: {e.details()}"))  # type: ignore[attr-defined]
            gevent.sleep(1.0)
            return
        if not self.environment.parsed_options.session_seconds:
            raise StopUser()
