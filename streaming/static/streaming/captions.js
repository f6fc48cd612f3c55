/* ScaiEcho live captions: microphone or file audio → 16 kHz s16le PCM over the stream WebSocket
 * (contract §4) → partial (tentative) and final (settled) captions, optionally with who spoke
 * each final, and the session's finals as text, SRT or WebVTT. No dependencies. */
(() => {
  "use strict";

  const app = document.getElementById("app");
  const STREAM_PATH = app.dataset.streamPath;
  const RATE = Number(app.dataset.sampleRate) || 16000;
  const WORKLET_URL = app.dataset.workletUrl;
  const TOKEN_URL = app.dataset.tokenUrl;
  const FEATURES_URL = app.dataset.featuresUrl;
  const KEY_PREFIX = "sgk_";
  const FRAME_MS = 100;
  const REMEMBER_KEY = "scaiecho.captions.apiKey";

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("setup"), key: $("api-key"), keyField: $("key-field"), remember: $("remember"),
    tokenNote: $("token-note"), language: $("language"), start: $("start"), stop: $("stop"),
    reconnect: $("reconnect"), file: $("audio-file"), streamFile: $("stream-file"),
    status: $("status"), error: $("error"), finals: $("finals"), partial: $("partial"),
    speakersField: $("speakers-field"), speakers: $("speakers"),
    downloads: [$("download-txt"), $("download-srt"), $("download-vtt")],
  };
  // Speaker colours by first appearance in a session (distinct in light and dark themes).
  const SPEAKER_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#e07b00", "#17becf", "#e377c2", "#8c6d31"];

  const CLOSE_MESSAGES = {
    4401: "The API key or caption link was not accepted: it is wrong, expired or revoked. Paste a valid key and try again.",
    4403: "This key is not allowed to transcribe live audio (permission denied). Ask a tenant admin for access.",
    4400: "The server rejected a message from this page (protocol error).",
    4408: "The stream was closed because no audio arrived for too long (idle timeout). Press Reconnect to continue.",
    4413: "An audio frame was too large for the server.",
    4429: "The usage budget or the limit of concurrent streams was reached. Try again later.",
    4502: "The speech backend is unavailable right now. Press Reconnect to try again in a moment.",
  };

  // --- credentials: a caption token from the link, or a pasted key ----------------------------
  let linkToken = null;
  (() => {
    const fromHash = new URLSearchParams(location.hash.replace(/^#/, "")).get("token");
    const fromQuery = new URLSearchParams(location.search).get("token");
    linkToken = fromHash || fromQuery;
    if (linkToken && linkToken.startsWith(KEY_PREFIX)) {
      // A key pasted into a link: use it like a typed key (traded for a caption token), but get
      // it out of the address bar at once.
      history.replaceState(null, "", location.pathname);
      ui.key.value = linkToken;
      linkToken = null;
    } else if (linkToken) {
      // Keep the token out of the address bar (history, screenshots, shared screens).
      history.replaceState(null, "", location.pathname);
      ui.keyField.hidden = true;
      ui.tokenNote.hidden = false;
      setStatus("Signed in with a caption link. Choose a language and press Start.");
    } else {
      const remembered = sessionStorage.getItem(REMEMBER_KEY);
      if (remembered) {
        ui.key.value = remembered;
        ui.remember.checked = true;
      }
    }
  })();

  ui.remember.addEventListener("change", () => {
    if (!ui.remember.checked) sessionStorage.removeItem(REMEMBER_KEY);
  });

  // --- what this key may do: the speaker toggle appears only where diarization is allowed ----
  let featuresAsked = 0;
  let featuresFor = null;
  async function loadFeatures(credentialValue) {
    if (credentialValue === featuresFor) return; // asked already: keep the user's choice
    featuresFor = credentialValue;
    const asked = ++featuresAsked;
    if (!credentialValue) {
      showSpeakerToggle(false);
      return;
    }
    let features = null;
    try {
      const response = await fetch(FEATURES_URL, {
        headers: { Authorization: `Bearer ${credentialValue}` }, credentials: "omit", cache: "no-store",
      });
      const body = await response.json();
      if (response.ok && body && body.data) features = body.data;
    } catch { /* unreachable or not JSON: no speaker toggle; Start reports what is wrong */ }
    if (asked !== featuresAsked) return; // the key changed meanwhile
    showSpeakerToggle(Boolean(features && features.diarize));
  }

  function showSpeakerToggle(allowed) {
    ui.speakersField.hidden = !allowed;
    if (!allowed) ui.speakers.checked = false;
  }

  function forgetFeatures() {
    featuresFor = null;
    showSpeakerToggle(false);
  }

  ui.key.addEventListener("change", () => loadFeatures(ui.key.value.trim()));
  loadFeatures(linkToken || ui.key.value.trim());

  // The key never goes into a URL: it is traded over POST (in the Authorization header) for a
  // short-lived caption token, and the WebSocket URL carries that token instead.
  async function streamToken(credentialValue) {
    if (!credentialValue.startsWith(KEY_PREFIX)) return credentialValue; // already a caption token
    let response;
    try {
      response = await fetch(TOKEN_URL, {
        method: "POST",
        headers: { Authorization: `Bearer ${credentialValue}`, "Content-Type": "application/json" },
        body: "{}",
        credentials: "omit",
        cache: "no-store",
      });
    } catch (err) {
      throw Object.assign(new Error("The server could not be reached. Press Reconnect to try again."), { code: 0 });
    }
    let body = null;
    try { body = await response.json(); } catch { /* not JSON: described by the status below */ }
    if (response.ok && body && body.data && body.data.token) return body.data.token;
    const error = (body && body.error) || {};
    // The same refusals as the WebSocket's, so the same messages: 401 → 4401, 403 → 4403, 429 → 4429.
    const code = { 401: 4401, 403: 4403, 429: 4429 }[response.status] || 0;
    let message = CLOSE_MESSAGES[code] || `The key could not be exchanged for a caption token (HTTP ${response.status}).`;
    if (response.status === 429 && error.retry_after) message += ` Retry in ${error.retry_after} s.`;
    if (error.message && response.status !== 401) message += ` Server said: ${error.message}`;
    throw Object.assign(new Error(message), { code });
  }

  function credential() {
    if (linkToken) return linkToken;
    const key = ui.key.value.trim();
    if (ui.remember.checked && key) sessionStorage.setItem(REMEMBER_KEY, key);
    else sessionStorage.removeItem(REMEMBER_KEY);
    return key;
  }

  // --- status, errors and captions ---------------------------------------------------------
  function setStatus(text) { ui.status.textContent = text; }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  function mmss(seconds) {
    const total = Math.max(0, Math.floor(Number(seconds) || 0));
    return `${String(Math.floor(total / 60)).padStart(2, "0")}:${String(total % 60).padStart(2, "0")}`;
  }

  // The finals of the current session, as the downloads write them.
  let transcript = [];
  let speakerColours = new Map();

  function resetTranscript() {
    transcript = [];
    speakerColours = new Map();
    ui.downloads.forEach((button) => { button.disabled = true; });
  }

  function speakerColour(label) {
    if (!speakerColours.has(label)) {
      speakerColours.set(label, SPEAKER_COLOURS[speakerColours.size % SPEAKER_COLOURS.length]);
    }
    return speakerColours.get(label);
  }

  function addFinal(delta, withSpeakers) {
    const text = (delta.text || "").trim();
    if (!text) return;
    const speaker = withSpeakers && delta.speaker_label ? String(delta.speaker_label) : null;
    const start = Math.max(0, Number(delta.start) || 0);
    transcript.push({ start, end: Math.max(start, Number(delta.end) || start), text, speaker });
    ui.downloads.forEach((button) => { button.disabled = false; });
    const item = document.createElement("li");
    item.className = "final";
    const time = document.createElement("time");
    time.textContent = mmss(start);
    time.dateTime = `PT${start.toFixed(1)}S`;
    item.append(time);
    if (speaker) {
      const name = document.createElement("span");
      name.className = "speaker";
      name.textContent = speaker;
      name.style.setProperty("--speaker-colour", speakerColour(speaker));
      if (delta.speaker_id) name.dataset.speakerId = delta.speaker_id;
      item.dataset.speaker = speaker;
      item.append(name);
    }
    const span = document.createElement("span");
    span.className = "caption-text";
    span.textContent = text;
    item.append(span);
    ui.finals.append(item);
    item.scrollIntoView({ block: "nearest" });
  }

  // --- downloads: built here from the finals, nothing is sent anywhere -----------------------
  function clock(seconds, separator) {
    const ms = Math.round(Math.max(0, seconds) * 1000);
    const hh = String(Math.floor(ms / 3600000)).padStart(2, "0");
    const mm = String(Math.floor(ms / 60000) % 60).padStart(2, "0");
    const ss = String(Math.floor(ms / 1000) % 60).padStart(2, "0");
    return `${hh}:${mm}:${ss}${separator}${String(ms % 1000).padStart(3, "0")}`;
  }

  // A cue's end after its start, whatever the backend's rounding said.
  const cueEnd = (line) => Math.max(line.end, line.start + 0.001);
  // "-->" would end a cue's timing line early in a player; a blank line would end the cue.
  const cueText = (text) => text.replace(/-->/g, "->").replace(/\s*\n\s*/g, " ");

  const FORMATS = {
    txt: {
      type: "text/plain",
      build: (lines) => lines.map((line) => `[${clock(line.start, ".").slice(0, 8)}] ${line.speaker ? `${line.speaker}: ` : ""}${line.text}`).join("\n") + "\n",
    },
    srt: {
      type: "application/x-subrip",
      build: (lines) => lines.map((line, index) => [
        String(index + 1),
        `${clock(line.start, ",")} --> ${clock(cueEnd(line), ",")}`,
        (line.speaker ? `${line.speaker}: ` : "") + cueText(line.text),
      ].join("\n")).join("\n\n") + "\n",
    },
    vtt: {
      type: "text/vtt",
      build: (lines) => "WEBVTT\n\n" + lines.map((line, index) => [
        String(index + 1),
        `${clock(line.start, ".")} --> ${clock(cueEnd(line), ".")}`,
        (line.speaker ? `<v ${vttEscape(line.speaker)}>` : "") + vttEscape(cueText(line.text)),
      ].join("\n")).join("\n\n") + "\n",
    },
  };

  function vttEscape(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function download(format) {
    if (!transcript.length) return;
    const { type, build } = FORMATS[format];
    const blob = new Blob([build(transcript)], { type: `${type};charset=utf-8` });
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
    link.href = url;
    link.download = `captions-${stamp}.${format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  ui.downloads.forEach((button) => button.addEventListener("click", () => download(button.dataset.format)));

  function addNotice(text) {
    const item = document.createElement("li");
    item.className = "notice";
    item.textContent = text;
    ui.finals.append(item);
  }

  function setPartial(text) { ui.partial.textContent = text || ""; }

  function setRunning(running) {
    ui.start.disabled = running;
    ui.streamFile.disabled = running;
    ui.stop.disabled = !running;
    ui.key.disabled = running;
    ui.language.disabled = running;
    ui.speakers.disabled = running;
    if (running) ui.reconnect.hidden = true;
  }

  // --- one session -------------------------------------------------------------------------
  let session = null;
  let lastSource = null;

  class Session {
    constructor(source) {
      this.source = source; // {kind: "mic"} or {kind: "file", file}
      this.ws = null;
      this.ready = false;
      this.queue = [];
      this.stopping = false;
      this.closedFrame = false;
      this.lastError = null;
      this.ended = false;
      this.cleanups = [];
      // Asked for once, at open: the toggle is locked while the session runs.
      this.diarize = !ui.speakersField.hidden && ui.speakers.checked;
    }

    async start() {
      const token = credential();
      if (!token) {
        this.fail("Paste an API key first (or open the page from a caption link).");
        return;
      }
      setRunning(true);
      clearError();
      setPartial("");
      resetTranscript();
      try {
        if (this.source.kind === "mic") await this.openMicrophone();
        else await this.decodeFile();
      } catch (err) {
        this.fail(describeAudioError(err, this.source.kind));
        return;
      }
      if (this.ended) return;
      let streamCredential;
      try {
        setStatus("Signing in…");
        streamCredential = await streamToken(token);
      } catch (err) {
        this.fail(err.message, err.code);
        return;
      }
      if (this.ended) return;
      this.connect(streamCredential);
    }

    connect(token) {
      setStatus("Connecting…");
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${scheme}//${location.host}${STREAM_PATH}?token=${encodeURIComponent(token)}`);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.addEventListener("open", () => {
        const open = { type: "open", media_type: "audio/pcm", sample_rate: RATE, diarize: this.diarize };
        // "auto": no hint, the backend detects the language.
        if (ui.language.value && ui.language.value !== "auto") open.language_hint = ui.language.value;
        ws.send(JSON.stringify(open));
      });
      ws.addEventListener("message", (event) => this.onMessage(event));
      ws.addEventListener("close", (event) => this.onClose(event));
    }

    onMessage(event) {
      if (typeof event.data !== "string") return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.type === "ready") {
        this.ready = true;
        setStatus(this.source.kind === "mic" ? "Listening — speak now." : `Captioning ${this.source.file.name}…`);
        for (const chunk of this.queue) this.ws.send(chunk);
        this.queue = [];
        if (this.source.kind === "file") this.pumpFile();
      } else if (frame.type === "delta") {
        if (frame.is_final) {
          setPartial("");
          addFinal(frame, this.diarize);
        } else {
          setPartial(frame.text);
        }
      } else if (frame.type === "closed") {
        this.closedFrame = true;
      } else if (frame.type === "error") {
        this.lastError = frame;
      }
    }

    onClose(event) {
      setPartial("");
      this.release();
      if (event.code === 1000 && (this.closedFrame || this.stopping)) {
        this.finish("Stream closed");
        return;
      }
      let known = CLOSE_MESSAGES[event.code];
      if (event.code === 4403 && this.diarize && this.lastError && /diarize/.test(this.lastError.message || "")) {
        // The key lost (or never had) the diarize permission since the page asked: say so, and
        // take the toggle away so that Reconnect captions without speakers.
        known = "This key may not show who is speaking (it lacks the permission scaiecho:diarize). The speaker option was turned off: press Reconnect to caption without speakers, or ask a tenant admin for the permission.";
        forgetFeatures();
        this.lastError = null;
      }
      let message = known || `The connection closed unexpectedly (code ${event.code}). Press Reconnect to try again.`;
      if (this.lastError && this.lastError.message && event.code !== 4401) {
        message += ` Server said: ${this.lastError.message}`;
      }
      this.fail(message, event.code);
    }

    send(chunk) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      if (this.ready) this.ws.send(chunk);
      else if (this.queue.length < 50) this.queue.push(chunk); // up to 5 s while the server gets ready
    }

    // Microphone: getUserMedia → AudioWorklet (resample to 16 kHz s16 mono, 100 ms frames).
    async openMicrophone() {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw Object.assign(new Error("no getUserMedia"), { name: "NotSupportedError" });
      }
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      this.cleanups.push(() => stream.getTracks().forEach((track) => track.stop()));
      const ctx = new AudioContext();
      this.cleanups.push(() => ctx.close());
      await ctx.audioWorklet.addModule(WORKLET_URL);
      const node = new AudioWorkletNode(ctx, "pcm-worklet", {
        numberOfInputs: 1, numberOfOutputs: 0, processorOptions: { targetRate: RATE, frameMs: FRAME_MS },
      });
      node.port.onmessage = (event) => { if (!this.closeSent) this.send(event.data); };
      ctx.createMediaStreamSource(stream).connect(node);
      await ctx.resume();
      this.worklet = node;
      this.cleanups.push(() => node.port.postMessage("stop"));
    }

    // File: decodeAudioData → 16 kHz mono (OfflineAudioContext) → s16 frames at real-time pace.
    async decodeFile() {
      setStatus(`Decoding ${this.source.file.name}…`);
      const ctx = new AudioContext();
      this.cleanups.push(() => ctx.close());
      this.playback = ctx;
      const decoded = await ctx.decodeAudioData(await this.source.file.arrayBuffer());
      this.decoded = decoded;
      const length = Math.max(1, Math.ceil(decoded.duration * RATE));
      const offline = new OfflineAudioContext(1, length, RATE);
      const src = offline.createBufferSource();
      src.buffer = decoded;
      src.connect(offline.destination);
      src.start();
      const rendered = await offline.startRendering();
      this.pcm = floatToS16(rendered.getChannelData(0));
    }

    pumpFile() {
      const frame = Math.round(RATE * FRAME_MS / 1000);
      const total = this.pcm.length;
      let offset = 0;
      // Play it too, so captions appear as it is heard.
      const play = this.playback.createBufferSource();
      play.buffer = this.decoded;
      play.connect(this.playback.destination);
      play.start();
      this.cleanups.push(() => { try { play.stop(); } catch { /* already ended */ } });
      const t0 = performance.now();
      const tick = () => {
        if (this.ended || this.stopping) return;
        // Send every frame whose time has come (absolute schedule: timer jitter does not drift).
        const due = Math.min(total, Math.floor(((performance.now() - t0) / 1000 + FRAME_MS / 1000) * RATE));
        while (offset < due) {
          const end = Math.min(total, offset + frame);
          this.send(this.pcm.slice(offset, end).buffer);
          offset = end;
        }
        if (offset >= total) {
          setStatus("File sent; waiting for the last captions…");
          this.closeSent = true;
          this.stopping = true;
          this.ws.send(JSON.stringify({ type: "close" }));
          ui.stop.disabled = true;
          return;
        }
        this.timer = setTimeout(tick, FRAME_MS / 2);
      };
      tick();
      this.cleanups.push(() => clearTimeout(this.timer));
    }

    stop() {
      if (this.stopping || this.ended) return;
      this.stopping = true;
      ui.stop.disabled = true;
      if (this.worklet) this.worklet.port.postMessage("stop"); // posts the last partial frame
      if (this.ws && this.ws.readyState === WebSocket.OPEN) {
        setStatus("Stopping — finishing the last captions…");
        // Let the worklet's last frame arrive, then ask for the remaining finals and `closed`.
        setTimeout(() => {
          this.closeSent = true;
          if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "close" }));
          this.release();
        }, 60);
      } else {
        if (this.ws) this.ws.close();
        this.release();
        this.finish("Stream closed");
      }
    }

    release() {
      // Stop capturing and playing; the socket stays open until the server's `closed`.
      const cleanups = this.cleanups;
      this.cleanups = [];
      cleanups.forEach((fn) => { try { fn(); } catch { /* already stopped */ } });
    }

    finish(text) {
      if (this.ended) return;
      this.ended = true;
      setStatus(text);
      addNotice(text);
      setRunning(false);
      if (session === this) session = null;
    }

    fail(message, code) {
      if (this.ended) return;
      this.ended = true;
      this.release();
      if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close();
      showError(message);
      setStatus("Stopped.");
      setRunning(false);
      ui.reconnect.hidden = false;
      if (code) ui.error.dataset.code = String(code);
      else delete ui.error.dataset.code;
      if (session === this) session = null;
    }
  }

  function floatToS16(samples) {
    const out = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      const v = Math.max(-1, Math.min(1, samples[i]));
      out[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
    }
    return out;
  }

  function describeAudioError(err, kind) {
    const name = err && err.name;
    if (kind === "file") {
      return `The audio file could not be decoded (${(err && err.message) || name || "unknown error"}). Try a WAV, MP3, OGG or M4A file.`;
    }
    if (name === "NotAllowedError" || name === "SecurityError") {
      return "Microphone access was denied. Allow this site to use the microphone (the icon in the address bar), then press Reconnect.";
    }
    if (name === "NotFoundError" || name === "OverconstrainedError") {
      return "No microphone was found. Connect one, or stream an audio file instead.";
    }
    if (name === "NotReadableError") {
      return "The microphone is in use by another application or could not be started.";
    }
    if (name === "NotSupportedError") {
      return "This browser cannot capture audio here (it needs a secure https:// page).";
    }
    return `The microphone could not be started: ${(err && err.message) || name}.`;
  }

  function begin(source) {
    if (session) return;
    lastSource = source;
    session = new Session(source);
    session.start();
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    begin({ kind: "mic" });
  });
  ui.streamFile.addEventListener("click", () => {
    const file = ui.file.files && ui.file.files[0];
    if (!file) {
      showError("Choose an audio file first.");
      return;
    }
    begin({ kind: "file", file });
  });
  ui.stop.addEventListener("click", () => { if (session) session.stop(); });
  ui.reconnect.addEventListener("click", () => begin(lastSource || { kind: "mic" }));
})();
