/* AudioWorklet: microphone audio (any context rate, any channel count) → 16 kHz mono s16le PCM,
 * posted to the page in ~100 ms frames (ArrayBuffer, transferred).
 *
 * Resampling is linear interpolation at a non-integer ratio (44.1 kHz → 16 kHz is 2.75625:1),
 * with its state (the fractional read position and the last input sample) carried across the
 * 128-sample render quanta, so block edges add no clicks and no drift. Input is low-passed first
 * (one pole near 7 kHz), which takes the edge off aliasing; speech recognition needs no more. */
class PcmWorklet extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    this.frameSamples = Math.round(this.outRate * (opts.frameMs || 100) / 1000);
    this.step = sampleRate / this.outRate; // input samples per output sample (> 1)
    this.pos = 1; // read position of the next output sample in the sequence prev, block[...]
    this.prev = 0; // last input sample of the previous block
    this.lp = 0; // low-pass state
    this.alpha = Math.min(1, (2 * Math.PI * (this.outRate * 0.45)) / sampleRate);
    this.out = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.flush();
      } else if (event.data === "stop") {
        this.flush();
        this.running = false;
      }
    };
  }

  flush() {
    if (this.filled > 0) {
      const frame = this.out.slice(0, this.filled);
      this.port.postMessage(frame.buffer, [frame.buffer]);
      this.filled = 0;
    }
  }

  push(value) {
    const clamped = value > 1 ? 1 : value < -1 ? -1 : value;
    this.out[this.filled++] = clamped < 0 ? clamped * 0x8000 : clamped * 0x7fff;
    if (this.filled === this.frameSamples) {
      this.port.postMessage(this.out.buffer, [this.out.buffer]);
      this.out = new Int16Array(this.frameSamples);
      this.filled = 0;
    }
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;
    const channels = input.length;
    const length = input[0].length;
    // Down-mix to mono and low-pass in place into a scratch block.
    if (!this.block || this.block.length !== length) this.block = new Float32Array(length);
    const block = this.block;
    for (let i = 0; i < length; i++) {
      let sum = 0;
      for (let c = 0; c < channels; c++) sum += input[c][i];
      this.lp += this.alpha * (sum / channels - this.lp);
      block[i] = this.lp;
    }
    // Interpolate on the sequence prev, block[0..length-1]: position p reads between
    // seq[floor(p)] and seq[floor(p)+1], where seq[0] = prev and seq[k] = block[k-1].
    let pos = this.pos;
    while (pos < length) {
      const base = Math.floor(pos);
      const frac = pos - base;
      const a = base - 1 < 0 ? this.prev : block[base - 1];
      const b = block[base];
      this.push(a + (b - a) * frac);
      pos += this.step;
    }
    this.pos = pos - length;
    this.prev = block[length - 1];
    return true;
  }
}

registerProcessor("pcm-worklet", PcmWorklet);
