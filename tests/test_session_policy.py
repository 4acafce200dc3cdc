"""The slow-client policy of a session's output queue (unit level)."""

from __future__ import annotations

import numpy as np
import pytest

from avatarforcing_client import pb
from avatarforcing_service.audio_in import AudioInput
from avatarforcing_service.codecs import make_encoder
from avatarforcing_service.session import OutItem, Session, Timeline
from avatarforcing_service.spec import check_config


def session(enc: int, pacing: int = pb.PACING_REALTIME, queue_frames: int = 8) -> Session:
    spec = check_config(pb.SessionConfig(video_encoding=enc, pacing=pacing, avatar_id="a"), model_rate=16000, fps=25.0)
    return Session(id="s", spec=spec, slot=0,
                   audio=AudioInput(16000, 16000, 4, 25.0, 1000, 60), encoder=make_encoder(enc, 64, 64, 25.0),
                   timeline=Timeline(25.0, 4, 4, 0.24), queue_frames=queue_frames, max_blocks_ahead=2)


def fill(s: Session, blocks: int) -> None:
    for j in range(blocks):
        s.out.put(OutItem(pb.StreamResponse(audio=pb.AudioOut(block_index=j)), block=j))
        for i in range(4):
            s.out.put(OutItem(pb.StreamResponse(frame=pb.VideoFrame(index=4 * j + i)), frames=1, block=j))


def test_intra_only_drops_oldest_blocks() -> None:
    s = session(pb.VIDEO_ENCODING_JPEG)
    fill(s, 2)
    assert s.make_room(4) == 4 and s.out.frames == 4 and s.frames_dropped == 4
    nxt = s.out.peek()
    assert nxt is not None and nxt.block == 1  # the oldest block (frames and audio) went


async def test_inter_coded_drops_everything_queued_and_forces_a_keyframe() -> None:
    s = session(pb.VIDEO_ENCODING_H264)
    s.encoder.encode(np.zeros((3, 64, 64, 3), np.uint8))
    fill(s, 2)
    s.end(pb.END_REASON_END_OF_AUDIO)  # an End message is never dropped
    assert s.make_room(4) == 8 and s.out.frames == 0
    assert [e.keyframe for e in s.encoder.encode(np.zeros((2, 64, 64, 3), np.uint8))] == [True, False]
    assert (await s.out.get()).end
    s.encoder.close()


@pytest.mark.parametrize("enc", [pb.VIDEO_ENCODING_JPEG, pb.VIDEO_ENCODING_H264])
async def test_asap_never_drops_and_applies_backpressure(enc: int) -> None:
    s = session(enc, pacing=pb.PACING_ASAP)
    fill(s, 2)
    assert s.make_room(4) == 0 and s.out.frames == 8
    s.audio.push(np.zeros(2560, np.int16).tobytes(), 0.0)
    assert not s.ready(now=1e9, horizon=0.0)  # the queue is full: not stepped
    while s.out.peek() is not None:  # the client reads the queue down
        await s.out.get()
    assert s.ready(now=1e9, horizon=0.0)
