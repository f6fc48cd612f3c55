"""Speakers, language and downloads on the caption page, in a real browser against a real daphne
server, a real Celery worker (enrollment) and a real diarizing stream worker: a fake microphone
plays a two-voice conversation (one voice enrolled), the page shows who said each final, and the
session downloads as SRT with the right name on the right cue."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import playwright.sync_api as playwright_sync
import pytest

from tenants.models import Role, TenantPolicy
from tests.e2e.test_captions import ARTIFACTS, BASE_FLAGS, CHROMIUM, error_text, final_text, wait_for
from tests.factories import IssuedKey, KeyFactory
from tests.speakers.test_diarized_stream import diarizing_stream_worker  # noqa: F401 (fixture)
from tests.speakers.test_enrollment import Turn, conversation
from tests.speakers.voices import ALICE, BORIS, enroll_ready
from tests.streaming.test_stream_worker import wait_until_announced
from tests.voices import word_error_rate
from tests.workers import DaphneServer

# Alice is enrolled, Boris is not: his line must carry an anonymous SPEAKER_n.
TURNS = [
    Turn(ALICE, "Good morning everyone, shall we begin with the budget?"),
    Turn(BORIS, "Yes, the numbers for the third quarter are finally ready."),
    Turn(ALICE, "Then we can start talking about travel."),
]
SRT_TIME = r"\d{2}:\d{2}:\d{2},\d{3}"

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Playwright's sync API runs an event loop in this thread; the ORM calls here are plain sync code."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(scope="module")
def conversation_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three turns with 1 s pauses (about 12 s), 16 kHz mono WAV for the fake microphone."""
    wav, _ = conversation(TURNS)
    path = tmp_path_factory.mktemp("conversation") / "two_voices.wav"
    path.write_bytes(wav)
    return path


@pytest.fixture
def open_page(conversation_wav: Path, tmp_path: Path) -> Iterator[Callable[[str], object]]:
    """``open_page(url)`` → a page in a fresh headless Chromium whose microphone plays the conversation."""
    with playwright_sync.sync_playwright() as pw:
        flags = [
            *BASE_FLAGS,
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={conversation_wav}%noloop",
        ]
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags, downloads_path=str(tmp_path))

        def launch(url: str) -> object:
            page = browser.new_page(viewport={"width": 420, "height": 900}, accept_downloads=True)
            page.goto(url)
            return page

        try:
            yield launch
        finally:
            browser.close()


def admin_key() -> IssuedKey:
    key = KeyFactory.issue(role=Role.TENANT_ADMIN)
    TenantPolicy.objects.create(tenant=key.tenant, allowed_backends="A", default_backend="A")
    return key


def enter_key(page: object, key: IssuedKey) -> None:
    page.fill("#api-key", key.secret)
    page.locator("#api-key").blur()  # a typed key is looked at when the field is left


def caption_lines(page: object) -> list[tuple[str, str, str]]:
    """(speaker, speaker colour, text) of every final on the page."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#finals li.final')].map((li) => {
            const speaker = li.querySelector('.speaker');
            return [speaker ? speaker.textContent : '', speaker ? speaker.style.getPropertyValue('--speaker-colour') : '',
                    li.querySelector('.caption-text').textContent];
        })"""
    )


def speaker_of(lines: list[tuple[str, str, str]], words: str) -> set[str]:
    """The speakers of the lines that say (most of) ``words``."""
    found = {speaker for speaker, _, text in lines if word_error_rate(words, text) <= 0.5}
    assert found, f"no caption line says {words!r}: {lines}"
    return found


@pytest.mark.usefixtures("diarizing_stream_worker")
def test_speakers_on_the_right_lines_and_an_srt_download(api, speech_worker, server: DaphneServer, open_page) -> None:
    # Given a tenant where Alice is enrolled (with her consent) and Boris is not
    key = admin_key()
    enroll_ready(api, key, ALICE)
    wait_until_announced()
    page = open_page(f"{server.url}/captions/")
    enter_key(page, key)
    # When the user turns speakers on and captions the conversation
    page.locator("#speakers-field").wait_for(state="visible", timeout=10_000)
    assert page.locator("#download-srt").is_disabled()  # nothing to download yet
    page.check("#speakers")
    page.select_option("#language", "en")
    page.click("#start")
    wait_for(lambda: "travel" in final_text(page).lower(), 45, "the last turn's caption")
    page.click("#stop")
    page.locator("#status", has_text="Stream closed").wait_for(timeout=30_000)
    lines = caption_lines(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "caption_speakers.png"), full_page=True)

    # Then Alice's lines carry her name, Boris's an anonymous label, each in its own colour
    assert speaker_of(lines, TURNS[0].text) == {"Alice"}, lines
    assert speaker_of(lines, TURNS[2].text) == {"Alice"}, lines
    [anonymous] = speaker_of(lines, TURNS[1].text)
    assert re.fullmatch(r"SPEAKER_\d+", anonymous), lines
    colours = {speaker: {colour for name, colour, _ in lines if name == speaker} for speaker in ("Alice", anonymous)}
    assert all(len(found) == 1 for found in colours.values()), colours  # stable per speaker
    assert colours["Alice"] != colours[anonymous]

    # And the session downloads as SRT: numbered cues, SRT times, the name on the right cue
    with page.expect_download() as download_info:
        page.click("#download-srt")
    download = download_info.value
    assert download.suggested_filename.endswith(".srt")
    srt = Path(download.path()).read_text(encoding="utf-8")
    (ARTIFACTS / "caption_speakers.srt").write_text(srt, encoding="utf-8")
    cues = [cue.split("\n") for cue in srt.strip().split("\n\n")]
    assert [cue[0] for cue in cues] == [str(number) for number in range(1, len(cues) + 1)], srt
    assert all(re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", cue[1]) for cue in cues), srt
    spoken = {cue[2].partition(": ")[2]: cue[2].partition(": ")[0] for cue in cues}
    assert spoken == {text: speaker for speaker, _, text in lines}, (srt, lines)
    assert speaker_of([(name, "", text) for text, name in spoken.items()], TURNS[0].text) == {"Alice"}, srt
    assert speaker_of([(name, "", text) for text, name in spoken.items()], TURNS[1].text) == {anonymous}, srt

    # And as plain text, one line per final with its time and speaker
    with page.expect_download() as download_info:
        page.click("#download-txt")
    text = Path(download_info.value.path()).read_text(encoding="utf-8").splitlines()
    assert len(text) == len(lines), text
    assert all(re.fullmatch(r"\[\d{2}:\d{2}:\d{2}\] (Alice|SPEAKER_\d+): .+", line) for line in text), text
    assert text[0].startswith("[00:00:00] Alice: "), text

    # And the same finals as WebVTT, with voice tags
    with page.expect_download() as download_info:
        page.click("#download-vtt")
    vtt = Path(download_info.value.path()).read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT\n\n")
    assert "<v Alice>" in vtt
    assert f"<v {anonymous}>" in vtt
    assert re.search(r"\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}", vtt)


def test_no_speaker_toggle_without_the_diarize_permission_and_a_refusal_is_shown(server: DaphneServer, open_page) -> None:
    # Given a viewer key (transcribe only)
    viewer = KeyFactory.issue(role=Role.TENANT_VIEWER)
    TenantPolicy.objects.create(tenant=viewer.tenant, allowed_backends="A", default_backend="A")
    page = open_page(f"{server.url}/captions/")
    with page.expect_response(lambda response: "/captions/features" in response.url):
        enter_key(page, viewer)
    # Then the page offers no speakers
    assert page.locator("#speakers-field").is_hidden()
    # When a page still offers them (the permission was withdrawn after it asked) and the user
    # starts with the language left to detection
    page.evaluate("() => { document.getElementById('speakers-field').hidden = false; }")
    page.check("#speakers")
    page.select_option("#language", "auto")
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    page.click("#start")
    # Then the refusal is explained, the toggle goes away, and Reconnect would caption without it
    message = error_text(page)
    assert "scaiecho:diarize" in message, message
    assert "Reconnect" in message, message
    assert page.locator("#error").get_attribute("data-code") == "4403"
    assert page.locator("#speakers-field").is_hidden()
    assert page.locator("#reconnect").is_visible()
    # The stream was asked for speakers and given no language hint ("auto": the backend detects it).
    assert json.loads(sent[0]) == {"type": "open", "media_type": "audio/pcm", "sample_rate": 16000, "diarize": True}
