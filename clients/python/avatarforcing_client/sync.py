"""A blocking wrapper around the asyncio client, for plain scripts.

::

    from avatarforcing_client import SyncClient

    with SyncClient("localhost:50051") as c:
        print(c.server_info())
        stats = c.render_wav("speech_16k.wav", image="face.png", out_mp4="out.mp4")

The asyncio client runs in its own event loop on a background (daemon) thread, so this works
whether or not the calling thread has an event loop of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .audio import pcm_chunks, read_wav
from .client import AvatarForcingClient, Event
from .media import RecordingStats, record_session

__all__ = ["SyncClient"]

T = TypeVar("T")


class SyncClient:
    """Blocking client: each method runs the asyncio API on a private event-loop thread.

    Args are those of :class:`~avatarforcing_client.AvatarForcingClient`. Call :meth:`close`
    (or use ``with``) when done.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        placement_timeout: float = 10.0,
        resume_timeout: float = 15.0,
        keepalive_time_s: float | None = 10.0,
        keepalive_timeout_s: float = 5.0,
        stall_timeout: float | None = 1.0,
        attach_timeout: float = 3.0,
        avatar_cache_size: int = 64,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="avatarforcing-client-loop", daemon=True
        )
        self._thread.start()
        # The channel is created lazily inside the loop thread on the first call.
        self._client = AvatarForcingClient(
            target, credentials=credentials, metadata=metadata, options=options, token=token,
            placement_timeout=placement_timeout, resume_timeout=resume_timeout, keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s, stall_timeout=stall_timeout, attach_timeout=attach_timeout,
            avatar_cache_size=avatar_cache_size,
        )
        self._closed = False

    @property
    def aio(self) -> AvatarForcingClient:
        """The wrapped asyncio client (use it only from coroutines passed to :meth:`run`)."""
        return self._client

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the client's loop and wait for its result.

        On timeout (:class:`TimeoutError`) or interruption the coroutine is cancelled.
        """
        if self._closed:
            coro.close()
            raise RuntimeError("SyncClient is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop thread. Idempotent."""
        if self._closed:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    # -- API ---------------------------------------------------------------------------------

    def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        """See :meth:`AvatarForcingClient.server_info`."""
        return self.run(self._client.server_info(timeout=timeout))

    def register_avatar(
        self, image: bytes | str | os.PathLike[str], name: str = "", *, timeout: float | None = None
    ) -> str:
        """See :meth:`AvatarForcingClient.register_avatar`; ``image`` may also be a file path."""
        return self.run(self._client.register_avatar(_image_bytes(image), name, timeout=timeout))

    def render_wav(
        self,
        wav_path: str | os.PathLike[str],
        *,
        image: bytes | str | os.PathLike[str] | None = None,
        avatar_id: str | None = None,
        out_mp4: str | os.PathLike[str],
        video_encoding: int = pb.VIDEO_ENCODING_H264,
        pacing: int = pb.PACING_ASAP,
        seed: int = 0,
        utterance_id: str = "",
        chunk_ms: int = 20,
        timeout: float | None = None,
    ) -> RecordingStats:
        """Animate ``image`` (bytes or a file path) or ``avatar_id`` with a 16-bit PCM WAV file
        (stereo is mixed down) and write the result to ``out_mp4`` (its folder is created).

        The session is opened at the WAV's sample rate. With ``PACING_ASAP`` (default) the audio
        is sent as fast as possible and recording stops at the server's ``End``; with
        ``PACING_REALTIME`` it is sent in real time and recording stops at the first fully
        silent block after all the audio was rendered. ``timeout`` bounds the whole call.
        """
        img = None if image is None else _image_bytes(image)
        return self.run(
            _render_wav(
                self._client,
                wav_path,
                image=img,
                avatar_id=avatar_id,
                out_mp4=out_mp4,
                video_encoding=video_encoding,
                pacing=pacing,
                seed=seed,
                utterance_id=utterance_id,
                chunk_ms=chunk_ms,
            ),
            timeout,
        )


def _image_bytes(image: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


async def _render_wav(
    client: AvatarForcingClient,
    wav_path: str | os.PathLike[str],
    *,
    image: bytes | None,
    avatar_id: str | None,
    out_mp4: str | os.PathLike[str],
    video_encoding: int,
    pacing: int,
    seed: int,
    utterance_id: str,
    chunk_ms: int,
) -> RecordingStats:
    samples, rate = await asyncio.to_thread(read_wav, wav_path)
    total = int(samples.size)
    realtime = pacing == pb.PACING_REALTIME
    session = client.session(
        image=image,
        avatar_id=avatar_id,
        sample_rate=rate,
        video_encoding=video_encoding,
        pacing=pacing,
        seed=seed,
        utterance_id=utterance_id,
    )
    async with session as s:
        all_sent = False

        async def send() -> None:
            nonlocal all_sent
            try:
                await s.stream_pcm(pcm_chunks(samples, rate, chunk_ms), realtime=realtime, end=True)
                all_sent = True
            except BaseException:
                await s.close()  # ends events() so the recorder does not wait forever
                raise

        def stop(ev: Event) -> bool:
            # PACING_REALTIME never ends by itself: stop once idle (silent) blocks follow the
            # end of the audio we sent.
            return (
                realtime
                and all_sent
                and isinstance(ev, pb.AudioOut)
                and ev.silent
                and ev.start_sample >= total
            )

        sender = asyncio.create_task(send())
        try:
            stats = await record_session(s, out_mp4, stop=stop if realtime else None)
        finally:
            if not sender.done():
                sender.cancel()
            try:
                await sender
            except asyncio.CancelledError:
                pass
        return stats
