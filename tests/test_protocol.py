"""The protocol package: the ground floor that the server and the SDKs share."""

from __future__ import annotations

import subprocess
import sys

from avatarforcing_proto import pb, wire


def test_wire_constants_come_from_the_proto_file_options() -> None:
    assert wire.OWNER_ADDRESS_TRAILER == "avatarforcing-owner-address"
    assert wire.RETRY_AFTER_TRAILER == "retry-after-ms"
    assert (wire.MIN_SAMPLE_RATE_HZ, wire.MAX_SAMPLE_RATE_HZ) == (8000, 48000)
    assert wire.COMMON_SAMPLE_RATES_HZ == (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
    # Each is an option of the file the generated code was made from, not a constant written in Python.
    opts = pb.DESCRIPTOR.GetOptions()
    assert opts.Extensions[pb.owner_address_trailer] == wire.OWNER_ADDRESS_TRAILER
    assert list(opts.Extensions[pb.common_sample_rates_hz]) == list(wire.COMMON_SAMPLE_RATES_HZ)


def test_the_server_and_the_sdk_use_the_wire_constants() -> None:
    from avatarforcing_service.audio_in import SUPPORTED_RATES, rate_problem
    from avatarforcing_service.routing import OWNER_ADDRESS_KEY

    assert OWNER_ADDRESS_KEY == wire.OWNER_ADDRESS_TRAILER
    assert SUPPORTED_RATES == wire.COMMON_SAMPLE_RATES_HZ
    assert rate_problem(wire.MIN_SAMPLE_RATE_HZ, 25.0) is None and rate_problem(wire.MAX_SAMPLE_RATE_HZ, 25.0) is None
    assert rate_problem(wire.MIN_SAMPLE_RATE_HZ - 25, 25.0) and rate_problem(wire.MAX_SAMPLE_RATE_HZ + 25, 25.0)
    assert wire.retry_trailers(0.2) == (("retry-after-ms", "201"), ("grpc-retry-pushback-ms", "201"))


def _modules_after(stmt: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys; {stmt}; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_importing_the_protocol_loads_neither_the_sdk_nor_the_model() -> None:
    loaded = _modules_after("import avatarforcing_proto")
    assert not loaded & {"avatarforcing_client", "avatarforcing", "avatarforcing_service", "torch", "numpy"}


def test_the_sdk_loads_no_server_and_no_torch() -> None:
    loaded = _modules_after("import avatarforcing_client")
    assert not loaded & {"avatarforcing", "avatarforcing_service", "avatarforcing_tools", "torch"}
