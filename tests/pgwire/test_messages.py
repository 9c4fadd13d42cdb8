"""The sans-I/O codec: round trips, arbitrary splits, length validation, malformed bodies."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith.errors import ProtocolViolation
from zenith.pgwire.decoder import Decoder
from zenith.pgwire.messages import (
    PROTOCOL_VERSION_3_0,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationResponse,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendType,
    CancelRequest,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    ExtendedQueryMessage,
    FieldDescription,
    Flush,
    FrontendType,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    OtherBackendMessage,
    ParameterStatus,
    PasswordMessage,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SASLResponse,
    Sender,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
    TransactionStatus,
)

from .conftest import header

# -- strategies -----------------------------------------------------------------------

text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
               max_size=40)
blob = st.binary(max_size=300)
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
i16 = st.integers(-(2**15), 2**15 - 1)
field_code = st.characters(min_codepoint=1, max_codepoint=255)

fields = st.lists(st.tuples(field_code, text), max_size=6).map(tuple)

password_like = st.one_of(
    st.builds(PasswordMessage, text),
    st.builds(SASLInitialResponse, text, st.none() | blob),
    st.builds(SASLResponse, blob),
)

frontend_typed = st.one_of(
    st.builds(Query, text),
    st.just(Terminate()),
    st.builds(CopyData, blob),
    st.just(CopyDone()),
    st.builds(CopyFail, text),
    st.just(Sync()),
    st.just(Flush()),
    st.builds(ExtendedQueryMessage, st.sampled_from([
        FrontendType.PARSE, FrontendType.BIND, FrontendType.DESCRIBE, FrontendType.EXECUTE,
        FrontendType.CLOSE, FrontendType.FUNCTION_CALL]), blob),
    password_like,
)

startup = st.one_of(
    st.builds(StartupMessage, st.lists(st.tuples(text.filter(bool), text), max_size=5)
              .map(tuple)),
    st.just(SSLRequest()),
    st.just(GSSENCRequest()),
    st.builds(CancelRequest, i32, i32),
)

backend = st.one_of(
    st.just(AuthenticationOk()),
    st.just(AuthenticationCleartextPassword()),
    st.builds(AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(AuthenticationSASL, st.lists(text.filter(bool), max_size=3).map(tuple)),
    st.builds(AuthenticationSASLContinue, blob),
    st.builds(AuthenticationSASLFinal, blob),
    st.builds(AuthenticationOther, st.sampled_from([2, 6, 7, 8, 9, 99]), blob),
    st.builds(ParameterStatus, text, text),
    st.builds(BackendKeyData, i32, i32),
    st.builds(ReadyForQuery, st.sampled_from(TransactionStatus)),
    st.builds(RowDescription, st.lists(st.builds(
        FieldDescription, text, u32, u32, i16, i16, i32, i16), max_size=4).map(tuple)),
    st.builds(DataRow, st.lists(st.none() | blob, max_size=6).map(tuple)),
    st.builds(CommandComplete, text),
    st.just(EmptyQueryResponse()),
    st.builds(ErrorResponse, fields),
    st.builds(NoticeResponse, fields),
    st.builds(CopyInResponse, st.integers(0, 1), st.lists(st.integers(0, 1), max_size=4)
              .map(tuple)),
    st.builds(CopyOutResponse, st.integers(0, 1), st.lists(i16, max_size=4).map(tuple)),
    st.builds(CopyBothResponse, st.integers(0, 1), st.just(())),
    st.builds(CopyData, blob),
    st.just(CopyDone()),
    st.builds(NegotiateProtocolVersion, i32, st.lists(text, max_size=3).map(tuple)),
    st.builds(OtherBackendMessage, st.sampled_from([
        BackendType.NOTIFICATION_RESPONSE, BackendType.PARSE_COMPLETE, BackendType.NO_DATA]),
        blob),
)


def normalise(message: Message) -> Message:
    """What the decoder yields for a message: 'p' messages stay uninterpreted."""
    if isinstance(message, PasswordMessage | SASLInitialResponse | SASLResponse):
        return AuthenticationResponse(message.encode()[5:])
    return message


def feed_in_pieces(decoder: Decoder, data: bytes, cuts: list[int]) -> list[Message]:
    out: list[Message] = []
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        decoder.feed(data[start:cut])
        out.extend(decoder)
        start = max(start, cut)
    return out


# -- round trips in arbitrary pieces --------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(backend, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_backend_messages_survive_any_split(messages: list[Message], cuts: list[int]) -> None:
    data = b"".join(m.encode() for m in messages)
    assert feed_in_pieces(Decoder(Sender.BACKEND), data, cuts) == messages


@settings(max_examples=300, deadline=None)
@given(st.lists(startup.filter(lambda m: not isinstance(m, StartupMessage)), max_size=2),
       startup.filter(lambda m: isinstance(m, StartupMessage)),
       st.lists(frontend_typed, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_frontend_session_survives_any_split(negotiation: list[Message], start: Message,
                                             typed: list[Message], cuts: list[int]) -> None:
    """Untyped packets, the StartupMessage, then typed messages, all in one byte stream."""
    messages = [*negotiation, start, *typed]
    data = b"".join(m.encode() for m in messages)
    assert feed_in_pieces(Decoder(Sender.FRONTEND), data, cuts) == [
        normalise(m) for m in messages]


@given(password_like)
def test_password_messages_are_interpreted_by_the_receiver(message: Message) -> None:
    decoder = Decoder(Sender.FRONTEND)
    decoder.in_startup = False
    decoder.feed(message.encode())
    received = decoder.next()
    assert isinstance(received, AuthenticationResponse)
    if isinstance(message, PasswordMessage):
        assert received.to_password() == message
    elif isinstance(message, SASLInitialResponse):
        assert received.to_sasl_initial() == message
    else:
        assert received.to_sasl_response() == message


def test_startup_message_wire_format() -> None:
    encoded = StartupMessage.build({"user": "u", "database": "d"}).encode()
    assert encoded == struct.pack("!II", 27, PROTOCOL_VERSION_3_0) + b"user\0u\0database\0d\0\0"
    assert SSLRequest().encode() == bytes.fromhex("0000000804d2162f")
    assert GSSENCRequest().encode() == bytes.fromhex("0000000804d21630")


def test_error_response_fields() -> None:
    error = ErrorResponse.build("28P01", "nope", severity="FATAL", detail="d", hint="h")
    body = b"SFATAL\0VFATAL\0C28P01\0Mnope\0Dd\0Hh\0\0"
    assert error.encode() == b"E" + struct.pack("!I", len(body) + 4) + body
    assert (error.severity, error.code, error.message, error.detail, error.hint) == (
        "FATAL", "28P01", "nope", "d", "h")
    assert ErrorResponse.build("XX000", "a\0b").message == "a\\0b"  # a NUL cannot travel


# -- length validation before buffering -----------------------------------------------


@pytest.mark.parametrize("sender", list(Sender))
def test_huge_claimed_length_is_rejected_at_once(sender: Sender) -> None:
    decoder = Decoder(sender)
    decoder.in_startup = False
    code = b"Q" if sender is Sender.FRONTEND else b"D"
    with pytest.raises(ProtocolViolation, match="too large"):
        decoder.feed(header(code, 2**31))  # nothing of the 2 GiB body was sent


def test_huge_startup_packet_is_rejected_at_once() -> None:
    with pytest.raises(ProtocolViolation, match="invalid length of startup packet"):
        Decoder(Sender.FRONTEND).feed(struct.pack("!I", 2**31 + 12))
    with pytest.raises(ProtocolViolation, match="invalid length of startup packet"):
        Decoder(Sender.FRONTEND).feed(struct.pack("!I", 10_001))


@pytest.mark.parametrize("length", [0, 3, 7])
def test_startup_length_below_minimum(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        Decoder(Sender.FRONTEND).feed(struct.pack("!I", length))


@pytest.mark.parametrize("length", [0, 1, 3])
def test_typed_length_below_four(length: int) -> None:
    decoder = Decoder(Sender.BACKEND)
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        decoder.feed(header(b"Z", length))


def test_configurable_limits() -> None:
    decoder = Decoder(Sender.BACKEND, max_message_size=1024)
    decoder.feed(CopyData(b"x" * 1000).encode())
    assert decoder.next() == CopyData(b"x" * 1000)
    with pytest.raises(ProtocolViolation, match="too large"):
        decoder.feed(header(b"d", 1024))
    small_startup = Decoder(Sender.FRONTEND, max_startup_size=100)
    with pytest.raises(ProtocolViolation):
        small_startup.feed(StartupMessage.build({"user": "u" * 100}).encode())


def test_a_large_legal_claim_is_not_preallocated() -> None:
    decoder = Decoder(Sender.BACKEND)
    decoder.feed(header(b"d", 60 * 1024 * 1024) + b"abc")
    assert decoder.next() is None
    assert decoder.buffered == 8  # only what arrived is held


@pytest.mark.parametrize(("sender", "data", "match"), [
    (Sender.FRONTEND, b"\x01" + struct.pack("!I", 4), "message type"),
    (Sender.FRONTEND, b"R" + struct.pack("!I", 8), "message type"),  # a backend type
    (Sender.BACKEND, b"Q" + struct.pack("!I", 8), "message type"),  # a frontend type
    (Sender.FRONTEND, b"S" + struct.pack("!I", 5) + b"x", "invalid length 5"),
    (Sender.BACKEND, b"Z" + struct.pack("!I", 6) + b"II", "invalid length 6"),
    (Sender.FRONTEND, b"Q" + struct.pack("!I", 7) + b"abc", "unterminated string"),
    (Sender.FRONTEND, b"Q" + struct.pack("!I", 7) + b"a\0b", "trailing bytes"),
    (Sender.FRONTEND, b"Q" + struct.pack("!I", 6) + b"\xff\0", "UTF-8"),
    (Sender.BACKEND, b"Z" + struct.pack("!I", 5) + b"Q", "ReadyForQuery"),
    (Sender.BACKEND, b"D" + struct.pack("!I", 10) + struct.pack("!hi", 1, 5), "truncated"),
    (Sender.BACKEND, b"D" + struct.pack("!I", 6) + struct.pack("!h", -1), "negative"),
    (Sender.BACKEND, b"R" + struct.pack("!I", 10) + struct.pack("!ih", 5, 0), "truncated"),
])
def test_malformed_bodies(sender: Sender, data: bytes, match: str) -> None:
    decoder = Decoder(sender)
    decoder.in_startup = False
    with pytest.raises(ProtocolViolation, match=match):
        decoder.feed(data)
        decoder.next()


@pytest.mark.parametrize("body", [
    struct.pack("!i", PROTOCOL_VERSION_3_0) + b"user\0u\0",  # no final terminator
    struct.pack("!i", PROTOCOL_VERSION_3_0) + b"user\0u",
    struct.pack("!i", PROTOCOL_VERSION_3_0) + b"user\0u\0\0x",  # trailing junk
    struct.pack("!i", 80877103) + b"x",  # SSLRequest with a body
    struct.pack("!i", 80877102) + b"1234",  # CancelRequest cut short
])
def test_malformed_startup_packets(body: bytes) -> None:
    decoder = Decoder(Sender.FRONTEND)
    with pytest.raises(ProtocolViolation):
        decoder.feed(struct.pack("!I", len(body) + 4) + body)
        decoder.next()


def test_other_protocol_versions_are_decoded_for_refusal() -> None:
    packet = struct.pack("!II", 12, 2 << 16) + b"junk"
    decoder = Decoder(Sender.FRONTEND)
    decoder.feed(packet)
    assert decoder.next() == StartupMessage((), 2 << 16)


def test_decoder_stays_in_startup_phase_after_ssl_request() -> None:
    decoder = Decoder(Sender.FRONTEND)
    decoder.feed(SSLRequest().encode())
    assert decoder.next() == SSLRequest()
    assert decoder.in_startup
    decoder.feed(StartupMessage.build({"user": "u"}).encode() + Query("x").encode())
    assert list(decoder) == [StartupMessage.build({"user": "u"}), Query("x")]
    assert not decoder.in_startup


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(Sender)), st.booleans(), st.binary(max_size=200))
def test_garbage_raises_only_protocol_violation(sender: Sender, startup_phase: bool,
                                                data: bytes) -> None:
    decoder = Decoder(sender, max_message_size=4096)
    decoder.in_startup = startup_phase and sender is Sender.FRONTEND
    try:
        decoder.feed(data)
        list(decoder)
    except ProtocolViolation:
        pass
    assert decoder.buffered <= len(data)
