"""Incremental audio decoders for the streaming endpoint: bytes in, 16 kHz mono float32 out.

A WebSocket client sends its audio as binary frames cut wherever its recorder or network cut them,
even in the middle of a header. Each decoder here keeps just enough state to turn whatever has
arrived so far into samples at once, so a live caption never waits for more audio than one codec
frame (20-60 ms) beyond what the client has already sent.

Why the containers are parsed here rather than by FFmpeg's demuxers: an FFmpeg demuxer reads from
a file, and a live stream has no "rest of the file" yet. Reading past the available bytes means
either blocking (a thread per stream) or telling FFmpeg "end of file" in the middle of a packet,
after which its demuxer state is not reliable. The framing of WAV, Ogg, WebM (Matroska) and MP3 is
simple enough to split in a few dozen lines each, so this module cuts the byte stream into codec
packets itself and hands only whole packets to PyAV's decoders (``av.CodecContext``), which keep
their own state across packets. There are no threads and no blocking reads.

The conventions are those of :mod:`speech.audio` (the batch decoder): float32 in [-1, 1],
mono, 16 kHz, every input failure reported as :class:`speech.errors.UnsupportedMedia`.
Channels are averaged (an equal-weight mean keeps a dual-mono microphone at its own level, where
FFmpeg's default stereo-to-mono matrix adds 3 dB and can clip). Nothing here imports Django.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np

from speech.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SAMPLE_RATE, pcm_to_float
from speech.errors import UnsupportedMedia, ValidationError

# Undecoded input held at any moment stays below this. A WebSocket frame may be 1 MiB, so a frame is
# consumed as it is parsed rather than appended whole; only a part of one element/page/packet waits.
MAX_PENDING_BYTES = 256 * 1024
# Bytes a stream may start with before its format is recognised. Garbage fails within this much.
_SNIFF_LIMIT = 16 * 1024
# Non-audio bytes (metadata chunks, cover art, cue tables) a stream may skip before its audio.
_MAX_SKIP_BEFORE_AUDIO = 4 * 1024 * 1024

_EMPTY = np.zeros(0, dtype=np.float32)

_WAV_TYPES = {"audio/wav", "audio/wave", "audio/x-wav", "audio/vnd.wave"}
_PCM_TYPES = {"audio/pcm", "audio/l16"}
_WEBM_TYPES = {"audio/webm"}
_OGG_TYPES = {"audio/ogg", "audio/opus"}
_MPEG_TYPES = {"audio/mpeg", "audio/mp3"}
_G711_TYPES = {"audio/pcmu": "mulaw", "audio/basic": "mulaw", "audio/pcma": "alaw"}
SUPPORTED_MEDIA_TYPES = (
    "audio/wav", "audio/pcm", "audio/L16", "audio/webm", "audio/ogg", "audio/mpeg", "audio/pcmu", "audio/pcma"
)
# G.711's rate: telephony audio is 8 kHz unless a ``rate=`` parameter says otherwise.
G711_SAMPLE_RATE = 8000


def make_decoder(*, media_type: str, sample_rate: int = SAMPLE_RATE) -> StreamDecoder:
    """Return a decoder for a stream of ``media_type`` (the ``open`` frame's field).

    ``sample_rate`` is the rate of raw ``audio/pcm`` / ``audio/L16`` input; a ``rate=`` parameter
    on the media type (``audio/L16;rate=8000``) takes precedence. Containers carry their own rate.
    Raises ``ValidationError`` (field ``media_type`` or ``sample_rate``) for what no decoder here
    accepts, so the consumer can reject the ``open`` frame before any audio arrives.
    """
    essence, params = _parse_media_type(media_type)
    if essence in _PCM_TYPES:
        rate = sample_rate
        if "rate" in params:
            rate = _int_param(params["rate"], "media_type", "rate")
        channels = _int_param(params.get("channels", "1"), "media_type", "channels")
        if not 1 <= channels <= 32:
            raise _invalid("media_type", f"channels={channels} is out of range (1-32).")
        return PcmDecoder(sample_rate=_check_rate(rate, "sample_rate" if "rate" not in params else "media_type"),
                          channels=channels)
    if essence in _G711_TYPES:
        rate = _int_param(params["rate"], "media_type", "rate") if "rate" in params else G711_SAMPLE_RATE
        return G711Decoder(law=_G711_TYPES[essence], sample_rate=_check_rate(rate, "media_type"))
    if essence in _WAV_TYPES:
        return WavDecoder()
    if essence in _WEBM_TYPES:
        return WebmDecoder()
    if essence in _OGG_TYPES:
        return OggDecoder()
    if essence in _MPEG_TYPES:
        return Mp3Decoder()
    raise _invalid(
        "media_type",
        f"Media type {media_type!r} is not supported for streaming; send one of {', '.join(SUPPORTED_MEDIA_TYPES)}.",
    )


def _parse_media_type(media_type: str) -> tuple[str, dict[str, str]]:
    if not isinstance(media_type, str) or not media_type.strip():
        raise _invalid("media_type", "A media type such as 'audio/webm' is required.")
    essence, *rest = media_type.split(";")
    params: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return essence.strip().lower(), params


def _int_param(value: str, field: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _invalid(field, f"{name}={value!r} is not a whole number.") from None


def _check_rate(rate: int, field: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise _invalid(field, f"Sample rate {rate!r} is out of range ({MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz).")
    return rate


def _invalid(field: str, message: str) -> ValidationError:
    return ValidationError(message, details=[{"field": field, "message": message}])


# --------------------------------------------------------------------------------------------
# The common interface and the two stages every decoder shares: downmix/convert, then resample.


class StreamDecoder(ABC):
    """Turns a byte stream, fed in pieces of any size, into 16 kHz mono float32 samples.

    ``feed`` returns the samples that the bytes so far make available (possibly none); ``flush``
    returns what remains once the client says the stream has ended. After an ``UnsupportedMedia``
    the decoder is dead: every later call raises the same error, so a consumer that keeps feeding
    cannot get half-decoded garbage out of it.
    """

    #: Short name of the input format, for messages and logs.
    format_name: str = "audio"

    def __init__(self) -> None:
        self.samples_out = 0
        self.bytes_in = 0
        self._resampler = _Resampler()
        self._failed: UnsupportedMedia | None = None
        self._flushed = False

    def feed(self, data: bytes) -> np.ndarray:
        """Consume ``data`` and return the samples that became available."""
        if self._flushed:
            raise RuntimeError("feed() after flush(): make a new decoder for a new stream.")
        if not data:
            return _EMPTY
        self.bytes_in += len(data)
        return self._guarded(lambda: self._feed(memoryview(data).cast("B")))

    def flush(self) -> np.ndarray:
        """End of stream: return the samples still held in the codec and resampler delay lines."""
        if self._flushed:
            return _EMPTY
        out = self._guarded(self._flush)
        self._flushed = True
        return out

    def _guarded(self, step: Callable[[], None]) -> np.ndarray:
        if self._failed is not None:
            raise self._failed
        try:
            step()
            out = self._resampler.take()
        except UnsupportedMedia as exc:
            self._failed = exc
            raise
        except MemoryError:
            raise
        except Exception as exc:  # bytes from the network parsed in C: any failure is the input's fault
            self._failed = UnsupportedMedia(f"The {self.format_name} stream could not be decoded: {exc}")
            raise self._failed from exc
        self.samples_out += out.size
        return out

    @abstractmethod
    def _feed(self, data: memoryview) -> None:
        """Parse ``data`` and push decoded samples into ``self._resampler``."""

    def _flush(self) -> None:
        self._resampler.flush()


class _Resampler:
    """Mono float32 at any rate in, 16 kHz out, with one filter state across the whole stream.

    One ``av.AudioResampler`` (libswresample) lives as long as the stream, so its filter history
    carries over chunk boundaries and cutting the input anywhere gives the same output as decoding
    it whole: no clicks, no gaps, no drift. At 16 kHz input it is bypassed (no delay at all).
    """

    def __init__(self) -> None:
        self._rate: int | None = None
        self._swr: av.AudioResampler | None = None
        self._pts = 0
        self._out: list[np.ndarray] = []

    def push(self, samples: np.ndarray, rate: int) -> None:
        if samples.size == 0:
            return
        if rate != self._rate:
            self.flush()  # a rate change mid-stream (chained Ogg, MP3 re-encoded): drain, start over
            self._rate = rate
            self._pts = 0
            self._swr = None if rate == SAMPLE_RATE else av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        if self._swr is None:
            self._out.append(np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False))
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1),
                                           format="flt", layout="mono")
        frame.rate = rate
        frame.pts = self._pts
        frame.time_base = Fraction(1, rate)
        self._pts += samples.size
        self._collect(self._swr.resample(frame))

    def flush(self) -> None:
        if self._swr is not None:
            self._collect(self._swr.resample(None))
            self._swr = None
        self._rate = None

    def take(self) -> np.ndarray:
        if not self._out:
            return _EMPTY
        out = self._out[0] if len(self._out) == 1 else np.concatenate(self._out)
        self._out = []
        return out

    def _collect(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            chunk = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            self._out.append(np.clip(chunk, -1.0, 1.0))


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame of any sample format and channel count as mono float32."""
    array = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        array = array.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name == "s16":
        array = array.astype(np.float32) / 32768.0
    elif name == "s32":
        array = array.astype(np.float32) / 2147483648.0
    elif name == "u8":
        array = (array.astype(np.float32) - 128.0) / 128.0
    else:
        array = array.astype(np.float32, copy=False)
    return array[0] if channels == 1 else array.mean(axis=0, dtype=np.float32)


class _PacketDecoder:
    """One PyAV codec context fed whole packets, tolerant of the odd damaged packet.

    A live stream over a flaky link may carry a bad packet; dropping it is what a player does. But a
    stream that has never decoded, or keeps failing, is not audio in the declared format.
    """

    _MAX_CONSECUTIVE_ERRORS = 8

    def __init__(self, codec: str, format_name: str, *, extradata: bytes | None = None) -> None:
        self.format_name = format_name
        self._ctx = av.CodecContext.create(codec, "r")
        if extradata is not None:
            self._ctx.extradata = extradata
        self._decoded_any = False
        self._errors = 0

    def decode(self, payload: bytes | None) -> list[tuple[np.ndarray, int]]:
        try:
            frames = self._ctx.decode(None if payload is None else av.Packet(payload))
        except av.FFmpegError as exc:
            if payload is None:
                return []
            self._errors += 1
            if not self._decoded_any or self._errors > self._MAX_CONSECUTIVE_ERRORS:
                raise UnsupportedMedia(f"The {self.format_name} audio could not be decoded: {exc}") from exc
            return []
        self._errors = 0
        if payload is not None:
            self._decoded_any = True  # Vorbis outputs nothing for its first packet, yet it was good
        return [(_frame_to_mono(frame), frame.sample_rate) for frame in frames]


def _check_prefix(buffer: bytes | bytearray | memoryview, magic: bytes, message: str) -> None:
    """Fail on the first bytes that cannot start ``magic``: garbage is rejected at once."""
    head = bytes(buffer[: len(magic)])
    if head != magic[: len(head)]:
        raise UnsupportedMedia(message)


# --------------------------------------------------------------------------------------------
# Raw PCM and WAV.


class PcmDecoder(StreamDecoder):
    """Raw little-endian s16 (``audio/pcm``, ``audio/L16``): only a split sample is ever held back.

    The contract fixes little-endian for both names (RFC 2586's L16 is big-endian, but browsers'
    AudioWorklets and every SDK we know of send the host's little-endian Int16Array bytes).
    """

    format_name = "PCM"

    def __init__(self, *, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.channels = channels
        self._block = 2 * channels
        self._carry = b""

    def _feed(self, data: memoryview) -> None:
        raw = self._carry + data.tobytes() if self._carry else data
        whole = len(raw) - len(raw) % self._block
        self._carry = bytes(raw[whole:])
        if whole:
            samples = pcm_to_float(raw[:whole], sample_format="s16", channels=self.channels)
            self._resampler.push(samples, self.sample_rate)


def _g711_table(law: str) -> np.ndarray:
    """Each of the 256 G.711 code words as a float32 sample (ITU-T G.711's expansion)."""
    codes = np.arange(256, dtype=np.int32)
    if law == "mulaw":
        u = ~codes & 0xFF
        exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        linear = np.where(u & 0x80, -magnitude, magnitude)
    else:
        a = codes ^ 0x55
        exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
        magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
        linear = np.where(a & 0x80, magnitude, -magnitude)
    return (linear / 32768.0).astype(np.float32)


_G711_TABLES = {law: _g711_table(law) for law in ("mulaw", "alaw")}


class G711Decoder(StreamDecoder):
    """G.711 µ-law (``audio/pcmu``) or A-law (``audio/pcma``): one byte per sample, a table lookup."""

    format_name = "G.711"

    def __init__(self, *, law: str, sample_rate: int = G711_SAMPLE_RATE) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self._table = _G711_TABLES[law]

    def _feed(self, data: memoryview) -> None:
        self._resampler.push(self._table[np.frombuffer(data, dtype=np.uint8)], self.sample_rate)


class _BufferedDecoder(StreamDecoder):
    """A container parser over one byte buffer that each parse step consumes from the front.

    Input is appended in slices of at most ``_SLICE`` bytes and parsed after each, so a 1 MiB
    WebSocket frame never sits in the buffer whole: what stays is at most one unfinished element
    (a header, a page segment, a block), and ``MAX_PENDING_BYTES`` is a hard stop for streams that
    declare an element larger than that.
    """

    _SLICE = 64 * 1024

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._skip = 0

    def _feed(self, data: memoryview) -> None:
        for start in range(0, len(data), self._SLICE):
            self._buf += data[start : start + self._SLICE]
            self._parse(final=False)
            if len(self._buf) > MAX_PENDING_BYTES:
                raise UnsupportedMedia(
                    f"The {self.format_name} stream holds an element larger than this service buffers."
                )

    def _flush(self) -> None:
        self._parse(final=True)
        self._finish()
        super()._flush()

    def _consume_skip(self) -> bool:
        """Drop bytes of a skipped element; True when the skip is done and parsing may go on."""
        if self._skip:
            step = min(self._skip, len(self._buf))
            del self._buf[:step]
            self._skip -= step
        return not self._skip

    @abstractmethod
    def _parse(self, *, final: bool) -> None:
        """Consume as much of ``self._buf`` as is complete."""

    def _finish(self) -> None:
        """End of stream, after the last parse: drain the codec."""


_WAV_FORMATS = {  # (format tag, bits per sample) -> sample format
    (1, 8): "u8", (1, 16): "s16", (1, 24): "s24", (1, 32): "s32", (3, 32): "f32", (3, 64): "f64",
}


class WavDecoder(_BufferedDecoder):
    """A RIFF/WAVE (or RF64) byte stream, header first.

    Chunks before ``data`` are skipped without being held (only ``fmt`` is read). A data size of 0
    or 0xFFFFFFFF, as recorders write before they know the length, means "until the stream ends";
    a real size is honoured, and whatever trails the data chunk (LIST tags) is ignored.
    """

    format_name = "WAV"

    def __init__(self) -> None:
        super().__init__()
        self._state = "riff"
        self._fmt_size = 0
        self._skipped_total = 0
        self._data_left: int | None = None  # None: until the stream ends
        self._sample_format = ""
        self._channels = 0
        self._rate = 0
        self._block = 0

    def _parse(self, *, final: bool) -> None:
        buf = self._buf
        while self._consume_skip():
            if self._state == "riff":
                _check_prefix(buf, b"RIFF", "The stream is not WAV: it does not start with 'RIFF'.")
                if len(buf) < 12:
                    break
                if bytes(buf[8:12]) != b"WAVE":
                    raise UnsupportedMedia("The stream is RIFF but not WAVE audio.")
                del buf[:12]
                self._state = "chunk"
            elif self._state == "chunk":
                if len(buf) < 8:
                    break
                chunk_id, size = bytes(buf[:4]), struct.unpack("<I", buf[4:8])[0]
                del buf[:8]
                self._chunk(chunk_id, size)
            elif self._state == "fmt":
                if len(buf) < self._fmt_size:
                    break
                self._parse_fmt(bytes(buf[: self._fmt_size]))
                del buf[: self._fmt_size + (self._fmt_size & 1)]
                self._state = "chunk"
            elif self._state == "data":
                self._data(buf)
                break
            else:  # trailer after a sized data chunk
                buf.clear()
                break
        if final and not self._sample_format and self.bytes_in:
            raise UnsupportedMedia("The WAV stream ended before its header was complete.")

    def _chunk(self, chunk_id: bytes, size: int) -> None:
        if chunk_id == b"fmt ":
            if not 16 <= size <= 4096:
                raise UnsupportedMedia(f"The WAV header's fmt chunk has an impossible size ({size}).")
            self._state, self._fmt_size = "fmt", size
        elif chunk_id == b"data":
            if not self._sample_format:
                raise UnsupportedMedia("The WAV stream has audio data before its format (fmt) chunk.")
            self._data_left = None if size in (0, 0xFFFFFFFF) else size
            self._state = "data"
        else:
            self._skip = size + (size & 1)  # chunks are padded to an even length
            self._skipped_total += self._skip
            if self._skipped_total > _MAX_SKIP_BEFORE_AUDIO:
                raise UnsupportedMedia("The WAV stream has no audio data within its first few MB.")

    def _parse_fmt(self, fmt: bytes) -> None:
        tag, channels, rate, _byte_rate, block, bits = struct.unpack("<HHIIHH", fmt[:16])
        if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the GUID
            tag = struct.unpack("<H", fmt[24:26])[0]
        sample_format = _WAV_FORMATS.get((tag, bits))
        if sample_format is None:
            kind = {1: "integer PCM", 3: "float"}.get(tag, f"format tag 0x{tag:04x}")
            raise UnsupportedMedia(
                f"WAV {kind} at {bits} bits is not supported; stream 8/16/24/32-bit PCM or 32-bit float."
            )
        if not 1 <= channels <= 64:
            raise UnsupportedMedia(f"The WAV header is implausible ({channels} channels).")
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            # A rate that low would make every byte last for ages (a 1 Hz header: an hour per 7 KB).
            raise UnsupportedMedia(f"The WAV stream's sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz.")
        self._block = channels * (bits // 8)
        if block not in (0, self._block):
            raise UnsupportedMedia(f"The WAV header's block size ({block}) does not match its format.")
        self._sample_format, self._channels, self._rate = sample_format, channels, rate

    def _data(self, buf: bytearray) -> None:
        usable = len(buf) if self._data_left is None else min(len(buf), self._data_left)
        whole = usable - usable % self._block
        if whole:
            samples = pcm_to_float(buf[:whole], sample_format=self._sample_format, channels=self._channels)
            del buf[:whole]
            self._resampler.push(samples, self._rate)
        if self._data_left is not None:
            self._data_left -= whole
            if self._data_left < self._block:
                self._state = "trailer"
                buf.clear()


# --------------------------------------------------------------------------------------------
# Ogg (Opus or Vorbis).


def _xiph_lace(packets: list[bytes]) -> bytes:
    """Vorbis's three header packets in the layout FFmpeg's decoder takes as extradata."""
    out = bytearray([len(packets) - 1])
    for packet in packets[:-1]:
        out += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    for packet in packets:
        out += packet
    return bytes(out)


# The comment header is needed to open a Vorbis decoder but its content is not: an empty one stands
# in, so a stream's tags (cover art can run to megabytes) never have to be held.
_EMPTY_VORBIS_COMMENT = b"\x03vorbis" + struct.pack("<II", 0, 0) + b"\x01"


class _OggStream:
    """The one logical stream being decoded, from its header packets to its end granule."""

    def __init__(self, serial: int, codec: str) -> None:
        self.serial = serial
        self.codec = codec  # "opus" or "vorbis"
        self.packet_index = 0
        self.headers: list[bytes] = []
        self.decoder: _PacketDecoder | None = None
        self.pre_skip = 0
        self.decoded = 0  # samples at the codec's rate, after the decoder's own pre-skip
        self.end_samples: int | None = None
        self.ended = False


class _OggPage:
    def __init__(self, serial: int, flags: int, granule: int, lacing: bytes, relevant: bool) -> None:
        self.serial = serial
        self.flags = flags
        self.granule = granule
        self.lacing = lacing
        self.index = 0
        self.relevant = relevant  # False: its segments are dropped as they arrive


class OggDecoder(_BufferedDecoder):
    """Ogg pages parsed as they arrive; each packet is decoded as soon as its last segment is in.

    A page's header and lacing table say where every packet in it ends, so a packet need not wait
    for the rest of its page (FFmpeg's muxer writes pages of up to a second; a packet is 20 ms).
    Only the first Opus or Vorbis stream is decoded; others (Skeleton, video) are dropped unread.
    A chained file's next Opus/Vorbis stream takes over when the current one ends. The end of the
    last page's granule position trims the final packet's padding, as a player does.
    """

    format_name = "Ogg"
    _MAX_RESYNC = 64 * 1024

    def __init__(self) -> None:
        super().__init__()
        self._page: _OggPage | None = None
        self._packet: bytearray | None = None  # the chosen stream's packet being assembled
        self._discarding = False  # inside the tail of a packet whose start was lost
        self._skip_packet = False  # the next packet (the tags header) is dropped as it arrives
        self._stream: _OggStream | None = None
        self._bytes_before_audio = 0
        self._pages = 0
        self._lost = 0  # bytes dropped while looking for a page after damage

    def _parse(self, *, final: bool) -> None:
        buf = self._buf
        while True:
            page = self._page
            if page is None:
                if self._pages == 0:
                    _check_prefix(buf, b"OggS", "The stream is not Ogg: it does not start with 'OggS'.")
                elif not self._resync():
                    break
                if len(buf) < 27 or len(buf) < 27 + buf[26]:
                    break
                size = 27 + buf[26]
                self._start_page(bytes(buf[:size]))
                del buf[:size]
            elif page.index >= len(page.lacing):
                self._end_page(page)
            else:
                seg_len = page.lacing[page.index]
                if len(buf) < seg_len:
                    break
                segment = bytes(buf[:seg_len])
                del buf[:seg_len]
                page.index += 1
                if page.relevant:
                    self._segment(page, segment, last=seg_len < 255)
        if final and self._stream is None and self.bytes_in:
            raise UnsupportedMedia("The Ogg stream ended before any Opus or Vorbis audio.")

    def _resync(self) -> bool:
        """After a damaged page, find the next capture pattern (what "OggS" is there for)."""
        buf = self._buf
        if len(buf) < 4 or buf[:4] == b"OggS":
            return len(buf) >= 4
        at = buf.find(b"OggS")
        lost = at if at >= 0 else len(buf) - 3
        del buf[:lost]
        self._lost += lost
        if self._lost > self._MAX_RESYNC:
            raise UnsupportedMedia("The Ogg stream lost its page sync and did not regain it.")
        return at >= 0

    def _start_page(self, header: bytes) -> None:
        self._pages += 1
        version, flags, granule, serial = struct.unpack("<BBqI", header[4:18])
        if version != 0:
            raise UnsupportedMedia(f"Ogg page version {version} is not supported.")
        stream = self._stream
        lacing = header[27:]
        if stream is None or stream.ended:
            self._bytes_before_audio += len(header) + sum(lacing)
            if self._bytes_before_audio > _SNIFF_LIMIT * 4:
                raise UnsupportedMedia("The Ogg stream carries no Opus or Vorbis audio.")
        selected = stream is not None and not stream.ended and serial == stream.serial
        candidate = bool(flags & 0x02) and (stream is None or stream.ended)
        self._page = _OggPage(serial, flags, granule, lacing, relevant=selected or candidate)
        if candidate:
            self._packet, self._discarding, self._skip_packet = None, False, False
        elif selected:
            continued = bool(flags & 0x01)
            if not continued:  # a packet left unfinished by a lost page is dropped
                self._packet, self._discarding = None, False
            elif self._packet is None and not self._discarding:
                self._discarding = True  # the tail of a packet whose start we never had
            if flags & 0x04 and granule >= 0:
                stream.end_samples = granule - (stream.pre_skip if stream.codec == "opus" else 0)

    def _end_page(self, page: _OggPage) -> None:
        self._page = None
        stream = self._stream
        if stream is not None and page.serial == stream.serial and page.flags & 0x04:
            stream.ended = True

    def _segment(self, page: _OggPage, segment: bytes, *, last: bool) -> None:
        if self._discarding or self._skip_packet:
            if last:
                self._discarding = self._skip_packet = False
            return
        if self._packet is None:
            self._packet = bytearray()
        self._packet += segment
        if len(self._packet) > MAX_PENDING_BYTES:
            raise UnsupportedMedia("An Ogg packet is larger than this service accepts from a stream.")
        if last:
            packet = bytes(self._packet)
            self._packet = None
            self._packet_done(page, packet)

    def _packet_done(self, page: _OggPage, packet: bytes) -> None:
        if self._stream is None or self._stream.ended or self._stream.serial != page.serial:
            codec = "opus" if packet.startswith(b"OpusHead") else "vorbis" if packet.startswith(b"\x01vorbis") else None
            if codec is None:
                page.relevant = False  # some other logical stream (Skeleton, Theora...)
                return
            if self._stream is not None:
                self._decode(self._stream, None)  # chained: drain the previous stream first
            self._stream = _OggStream(page.serial, codec)
        stream = self._stream
        index = stream.packet_index
        stream.packet_index += 1
        if index == 0:
            if stream.codec == "opus":
                if len(packet) < 19:
                    raise UnsupportedMedia("The Ogg Opus header is truncated.")
                stream.pre_skip = struct.unpack("<H", packet[10:12])[0]
                stream.decoder = _PacketDecoder("opus", "Ogg Opus", extradata=packet)
            else:
                stream.headers.append(packet)
            self._skip_packet = True  # the next packet is the tags: never held
            stream.packet_index += 1
        elif index == 2 and stream.codec == "vorbis":
            if not packet.startswith(b"\x05vorbis"):
                raise UnsupportedMedia("The Ogg Vorbis setup header is missing.")
            extradata = _xiph_lace([stream.headers[0], _EMPTY_VORBIS_COMMENT, packet])
            stream.decoder = _PacketDecoder("vorbis", "Ogg Vorbis", extradata=extradata)
        else:
            self._decode(stream, packet)

    def _decode(self, stream: _OggStream, packet: bytes | None) -> None:
        if stream.decoder is None:
            return
        for samples, rate in stream.decoder.decode(packet):
            if stream.end_samples is not None:
                samples = samples[: max(0, stream.end_samples - stream.decoded)]
            stream.decoded += samples.size
            self._resampler.push(samples, rate)

    def _finish(self) -> None:
        if self._stream is not None:
            self._decode(self._stream, None)


# --------------------------------------------------------------------------------------------
# WebM / Matroska (Opus or Vorbis), as MediaRecorder writes it.

_EBML = 0x1A45DFA3
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_DOC_TYPE = 0x4282
_SEGMENT = 0x18538067
_CLUSTER = 0x1F43B675
_TRACKS = 0x1654AE6B
_TRACK_ENTRY = 0xAE
_TRACK_NUMBER = 0xD7
_TRACK_TYPE = 0x83
_CODEC_ID = 0x86
_CODEC_PRIVATE = 0x63A2
_SIMPLE_BLOCK = 0xA3
_BLOCK_GROUP = 0xA0
_BLOCK = 0xA1
_DISCARD_PADDING = 0x75A2
_UNKNOWN_SIZE = -1
_WEBM_CODECS = {"A_OPUS": "opus", "A_VORBIS": "vorbis"}


def _read_vint(buf: bytes | bytearray, pos: int, *, is_id: bool) -> tuple[int, int] | None:
    """An EBML variable-length integer at ``pos``: (value, length), None if not all here yet.

    IDs keep their marker bit (that is how the spec writes them). Sizes with every value bit set
    mean "unknown" (a live recorder writes that for the Segment and each Cluster, since it cannot
    seek back to patch the size) and come back as ``_UNKNOWN_SIZE``.
    """
    if pos >= len(buf):
        return None
    first = buf[pos]
    length = 9 - first.bit_length()
    if first == 0 or (is_id and length > 4):
        raise UnsupportedMedia("The WebM stream has an invalid element header.")
    if pos + length > len(buf):
        return None
    value = first if is_id else first & (0xFF >> length)
    for byte in buf[pos + 1 : pos + length]:
        value = (value << 8) | byte
    if not is_id and value == (1 << (7 * length)) - 1:
        return _UNKNOWN_SIZE, length
    return value, length


def _ebml_children(payload: bytes) -> list[tuple[int, bytes]]:
    """The child elements of a master element held whole in memory (Tracks, BlockGroup)."""
    children = []
    pos = 0
    while pos < len(payload):
        element_id = _read_vint(payload, pos, is_id=True)
        size = element_id and _read_vint(payload, pos + element_id[1], is_id=False)
        if not element_id or not size or size[0] == _UNKNOWN_SIZE:
            raise UnsupportedMedia("The WebM stream has a malformed header element.")
        start = pos + element_id[1] + size[1]
        if start + size[0] > len(payload):
            raise UnsupportedMedia("The WebM stream has a malformed header element.")
        children.append((element_id[0], payload[start : start + size[0]]))
        pos = start + size[0]
    return children


def _split_laced_block(flags: int, data: bytes) -> list[bytes]:
    """The frames of a (Simple)Block: one, or several with Xiph, fixed-size or EBML lacing."""
    lacing = (flags >> 1) & 0x03
    if lacing == 0:
        return [data]
    if not data:
        raise UnsupportedMedia("The WebM stream has a malformed laced block.")
    count = data[0] + 1
    pos = 1
    if lacing == 2:  # fixed-size
        each, rest = divmod(len(data) - 1, count)
        if rest:
            raise UnsupportedMedia("The WebM stream has a malformed laced block.")
        return [data[1 + i * each : 1 + (i + 1) * each] for i in range(count)]
    sizes: list[int] = []
    try:
        if lacing == 1:  # Xiph: each size as a run of 255s and a final byte
            for _ in range(count - 1):
                size = 0
                while data[pos] == 255:
                    size += 255
                    pos += 1
                sizes.append(size + data[pos])
                pos += 1
        else:  # EBML: the first size, then signed differences
            for i in range(count - 1):
                value = _read_vint(data, pos, is_id=False)
                if value is None or value[0] == _UNKNOWN_SIZE:
                    raise IndexError
                raw, length = value
                pos += length
                sizes.append(raw if i == 0 else sizes[-1] + raw - ((1 << (7 * length - 1)) - 1))
    except IndexError:
        raise UnsupportedMedia("The WebM stream has a malformed laced block.") from None
    frames = []
    for size in sizes:
        if size < 0 or pos + size > len(data):
            raise UnsupportedMedia("The WebM stream has a malformed laced block.")
        frames.append(data[pos : pos + size])
        pos += size
    frames.append(data[pos:])
    return frames


class WebmDecoder(_BufferedDecoder):
    """EBML elements parsed as they arrive; each (Simple)Block is decoded as soon as it is whole.

    Segment and Cluster (of unknown size in a live recording) are entered rather than read whole,
    so only one small element at a time is held: a block is one Opus packet of a few hundred bytes.
    Elements of no interest (SeekHead, Cues, Tags, Void...) are skipped as they stream past.
    """

    format_name = "WebM"

    # Read whole and handled; everything else of known size is skipped.
    _HELD = (_EBML, _TRACKS, _SIMPLE_BLOCK, _BLOCK_GROUP)

    def __init__(self) -> None:
        super().__init__()
        self._seen_header = False
        self._track: int | None = None
        self._decoder: _PacketDecoder | None = None
        self._bytes_before_audio = 0

    def _parse(self, *, final: bool) -> None:
        buf = self._buf
        while self._consume_skip():
            if not self._seen_header:
                _check_prefix(buf, _EBML_MAGIC, "The stream is not WebM: it does not start with an EBML header.")
            element_id = _read_vint(buf, 0, is_id=True)
            size = element_id and _read_vint(buf, element_id[1], is_id=False)
            if not element_id or not size:
                break
            (eid, id_len), (esize, size_len) = element_id, size
            header = id_len + size_len
            if eid in (_SEGMENT, _CLUSTER):
                del buf[:header]  # enter: its children follow
                continue
            if esize == _UNKNOWN_SIZE:
                raise UnsupportedMedia(f"The WebM stream has an element 0x{eid:X} of unknown size.")
            if eid in self._HELD:
                if esize > MAX_PENDING_BYTES:
                    raise UnsupportedMedia("The WebM stream holds an element larger than this service buffers.")
                if len(buf) < header + esize:
                    break
                payload = bytes(buf[header : header + esize])
                del buf[: header + esize]
                self._element(eid, payload)
            else:
                del buf[:header]
                self._skip = esize
                if self._decoder is None:
                    self._bytes_before_audio += esize
                    if self._bytes_before_audio > _MAX_SKIP_BEFORE_AUDIO:
                        raise UnsupportedMedia("The WebM stream has no audio track within its first few MB.")
        if final and self._decoder is None and self.bytes_in:
            raise UnsupportedMedia("The WebM stream ended before its audio track was described.")

    def _element(self, eid: int, payload: bytes) -> None:
        if eid == _EBML:
            doc_types = [value for child, value in _ebml_children(payload) if child == _DOC_TYPE]
            doc_type = doc_types[0].rstrip(b"\0").decode("ascii", "replace") if doc_types else "matroska"
            if doc_type not in ("webm", "matroska"):
                raise UnsupportedMedia(f"The EBML stream is {doc_type!r}, not WebM.")
            self._seen_header = True
        elif not self._seen_header:
            raise UnsupportedMedia("The stream is not WebM: it does not start with an EBML header.")
        elif eid == _TRACKS:
            if self._decoder is None:
                self._tracks(payload)
        elif eid == _SIMPLE_BLOCK:
            self._block(payload, discard_ns=0)
        else:  # BlockGroup: a Block and perhaps DiscardPadding (the last block's trailing padding)
            children = _ebml_children(payload)
            padding = [int.from_bytes(v, "big", signed=True) for c, v in children if c == _DISCARD_PADDING]
            for child, value in children:
                if child == _BLOCK:
                    self._block(value, discard_ns=padding[0] if padding else 0)

    def _tracks(self, payload: bytes) -> None:
        found = []
        for child, entry in _ebml_children(payload):
            if child != _TRACK_ENTRY:
                continue
            fields = dict(_ebml_children(entry))
            codec_id = fields.get(_CODEC_ID, b"").rstrip(b"\0").decode("ascii", "replace")
            found.append(codec_id or "?")
            codec = _WEBM_CODECS.get(codec_id)
            if int.from_bytes(fields.get(_TRACK_TYPE, b""), "big") != 2 or codec is None:
                continue
            private = fields.get(_CODEC_PRIVATE)
            if not private:
                raise UnsupportedMedia(f"The WebM {codec_id} track has no codec header.")
            self._track = int.from_bytes(fields.get(_TRACK_NUMBER, b"\x01"), "big")
            self._decoder = _PacketDecoder(codec, f"WebM {codec.title()}", extradata=private)
            return
        raise UnsupportedMedia(
            f"The WebM stream has no Opus or Vorbis audio track (tracks: {', '.join(found) or 'none'})."
        )

    def _block(self, payload: bytes, *, discard_ns: int) -> None:
        track = _read_vint(payload, 0, is_id=False)
        if track is None or len(payload) < track[1] + 3:
            raise UnsupportedMedia("The WebM stream has a malformed block.")
        if self._decoder is None or track[0] != self._track:
            return
        flags = payload[track[1] + 2]
        decoded: list[tuple[np.ndarray, int]] = []
        for frame in _split_laced_block(flags, payload[track[1] + 3 :]):
            decoded += self._decoder.decode(frame)
        if discard_ns > 0 and decoded:
            rate = decoded[-1][1]
            drop = round(discard_ns * rate / 1_000_000_000)
            merged = np.concatenate([samples for samples, _ in decoded])
            decoded = [(merged[: max(0, merged.size - drop)], rate)]
        for samples, rate in decoded:
            self._resampler.push(samples, rate)

    def _finish(self) -> None:
        if self._decoder is not None:
            for samples, rate in self._decoder.decode(None):
                self._resampler.push(samples, rate)


# --------------------------------------------------------------------------------------------
# MP3 (and MPEG-1/2 layers I and II).

_MPEG_BITRATES = {  # (MPEG-1?, layer) -> kbit/s by index
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MPEG_DECODERS = {1: "mp1float", 2: "mp2float", 3: "mp3float"}
_MP3_DECODER_DELAY = 529  # samples the MP3 decoder's filter bank lags by (FFmpeg's 528 + 1)


class _MpegHeader:
    __slots__ = ("version", "layer", "rate", "mono", "length", "samples")

    def __init__(self, version: int, layer: int, rate: int, mono: bool, length: int, samples: int) -> None:
        self.version, self.layer, self.rate, self.mono, self.length, self.samples = (
            version, layer, rate, mono, length, samples,
        )

    def matches(self, other: _MpegHeader) -> bool:
        return (self.version, self.layer, self.rate) == (other.version, other.layer, other.rate)


def _mpeg_header(buf: bytes | bytearray, pos: int) -> _MpegHeader | None:
    """The MPEG audio frame header at ``pos``, or None if those 4 bytes are not a valid one."""
    if pos + 4 > len(buf):
        return None
    b0, b1, b2, b3 = buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]
    if b0 != 0xFF or b1 & 0xE0 != 0xE0:
        return None
    version, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3 or b3 & 3 == 2:
        return None  # reserved values, or free-format bit rate (which has no frame length to go by)
    layer = 4 - layer_bits
    mpeg1 = version == 3
    bitrate = _MPEG_BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    rate = _MPEG_RATES[version][rate_index]
    if layer == 1:
        samples, length = 384, (12 * bitrate // rate + padding) * 4
    else:
        samples = 1152 if layer == 2 or mpeg1 else 576
        length = samples // 8 * bitrate // rate + padding
    return _MpegHeader(version, layer, rate, b3 >> 6 == 3, length, samples)


class Mp3Decoder(_BufferedDecoder):
    """MPEG audio frames found by their headers and decoded one by one as each arrives whole.

    The stream is trusted only after three consecutive, consistent frame headers (random bytes
    look like one MP3 header in every few thousand positions, three in a row essentially never),
    which costs two frames (~50 ms) of latency once, at the start. A LAME/Xing "Info" frame, which
    FFmpeg's demuxer hides, is skipped likewise, and its encoder delay and padding are trimmed, so
    the samples match the batch decoder's.
    """

    format_name = "MP3"
    _CONFIRM_FRAMES = 3
    _MAX_RESYNC = 64 * 1024

    def __init__(self) -> None:
        super().__init__()
        self._state = "id3"
        self._locked: _MpegHeader | None = None
        self._ever_locked = False
        self._first_frame = True
        self._searched = 0
        self._decoder: _PacketDecoder | None = None
        self._decoded = 0  # samples out of the decoder, before trimming
        self._trim_start = 0
        self._trim_end: int | None = None

    def _parse(self, *, final: bool) -> None:
        buf = self._buf
        while self._consume_skip():
            if self._state == "id3":
                if b"ID3".startswith(bytes(buf[:3])):  # an ID3v2 tag (or the start of one)
                    if len(buf) < 10:
                        if not final:
                            break
                    else:
                        size = (buf[6] << 21) | (buf[7] << 14) | (buf[8] << 7) | buf[9]
                        self._skip = 10 + size + (10 if buf[5] & 0x10 else 0)
                        continue
                self._state = "sync"
            elif self._state == "sync":
                if not self._sync(final=final):
                    break
            else:
                header = _mpeg_header(buf, 0)
                if header is None or not header.matches(self._locked):
                    if len(buf) < 4 and not final:
                        break
                    self._state = "sync"  # lost: a damaged frame, or a trailing tag
                    continue
                if len(buf) < header.length:
                    if final and buf:
                        buf.clear()  # a truncated last frame
                    break
                frame = bytes(buf[: header.length])
                del buf[: header.length]
                self._frame(header, frame)
        if final and not self._ever_locked and self.bytes_in:
            raise UnsupportedMedia("The stream is not MP3: no MPEG audio frames were found in it.")

    def _sync(self, *, final: bool) -> bool:
        """Find the next run of consistent frame headers; True once locked onto one."""
        buf = self._buf
        pos = 0
        while True:
            pos = buf.find(b"\xff", pos)
            if pos < 0:
                pos = len(buf)
                break
            verdict = self._confirm(pos, final=final)
            if verdict is None:  # need more bytes to tell
                break
            if verdict:
                del buf[:pos]
                self._searched = 0
                self._state = "locked"
                self._locked = _mpeg_header(buf, 0)
                self._ever_locked = True
                return True
            pos += 1
        del buf[:pos]
        self._searched += pos
        limit = self._MAX_RESYNC if self._ever_locked else _SNIFF_LIMIT
        if self._searched > limit and not final:
            where = "lost its frame sync and did not regain it" if self._ever_locked else "has no MPEG audio frames"
            raise UnsupportedMedia(f"The MP3 stream {where} within {limit // 1024} KB.")
        return False

    def _confirm(self, pos: int, *, final: bool) -> bool | None:
        first = _mpeg_header(self._buf, pos)
        if first is None:
            return False if pos + 4 <= len(self._buf) or final else None
        # A frame after a lost sync needs less proof than the first one: the format is known.
        needed = self._CONFIRM_FRAMES if self._locked is None else 2
        at, header = pos, first
        for _ in range(needed - 1):
            at += header.length
            if at + 4 > len(self._buf):
                return (at <= len(self._buf)) if final else None
            header = _mpeg_header(self._buf, at)
            if header is None or not header.matches(first) or (self._locked and not first.matches(self._locked)):
                return False
        return True

    def _frame(self, header: _MpegHeader, frame: bytes) -> None:
        if self._first_frame:
            self._first_frame = False
            if self._info_frame(header, frame):
                return
        if self._decoder is None:
            self._decoder = _PacketDecoder(_MPEG_DECODERS[header.layer], "MP3")
        self._push(self._decoder.decode(frame))

    def _info_frame(self, header: _MpegHeader, frame: bytes) -> bool:
        """Skip a Xing/Info/VBRI frame (silence), taking LAME's encoder delay and padding from it."""
        side_info = (17 if header.mono else 32) if header.version == 3 else (9 if header.mono else 17)
        at = 4 + side_info
        if frame[36:40] == b"VBRI":
            return True
        if frame[at : at + 4] not in (b"Xing", b"Info"):
            return False
        flags = struct.unpack(">I", frame[at + 4 : at + 8])[0] if len(frame) >= at + 8 else 0
        pos = at + 8
        frames = None
        if flags & 1:
            frames = struct.unpack(">I", frame[pos : pos + 4])[0]
            pos += 4
        pos += (4 if flags & 2 else 0) + (100 if flags & 4 else 0) + (4 if flags & 8 else 0)
        if len(frame) >= pos + 24 and frame[pos : pos + 4] in (b"LAME", b"Lavf", b"Lavc"):
            delays = int.from_bytes(frame[pos + 21 : pos + 24], "big")
            start_pad, end_pad = delays >> 12, delays & 0xFFF
            self._trim_start = start_pad + _MP3_DECODER_DELAY
            if frames:
                self._trim_end = frames * header.samples - end_pad + _MP3_DECODER_DELAY
        return True

    def _push(self, decoded: list[tuple[np.ndarray, int]]) -> None:
        for samples, rate in decoded:
            begin, end = self._decoded, self._decoded + samples.size
            self._decoded = end
            lo = max(0, self._trim_start - begin)
            hi = samples.size if self._trim_end is None else max(lo, min(samples.size, self._trim_end - begin))
            self._resampler.push(samples[lo:hi], rate)

    def _finish(self) -> None:
        if self._decoder is not None:
            self._push(self._decoder.decode(None))
