"""Streaming decoders: audio arriving in arbitrary pieces comes out as soon as it can, and right.

The reference for every format is a decode of the same bytes in one piece (the batch decoder
``speech.audio.decode_audio`` where it accepts the container, PyAV directly for WebM).
Each stream is fed in random piece sizes, 1 byte to 8 KB, so headers, pages, blocks and frames are
cut at every kind of place.
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Callable

import av
import numpy as np
import pytest

from scaiecho_site.errors import UnsupportedMedia, ValidationError
from speech.audio import decode_audio
from speech.decoders import MAX_PENDING_BYTES, StreamDecoder, make_decoder
from tests.voices import convert_audio, synth_speech

RATE = 16_000
TEXT = "The quick brown fox jumps over the lazy dog, and the caption follows every word."


@pytest.fixture(scope="module")
def speech_wav() -> bytes:
    return synth_speech(TEXT)  # 22.05 kHz mono s16, about 5 s


# ---- encoders for the formats convert_audio does not make --------------------------------------


def encode(wav: bytes, *, muxer: str, codec: str, rate: int, layout: str = "mono",
           muxer_options: dict[str, str] | None = None, codec_options: dict[str, str] | None = None) -> bytes:
    """Re-encode ``wav`` with PyAV: any muxer, codec, rate and channel layout."""
    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as src, av.open(out, "w", format=muxer, options=muxer_options or {}) as dst:
        stream = dst.add_stream(codec, rate=rate, layout=layout, options=codec_options or {})
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout=layout, rate=rate)
        frames = [f for frame in src.decode(audio=0) for f in resampler.resample(frame)] + resampler.resample(None)
        for frame in [*frames, None]:
            for packet in stream.encode(frame):
                dst.mux(packet)
    return out.getvalue()


def _vint(buf: bytes, pos: int) -> tuple[int, int]:
    length = 9 - buf[pos].bit_length()
    return int.from_bytes(buf[pos : pos + length], "big") & ((1 << (7 * length)) - 1), length


def media_recorder_webm(wav: bytes) -> bytes:
    """WebM/Opus 48 kHz stereo as Chrome's MediaRecorder writes it: Segment *and* Clusters of unknown size.

    FFmpeg's live mode leaves only the Segment's size unknown, so each Cluster's size field is
    overwritten with the all-ones "unknown" value of the same length.
    """
    data = bytearray(encode(wav, muxer="webm", codec="libopus", rate=48_000, layout="stereo",
                            muxer_options={"live": "1"}))
    pos = data.find(bytes.fromhex("18538067")) + 4
    pos += _vint(data, pos)[1]  # into the Segment
    clusters = 0
    while pos < len(data):
        id_len = 9 - data[pos].bit_length()
        size, size_len = _vint(data, pos + id_len)
        if data[pos : pos + 4] == bytes.fromhex("1f43b675"):
            # all value bits set: "unknown size" in a field of the same length
            data[pos + 4 : pos + 4 + size_len] = bytes([0xFF >> (size_len - 1)]) + b"\xff" * (size_len - 1)
            clusters += 1
        pos += id_len + size_len + size
    assert clusters >= 2
    return bytes(data)


def pyav_reference(data: bytes) -> np.ndarray:
    """Whole-file decode as the batch decoder does it (it does not accept WebM uploads)."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
    with av.open(io.BytesIO(data)) as container:
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


def wav_streaming_header(wav: bytes, size_value: int) -> bytes:
    """The same WAV with RIFF and data sizes as a live recorder writes them (0 or 0xFFFFFFFF)."""
    data = bytearray(wav)
    data[4:8] = struct.pack("<I", size_value)
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", size_value)
    return bytes(data)


def pcm_payload(wav: bytes) -> bytes:
    at = wav.find(b"data")
    return wav[at + 8 :]


# ---- feeding ----------------------------------------------------------------------------------


def feed_in_pieces(decoder: StreamDecoder, data: bytes, *, seed: int, max_piece: int = 8192) -> np.ndarray:
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        size = rng.randint(1, max_piece)
        out.append(decoder.feed(data[pos : pos + size]))
        pos += size
    out.append(decoder.flush())
    return np.concatenate(out)


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 160) -> float:
    """Waveform correlation at the best alignment within +-10 ms."""
    best = -1.0
    for lag in range(-max_lag, max_lag + 1, 2):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(x.size, y.size)
        best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


# ---- every media type, fed in random pieces, against a whole decode of the same bytes ------------

Case = tuple[str, Callable[[bytes], bytes], Callable[[bytes], np.ndarray]]


def _l16_8k(wav: bytes) -> bytes:
    return pcm_payload(encode(wav, muxer="wav", codec="pcm_s16le", rate=8_000))


CASES: dict[str, Case] = {
    "wav-s16-22k": ("audio/wav", lambda w: w, lambda d: decode_audio(d).samples),
    "wav-u8": ("audio/wav", lambda w: encode(w, muxer="wav", codec="pcm_u8", rate=22_050),
               lambda d: decode_audio(d).samples),
    "wav-s24-48k": ("audio/wav", lambda w: encode(w, muxer="wav", codec="pcm_s24le", rate=48_000),
                    lambda d: decode_audio(d).samples),
    "wav-s32-stereo": ("audio/wav", lambda w: encode(w, muxer="wav", codec="pcm_s32le", rate=44_100, layout="stereo"),
                       lambda d: decode_audio(d).samples),
    "wav-f32-stereo-44k": ("audio/x-wav",
                           lambda w: encode(w, muxer="wav", codec="pcm_f32le", rate=44_100, layout="stereo"),
                           lambda d: decode_audio(d).samples),
    "wav-live-ffffffff": ("audio/wav", lambda w: wav_streaming_header(w, 0xFFFFFFFF),
                          lambda d: decode_audio(d).samples),
    "wav-live-zero": ("audio/wav", lambda w: wav_streaming_header(w, 0),
                      lambda d: decode_audio(wav_streaming_header(d, 0xFFFFFFFF)).samples),
    "pcm-16k": ("audio/pcm", lambda w: pcm_payload(encode(w, muxer="wav", codec="pcm_s16le", rate=RATE)),
                lambda d: np.frombuffer(d, "<i2").astype(np.float32) / 32768),
    "L16-rate-8000": ("audio/L16;rate=8000", _l16_8k,
                      lambda d: decode_audio(encode(synth_speech(TEXT), muxer="wav", codec="pcm_s16le",
                                                    rate=8_000)).samples),
    "ogg-opus": ("audio/ogg", lambda w: convert_audio(w, "ogg"), lambda d: decode_audio(d).samples),
    "ogg-vorbis-stereo": ("audio/ogg", lambda w: encode(w, muxer="ogg", codec="vorbis", rate=44_100, layout="stereo",
                                                        codec_options={"strict": "-2"}),
                          lambda d: decode_audio(d).samples),
    "mp3": ("audio/mpeg", lambda w: convert_audio(w, "mp3"), lambda d: decode_audio(d).samples),
    "webm-opus-mediarecorder": ("audio/webm;codecs=opus", media_recorder_webm, pyav_reference),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_stream_in_random_pieces_matches_whole_decode(case: str, speech_wav: bytes) -> None:
    media_type, make, reference = CASES[case]
    data = make(speech_wav)
    expected = reference(data)

    decoder = make_decoder(media_type=media_type)
    got = feed_in_pieces(decoder, data, seed=len(data))

    assert got.dtype == np.float32
    assert decoder.samples_out == got.size
    assert abs(got.size - expected.size) <= 0.040 * RATE, (got.size, expected.size)
    # Same bytes, same codec: even the lossy formats come out as the batch decode's waveform
    # (channels are averaged rather than summed at -3 dB, which correlation ignores).
    assert best_correlation(got, expected) > 0.95
    assert np.sqrt(np.mean(got**2)) > 0.01  # speech, not silence


@pytest.mark.parametrize("case", ["wav-s24-48k", "ogg-opus", "mp3", "webm-opus-mediarecorder"])
def test_piece_boundaries_leave_no_trace(case: str, speech_wav: bytes) -> None:
    media_type, make, _ = CASES[case]
    data = make(speech_wav)
    whole = make_decoder(media_type=media_type)
    once = np.concatenate([whole.feed(data), whole.flush()])

    for seed in (1, 2):
        pieces = feed_in_pieces(make_decoder(media_type=media_type), data, seed=seed, max_piece=700)
        assert abs(pieces.size - once.size) <= 0.020 * RATE
        n = min(pieces.size, once.size)
        assert np.max(np.abs(pieces[:n] - once[:n])) < 1e-4


# ---- latency ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("media_type", "make", "bytes_per_second"), [
    ("audio/pcm", lambda w: pcm_payload(encode(w, muxer="wav", codec="pcm_s16le", rate=RATE)), 32_000),
    ("audio/wav", lambda w: wav_streaming_header(encode(w, muxer="wav", codec="pcm_s16le", rate=48_000, layout="stereo"),
                                                0xFFFFFFFF), 192_000),
    ("audio/wav", lambda w: encode(w, muxer="wav", codec="pcm_s24le", rate=44_100), 132_300),
])
def test_raw_audio_comes_out_as_its_bytes_arrive(media_type: str, make: Callable[[bytes], bytes],
                                                 bytes_per_second: int, speech_wav: bytes) -> None:
    data = make(speech_wav)
    header = data.find(b"data") + 8 if data[:4] == b"RIFF" else 0
    decoder = make_decoder(media_type=media_type)
    fed = 0
    for seconds in (0.25, 0.5, 1.0, 2.0, 3.0):
        end = header + int(seconds * bytes_per_second)
        decoder.feed(data[fed:end])
        fed = end
        assert decoder.samples_out >= (seconds - 0.05) * RATE, (seconds, decoder.samples_out / RATE)


def _packet_ends(data: bytes) -> list[tuple[int, float]]:
    """(byte offset where each packet's payload ends, end time of its audio in seconds)."""
    ends = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        start = 0
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None:
                continue
            payload = bytes(packet)
            at = data.find(payload, start)
            if at < 0:
                continue  # a packet spanning Ogg pages is not contiguous in the file
            start = at + len(payload)  # silent packets repeat byte for byte: search past this one
            ends.append((at + len(payload), float((packet.pts + packet.duration) * stream.time_base)))
    return ends


@pytest.mark.parametrize("case", ["ogg-opus", "mp3", "webm-opus-mediarecorder"])
def test_compressed_audio_comes_out_one_frame_after_its_bytes(case: str, speech_wav: bytes) -> None:
    media_type, make, _ = CASES[case]
    data = make(speech_wav)
    ends = _packet_ends(data)
    assert len(ends) > 50
    decoder = make_decoder(media_type=media_type)
    fed = 0
    worst = 0.0
    for index, (end, audio_end) in enumerate(ends):
        decoder.feed(data[fed:end])
        fed = end
        if index >= 3:  # MP3 locks on after three frames; container headers come first
            worst = max(worst, audio_end - decoder.samples_out / RATE)
    # Opus: nothing beyond the packet itself. MP3: its decoder's 529-sample overlap and LAME's
    # 576-sample start padding (~50 ms at 44.1 kHz) are inherent to the format.
    assert worst < (0.060 if case == "mp3" else 0.025), worst


# ---- bad input ----------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(256)) * 40


def _feed_until_error(decoder: StreamDecoder, data: bytes, piece: int = 1024) -> int:
    """Bytes fed when UnsupportedMedia came; fails the test if it never does."""
    for pos in range(0, len(data), piece):
        try:
            decoder.feed(data[pos : pos + piece])
        except UnsupportedMedia:
            return pos + piece
    with pytest.raises(UnsupportedMedia):
        decoder.flush()
    return len(data)


@pytest.mark.parametrize("media_type", ["audio/wav", "audio/ogg", "audio/webm", "audio/mpeg"])
@pytest.mark.parametrize("payload", ["random", "png", "text"])
def test_garbage_is_rejected_within_the_first_kilobytes(media_type: str, payload: str) -> None:
    data = {
        "random": random.Random(7).randbytes(200_000),
        "png": PNG,
        "text": b"<html><body>" + b"not audio at all " * 5000,
    }[payload]
    decoder = make_decoder(media_type=media_type)
    consumed = _feed_until_error(decoder, data)
    assert consumed <= 24 * 1024, consumed
    with pytest.raises(UnsupportedMedia):  # a failed stream stays failed
        decoder.feed(b"\x00" * 100)


def test_mp3_declared_but_random_bytes_fails_fast_even_fed_bytewise() -> None:
    decoder = make_decoder(media_type="audio/mpeg")
    data = random.Random(3).randbytes(40_000)
    assert _feed_until_error(decoder, data, piece=1) <= 20 * 1024


@pytest.mark.parametrize(("tag", "bits"), [(2, 4), (0x55, 0), (1, 12), (3, 16), (6, 8)])
def test_wav_with_an_unsupported_sample_format_is_rejected(tag: int, bits: int) -> None:
    fmt = struct.pack("<HHIIHH", tag, 1, 16_000, 32_000, 2, bits)
    header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    decoder = make_decoder(media_type="audio/wav")
    for byte in range(len(header) - 1):  # split mid-header, a byte at a time
        decoder.feed(header[byte : byte + 1])
    with pytest.raises(UnsupportedMedia, match="not supported"):
        decoder.feed(header[-1:])


@pytest.mark.parametrize("rate", [1, 4_000, 7_999, 192_001, 384_000])
def test_a_wav_stream_declaring_a_rate_outside_8_to_192_khz_is_refused(rate: int) -> None:
    """A streamed WAV whose header claims 1 Hz would make each 7 KB last an hour of metered audio."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    decoder = make_decoder(media_type="audio/wav")
    with pytest.raises(UnsupportedMedia, match="sample rate"):
        decoder.feed(header + b"data" + struct.pack("<I", 0xFFFFFFFF) + b"\0" * 64)


@pytest.mark.parametrize("rate", [1, 7_999, 192_001])
def test_raw_pcm_at_a_rate_outside_8_to_192_khz_is_refused(rate: int) -> None:
    with pytest.raises(ValidationError, match="out of range"):
        make_decoder(media_type=f"audio/pcm;rate={rate}")


def test_stream_ending_inside_the_header_is_an_error() -> None:
    decoder = make_decoder(media_type="audio/wav")
    decoder.feed(b"RIFF\xff\xff\xff\xffWAVEfmt ")
    with pytest.raises(UnsupportedMedia):
        decoder.flush()


def test_ogg_without_audio_stream_is_rejected(speech_wav: bytes) -> None:
    data = bytearray(convert_audio(speech_wav, "ogg"))
    data[28:36] = b"NotAudio"  # the first packet is no longer an OpusHead
    decoder = make_decoder(media_type="audio/ogg")
    with pytest.raises(UnsupportedMedia):
        feed_in_pieces(decoder, bytes(data), seed=5)


def test_webm_element_larger_than_the_buffer_is_rejected_without_buffering_it(speech_wav: bytes) -> None:
    data = media_recorder_webm(speech_wav)
    at = data.find(b"\xa3", data.find(bytes.fromhex("1f43b675")) + 8)  # the first SimpleBlock
    huge = data[:at] + b"\xa3" + b"\x01" + (50 * 1024 * 1024).to_bytes(7, "big") + b"\x00" * 1024
    with pytest.raises(UnsupportedMedia, match="larger"):
        make_decoder(media_type="audio/webm").feed(huge)


def test_metadata_before_the_audio_is_skipped_not_buffered(speech_wav: bytes) -> None:
    at = speech_wav.find(b"data")
    junk = b"LIST" + struct.pack("<I", 3 * MAX_PENDING_BYTES) + b"\x00" * (3 * MAX_PENDING_BYTES)
    data = speech_wav[:at] + junk + speech_wav[at:]
    decoder = make_decoder(media_type="audio/wav")
    out = np.concatenate([decoder.feed(data[i : i + 1 << 20]) for i in range(0, len(data), 1 << 20)] + [decoder.flush()])
    assert abs(out.size - decode_audio(speech_wav).samples.size) <= 1


@pytest.mark.parametrize("media_type", ["video/mp4", "audio/flac", "text/plain", "", "audio/L16;rate=fast"])
def test_unknown_media_type_is_a_validation_error(media_type: str) -> None:
    with pytest.raises(ValidationError) as info:
        make_decoder(media_type=media_type)
    assert info.value.details[0]["field"] == "media_type"


def test_sample_rate_out_of_range_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        make_decoder(media_type="audio/pcm", sample_rate=0)
    assert info.value.details[0]["field"] == "sample_rate"


def test_ogg_recovers_from_a_damaged_page(speech_wav: bytes) -> None:
    data = convert_audio(speech_wav, "ogg")
    middle = len(data) // 2
    damaged = data[:middle] + random.Random(9).randbytes(300) + data[middle + 500 :]
    got = feed_in_pieces(make_decoder(media_type="audio/ogg"), damaged, seed=9)
    expected = decode_audio(data).samples.size
    assert 0.5 * expected < got.size <= expected  # the audio after the damage still comes out


@pytest.mark.parametrize(("media_type", "reference"), [("audio/pcmu", "ulaw2lin"), ("audio/pcma", "alaw2lin")])
def test_g711_decodes_every_code_word_as_the_itu_tables_do(media_type: str, reference: str) -> None:
    import warnings

    with warnings.catch_warnings():  # Python 3.11's own G.711 expansion is the reference
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    codes = bytes(range(256)) * 4
    expected = np.frombuffer(getattr(audioop, reference)(codes, 2), dtype="<i2") / 32768.0
    decoder = make_decoder(media_type=f"{media_type};rate=16000")  # the pipeline's rate: no resampling
    decoded = np.concatenate([decoder.feed(codes[:100]), decoder.feed(codes[100:]), decoder.flush()])
    np.testing.assert_allclose(decoded, expected, atol=1e-7)
    # At the default 8 kHz, a second of G.711 is a second of audio.
    eight_khz = make_decoder(media_type=media_type)
    out = np.concatenate([eight_khz.feed(bytes(8000)), eight_khz.flush()])
    assert out.size == pytest.approx(16000, abs=32)
