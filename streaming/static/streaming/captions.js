/* ScaiEcho live captions: microphone or file audio → 16 kHz s16le PCM over the stream WebSocket
 * (contract §4) → partial (tentative) and final (settled) captions. No dependencies. */
(() => {
  "use strict";

  const app = document.getElementById("app");
  const STREAM_PATH = app.dataset.streamPath;
  const RATE = Number(app.dataset.sampleRate) || 16000;
  const WORKLET_URL = app.dataset.workletUrl;
  const FRAME_MS = 100;
  const REMEMBER_KEY = "scaiecho.captions.apiKey";

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("setup"), key: $("api-key"), keyField: $("key-field"), remember: $("remember"),
    tokenNote: $("token-note"), language: $("language"), start: $("start"), stop: $("stop"),
    reconnect: $("reconnect"), file: $("audio-file"), streamFile: $("stream-file"),
    status: $("status"), error: $("error"), finals: $("finals"), partial: $("partial"),
  };

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
    if (linkToken) {
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

  function addFinal(delta) {
    const text = (delta.text || "").trim();
    if (!text) return;
    const item = document.createElement("li");
    item.className = "final";
    const time = document.createElement("time");
    time.textContent = mmss(delta.start);
    time.dateTime = `PT${Math.max(0, Number(delta.start) || 0).toFixed(1)}S`;
    const span = document.createElement("span");
    span.className = "caption-text";
    span.textContent = text;
    item.append(time, span);
    ui.finals.append(item);
    item.scrollIntoView({ block: "nearest" });
  }

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
      try {
        if (this.source.kind === "mic") await this.openMicrophone();
        else await this.decodeFile();
      } catch (err) {
        this.fail(describeAudioError(err, this.source.kind));
        return;
      }
      if (this.ended) return;
      this.connect(token);
    }

    connect(token) {
      setStatus("Connecting…");
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${scheme}//${location.host}${STREAM_PATH}?token=${encodeURIComponent(token)}`);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.addEventListener("open", () => {
        ws.send(JSON.stringify({
          type: "open", language_hint: ui.language.value || "en", media_type: "audio/pcm", sample_rate: RATE,
        }));
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
          addFinal(frame);
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
      const known = CLOSE_MESSAGES[event.code];
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
