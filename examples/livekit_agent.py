"""A LiveKit Agents worker whose agent speaks through an AvatarForcing avatar.

Needs ``pip install 'avatarforcing-client[livekit]'``, an AvatarForcing server (``avatarforcing serve``)
and a LiveKit server. Run the worker with the LiveKit CLI's usual commands::

    export LIVEKIT_URL=ws://localhost:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret
    export AVATARFORCING_TARGET=localhost:50051
    python examples/livekit_agent.py start                  # a worker LiveKit dispatches rooms to
    python examples/livekit_agent.py connect --room demo    # or straight into one room

and join the room from any LiveKit frontend (the Agents Playground, ``lk room join``): the avatar
appears (the agent's video track, or the ``avatarforcing-avatar`` participant's) and says the
bundled speech sample.

The three avatar lines are marked below; everything else is an ordinary agent. This one has no
speech-to-text, LLM or text-to-speech, so it runs without any provider's keys: it plays a WAV file
through ``session.say(..., audio=...)``. A real agent builds ``AgentSession(stt=..., llm=...,
tts=..., vad=...)`` and answers with ``session.generate_reply()`` instead; the avatar lines stay.

Environment:
    AVATARFORCING_TARGET        the AvatarForcing server (default localhost:50051)
    AVATARFORCING_TOKEN         its bearer token, if it wants one
    AVATARFORCING_IMAGE         the face, a PNG or JPEG (default: the bundled reference face)
    AVATARFORCING_WAV           what the agent says on joining (default: the bundled speech sample)
    AVATARFORCING_LIVEKIT_MODE  ``in_process`` (default: the agent publishes the avatar) or
                                ``participant`` (the avatar joins as its own participant; it mints
                                its token from LIVEKIT_API_KEY / LIVEKIT_API_SECRET)
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from livekit import rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli

from avatarforcing_client import read_wav
from avatarforcing_client.livekit import AvatarSession  # avatar line 1 of 3

ASSETS = Path(__file__).resolve().parent.parent / "avatarforcing" / "assets"
log = logging.getLogger("livekit_agent")
server = AgentServer()


async def wav_frames(path: str | os.PathLike[str]) -> AsyncIterator[rtc.AudioFrame]:
    """A WAV file as the 20 ms frames a TTS would produce (the agent session resamples them)."""
    samples, rate = read_wav(path)
    step = rate // 50
    for i in range(0, len(samples), step):
        chunk = samples[i : i + step]
        yield rtc.AudioFrame(chunk.tobytes(), rate, 1, len(chunk))


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = AgentSession()  # a real agent: AgentSession(stt=..., llm=..., tts=..., vad=...)
    image = Path(os.environ.get("AVATARFORCING_IMAGE", ASSETS / "reference_face.png")).read_bytes()

    avatar = AvatarSession(target=os.environ.get("AVATARFORCING_TARGET", "localhost:50051"), image=image,  # line 2
                           mode=os.environ.get("AVATARFORCING_LIVEKIT_MODE", "in_process"))  # type: ignore[arg-type]
    await avatar.start(session, room=ctx.room)  # avatar line 3 (before session.start)

    await session.start(agent=Agent(instructions="You are a friendly assistant."), room=ctx.room)
    # Wait until the avatar's video track is up (the avatar publishes once someone subscribes to it).
    await avatar.wait_for_join(timeout=None)
    # A real agent would now greet with `session.generate_reply(instructions="Greet the user.")`.
    handle = session.say("Hello!", audio=wav_frames(os.environ.get("AVATARFORCING_WAV", ASSETS / "speech_16k.wav")))
    await handle.wait_for_playout()
    log.info("greeting played (interrupted: %s)", handle.interrupted)


if __name__ == "__main__":
    cli.run_app(server)
