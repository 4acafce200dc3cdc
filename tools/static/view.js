// AvatarForcing live view: one page = one session, bridged over a WebSocket (see service/view.py).
//
// Video: the session's fragmented MP4 (init segment, then one moof+mdat per frame) goes into a Media
// Source Extensions SourceBuffer. Audio: the server's re-timed audio (one PCM16 block per model block)
// plays through WebAudio, each block scheduled at the moment the video shows its first frame:
// AudioOut.start_sample / rate and VideoFrame.index / fps are the same timeline, the video element's
// currentTime is the master clock.
//
// URL parameters (for kiosks and tests): face=<image URL>, avatar=<avatar id>, wav=<WAV URL>,
// speech=mic|wav|bundled, autostart=1.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const video = $("video");

  const START_BUFFER_S = 0.25;   // start playing once this much video is buffered
  const TARGET_BUFFER_S = 0.3;   // where a live catch-up jumps to
  const MAX_BUFFER_S = 1.0;      // more than this buffered ahead: jump forward (live)
  const AUDIO_AHEAD_S = 0.6;     // schedule audio at most this far ahead of the video clock
  const SEND_AHEAD_S = 0.2;      // a WAV is sent in real time, this much ahead
  const CHUNK_S = 0.04;          // audio message size page -> server

  const view = (window.avatarView = {
    state: "idle", error: null, info: null, started: null, end: null, source: "", sampleRate: 0,
    framesReceived: 0, frameGaps: 0, lastIndex: -1, bytesReceived: 0, appendErrors: 0,
    audioBlocks: 0, audioSecondsScheduled: 0, speechSecondsScheduled: 0, audioBlocksLate: 0,
    sentSeconds: 0, avOffsetMs: null, serverStats: null, catchUps: 0,
    // Speech to screen: from a sample being spoken (captured by the microphone, or due in the WAV played out in
    // real time) to the frame that shows it being displayed; the latest value and the mean over the session.
    speechToScreenMs: null, speechToScreenMeanMs: null, speechToScreenCount: 0,
    // The same to the frame's arrival in the page: the rest of speech to screen is the page's own buffering.
    speechToPageMeanMs: null, speechToPageCount: 0,
  });
  let sentSamples = 0, sendLog = [], speechMap = [], s2sSum = 0, s2pSum = 0;

  let ws = null, mediaSource = null, sb = null, codec = "";
  let appendQueue = [];
  let audioOut = null, gain = null, mapOffset = null;
  let pendingAudio = [], scheduled = [];
  let sender = null, capture = null, ticker = null;

  // ---------------------------------------------------------------- small helpers
  function setState(state, text, isError) {
    view.state = state;
    const el = $("state");
    el.textContent = text;
    el.className = isError ? "error" : "";
  }

  function fail(message) {
    view.error = message;
    setState("error", message, true);
    teardown(false);
  }

  function b64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  async function fetchBytes(url) {
    const r = await fetch(url);
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return new Uint8Array(await r.arrayBuffer());
  }

  function supportedRates() {
    return (view.info && view.info.supported_sample_rates_hz) || [8000, 16000, 24000, 48000];
  }

  // Parses a PCM16 or float32 WAV (any channel count, mixed down to mono) into Int16 samples,
  // or returns null for anything else.
  function parseWav(bytes) {
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const tag = (o) => String.fromCharCode(bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]);
    if (bytes.length < 12 || tag(0) !== "RIFF" || tag(8) !== "WAVE") return null;
    let fmt = null, pos = 12;
    while (pos + 8 <= bytes.length) {
      const id = tag(pos), size = dv.getUint32(pos + 4, true), body = pos + 8;
      if (id === "fmt ") {
        fmt = { format: dv.getUint16(body, true), channels: dv.getUint16(body + 2, true),
                rate: dv.getUint32(body + 4, true), bits: dv.getUint16(body + 14, true) };
        if (fmt.format === 0xfffe && size >= 26) fmt.format = dv.getUint16(body + 24, true);
      } else if (id === "data" && fmt) {
        const end = Math.min(bytes.length, body + size), ch = fmt.channels;
        const width = fmt.bits / 8, frames = Math.floor((end - body) / (width * ch));
        if (!(fmt.format === 1 && fmt.bits === 16) && !(fmt.format === 3 && fmt.bits === 32)) return null;
        const out = new Int16Array(frames);
        for (let i = 0; i < frames; i++) {
          let acc = 0;
          for (let c = 0; c < ch; c++) {
            const o = body + (i * ch + c) * width;
            acc += fmt.bits === 16 ? dv.getInt16(o, true) : dv.getFloat32(o, true) * 32767;
          }
          out[i] = Math.max(-32768, Math.min(32767, Math.round(acc / ch)));
        }
        return { rate: fmt.rate, samples: out };
      }
      pos = body + size + (size & 1);
    }
    return null;
  }

  // Any audio file the browser can decode, resampled to `rate` and mixed down to mono.
  async function decodeTo(bytes, rate) {
    const ctx = new OfflineAudioContext(1, 1, rate);
    const buf = await ctx.decodeAudioData(bytes.slice().buffer);
    const out = new Int16Array(buf.length);
    for (let c = 0; c < buf.numberOfChannels; c++) {
      const d = buf.getChannelData(c);
      for (let i = 0; i < d.length; i++) out[i] += Math.round((d[i] / buf.numberOfChannels) * 32767);
    }
    return { rate, samples: out };
  }

  async function loadWav(bytes) {
    const rates = supportedRates();
    const wav = parseWav(bytes);
    if (wav && rates.includes(wav.rate)) return wav;   // sent as it is, bit for bit
    return decodeTo(bytes, rates.includes(16000) ? 16000 : rates[0]);
  }

  function toInt16(f32) {
    const out = new Int16Array(f32.length);
    for (let i = 0; i < f32.length; i++) out[i] = Math.max(-32768, Math.min(32767, Math.round(f32[i] * 32767)));
    return out;
  }

  // `spokenAt`: performance.now() time of the chunk's first sample.
  function sendPcm(int16, spokenAt) {
    if (!ws || ws.readyState !== WebSocket.OPEN || !int16.length) return;
    ws.send(int16.slice().buffer);  // PCM16 little-endian (every browser platform is little-endian)
    sendLog.push({ start: sentSamples, end: sentSamples + int16.length, at: spokenAt });
    if (sendLog.length > 2000) sendLog.splice(0, 1000);
    sentSamples += int16.length;
    view.sentSeconds = sentSamples / view.sampleRate;
  }

  // ---------------------------------------------------------------- speech sources
  function streamSamples(wav) {
    const n = wav.samples.length, chunk = Math.round(wav.rate * CHUNK_S), t0 = performance.now();
    let pos = 0;
    sender = setInterval(() => {
      const due = ((performance.now() - t0) / 1000 + SEND_AHEAD_S) * wav.rate;
      while (pos < n && pos < due) {
        sendPcm(wav.samples.subarray(pos, pos + chunk), t0 + (pos / wav.rate) * 1000);
        pos += chunk;
      }
      if (pos >= n) {
        clearInterval(sender);
        sender = null;
        if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end_of_audio" }));
      }
    }, 20);
  }

  const WORKLET = `
    class PcmCapture extends AudioWorkletProcessor {
      process(inputs) {
        const chans = inputs[0];
        if (chans && chans.length) {
          const out = new Float32Array(chans[0].length);
          for (const ch of chans) for (let i = 0; i < out.length; i++) out[i] += ch[i] / chans.length;
          this.port.postMessage(out, [out.buffer]);
        }
        return true;
      }
    }
    registerProcessor("pcm-capture", PcmCapture);`;

  // The microphone: captured in an AudioContext running at a rate the server accepts (the browser
  // resamples the device), or, where that cannot be had, at the device's rate and brought to 16 kHz
  // here by linear interpolation.
  async function openMicrophone() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia)
      throw new Error("no microphone API here: the page must be opened over https or on localhost");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const rates = supportedRates();
    const want = rates.includes(16000) ? 16000 : rates[0];
    let ctx;
    try { ctx = new AudioContext({ sampleRate: want }); } catch (e) { ctx = new AudioContext(); }
    const rate = rates.includes(ctx.sampleRate) ? ctx.sampleRate : want;
    const ratio = ctx.sampleRate / rate;
    let acc = [], accLen = 0, phase = 0, prev = 0;
    const per = Math.round(rate * CHUNK_S / 2);   // 20 ms messages
    const onSamples = (f32) => {
      if (!view.started) return;   // only once the session runs: audio sent earlier would delay all that follows
      let s = f32;
      if (ratio !== 1) {   // linear interpolation to `rate`, continuous across calls
        const out = [];
        for (; phase < f32.length; phase += ratio) {
          const i = Math.floor(phase), frac = phase - i;
          const a = i === 0 ? prev : f32[i - 1], b = f32[i];
          out.push(a + (b - a) * frac);
        }
        phase -= f32.length;
        prev = f32[f32.length - 1];
        s = Float32Array.from(out);
      }
      acc.push(toInt16(s));
      accLen += s.length;
      if (accLen >= per) {
        const all = new Int16Array(accLen);
        let o = 0;
        for (const a of acc) { all.set(a, o); o += a.length; }
        acc = []; accLen = 0;
        sendPcm(all, performance.now() - (accLen / rate) * 1000);
      }
    };
    const src = ctx.createMediaStreamSource(stream);
    let node;
    if (ctx.audioWorklet) {
      const url = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
      await ctx.audioWorklet.addModule(url);
      node = new AudioWorkletNode(ctx, "pcm-capture", { numberOfOutputs: 1, outputChannelCount: [1] });
      node.port.onmessage = (e) => onSamples(e.data);
    } else {   // older browsers
      node = ctx.createScriptProcessor(1024, 1, 1);
      node.onaudioprocess = (e) => onSamples(e.inputBuffer.getChannelData(0).slice());
    }
    const mute = ctx.createGain();
    mute.gain.value = 0;
    src.connect(node);
    node.connect(mute);
    mute.connect(ctx.destination);   // keeps the graph pulled; nothing is heard
    await ctx.resume();
    return { rate, ctx, stream };
  }

  // ---------------------------------------------------------------- video (MSE)
  function setupMedia(st) {
    if (!window.MediaSource) throw new Error("this browser has no Media Source Extensions");
    if (!MediaSource.isTypeSupported(st.codec)) throw new Error(`this browser cannot play ${st.codec}`);
    if (!mediaSource) {
      codec = st.codec;
      mediaSource = new MediaSource();
      video.src = URL.createObjectURL(mediaSource);
      mediaSource.addEventListener("sourceopen", () => {
        sb = mediaSource.addSourceBuffer(codec);
        sb.mode = "segments";
        sb.addEventListener("updateend", drainAppends);
        sb.addEventListener("error", () => { view.appendErrors++; });
        drainAppends();
      }, { once: true });
    } else if (st.codec !== codec) {
      appendQueue.push({ changeType: st.codec });
      codec = st.codec;
    }
  }

  function drainAppends() {
    if (!sb || sb.updating || mediaSource.readyState !== "open") return;
    // Keep the buffer short: everything more than 10 s behind the playhead goes.
    const b = sb.buffered;
    if (b.length && video.currentTime - b.start(0) > 20) {
      sb.remove(0, video.currentTime - 10);
      return;
    }
    const item = appendQueue.shift();
    if (!item) return;
    try {
      if (item.changeType) {
        sb.changeType(item.changeType);
        drainAppends();
        return;
      }
      if (item.offset !== undefined) sb.timestampOffset = item.offset;
      sb.appendBuffer(item.data);
    } catch (e) {
      view.appendErrors++;
      if (e.name === "QuotaExceededError") { appendQueue.unshift(item); return; }
      fail(`the video could not be appended: ${e.message}`);
    }
  }

  // Live playback: start once a little is buffered, skip holes (dropped frames), catch up when behind.
  function manageVideo() {
    const b = video.buffered;
    if (!b.length) return;
    const end = b.end(b.length - 1);
    if (video.currentTime < b.start(0)) video.currentTime = b.start(0);
    for (let i = 0; i + 1 < b.length; i++) {
      if (video.currentTime >= b.end(i) - 0.05 && video.currentTime < b.start(i + 1)) {
        video.currentTime = b.start(i + 1);
        break;
      }
    }
    const ahead = end - video.currentTime;
    if (ahead > MAX_BUFFER_S) {
      video.currentTime = end - TARGET_BUFFER_S;
      view.catchUps++;
    }
    if (video.paused && ahead >= START_BUFFER_S && view.state === "live") {
      video.play().catch((e) => setState(view.state, `press play: ${e.message}`, true));
    }
  }

  // ---------------------------------------------------------------- audio (WebAudio against the video clock)
  function queueAudio(h, payload) {
    view.audioBlocks++;
    const rate = view.started.audio_sample_rate_hz;
    // The first block holding the client's audio: its first sample is at (start + real_offset) on the timeline.
    // Where the client's samples of this block lie: timeline [s + o, s + o + n) holds samples [e - n, e).
    if (h.n > 0) {
      speechMap.push({ t0: (h.s + h.o) / rate, t1: (h.s + h.o + h.n) / rate, k0: h.e - h.n });
      if (speechMap.length > 100) speechMap.shift();
    }
    const n = payload.byteLength >> 1;
    if (!audioOut || !n) return;
    const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
    const buf = audioOut.createBuffer(1, n, rate);
    const d = buf.getChannelData(0);
    for (let i = 0; i < n; i++) d[i] = dv.getInt16(2 * i, true) / 32768;
    pendingAudio.push({ startT: h.s / rate, buffer: buf, speech: h.n / rate });
    pumpAudio();
  }

  function unschedule() {   // the video stalled or jumped: take back what was scheduled
    const now = audioOut ? audioOut.currentTime : 0;
    for (const s of scheduled) {
      try { s.src.stop(); } catch (e) { /* already stopped */ }
      if (s.when + s.item.buffer.duration > now) pendingAudio.push(s.item);
    }
    scheduled = [];
    pendingAudio.sort((a, b) => a.startT - b.startT);
    mapOffset = null;
  }

  function pumpAudio() {
    if (!audioOut) return;
    if (audioOut.state !== "running" || video.paused || video.seeking || video.readyState < 3) {
      // Not playing (yet): what the video has passed can never play.
      while (pendingAudio.length && pendingAudio[0].startT + pendingAudio[0].buffer.duration < video.currentTime)
        pendingAudio.shift();
      return;
    }
    const now = audioOut.currentTime;
    const off = now - video.currentTime;   // context time minus media time, measured now
    if (mapOffset === null || Math.abs(off - mapOffset) > 0.08) {
      if (mapOffset !== null) unschedule();
      mapOffset = off;
    } else {
      mapOffset += 0.02 * (off - mapOffset);   // smoothed: blocks stay contiguous
    }
    view.avOffsetMs = (off - mapOffset) * 1000;
    scheduled = scheduled.filter((s) => s.when + s.item.buffer.duration > now);
    while (pendingAudio.length) {
      const a = pendingAudio[0];
      const when = a.startT + mapOffset, dur = a.buffer.duration;
      if (when > now + AUDIO_AHEAD_S) break;
      pendingAudio.shift();
      if (when + dur <= now + 0.005) { view.audioBlocksLate++; continue; }
      const skip = Math.max(0, now + 0.005 - when);
      const src = audioOut.createBufferSource();
      src.buffer = a.buffer;
      src.connect(gain);
      src.start(when + skip, skip);
      scheduled.push({ src, when, item: a });
      view.audioSecondsScheduled += dur - skip;
      view.speechSecondsScheduled += Math.max(0, a.speech - skip);
    }
  }

  // When the client's sample shown at media time `t` was spoken (performance.now() time), or null for silence.
  function spokenAt(t) {
    const m = speechMap.find((e) => e.t0 <= t && t < e.t1);
    if (!m || !view.started) return null;
    const k = m.k0 + (t - m.t0) * view.started.audio_sample_rate_hz;
    const sent = sendLog.find((e) => e.start <= k && k < e.end);
    return sent ? sent.at + ((k - sent.start) / view.sampleRate) * 1000 : null;
  }

  function onVideoFrame(now, meta) {
    video.requestVideoFrameCallback(onVideoFrame);
    const at = spokenAt(meta.mediaTime);
    if (at === null) return;
    const ms = meta.expectedDisplayTime - at;
    view.speechToScreenMs = ms;
    view.speechToScreenCount++;
    s2sSum += ms;
    view.speechToScreenMeanMs = s2sSum / view.speechToScreenCount;
  }
  if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(onVideoFrame);

  for (const ev of ["waiting", "pause", "seeking"]) video.addEventListener(ev, () => { if (audioOut) unschedule(); });
  video.addEventListener("playing", pumpAudio);

  // ---------------------------------------------------------------- the bridge
  function onText(msg) {
    if (msg.type === "started") {
      const again = view.started !== null;
      view.started = msg;
      if (again) unschedule();
      try { setupMedia(msg); } catch (e) { fail(e.message); return; }
      setState("live", `live: session ${msg.session_id.slice(0, 12)}... on ${msg.node_id || "the server"}`);
      if (!again && view.startSpeech) view.startSpeech();
    } else if (msg.type === "stats") {
      view.serverStats = msg;
    } else if (msg.type === "end") {
      view.end = msg;
      setState("ended", `session ended: ${msg.reason}${msg.message ? " (" + msg.message + ")" : ""}`);
      teardown(true);
    } else if (msg.type === "error") {
      fail(`${msg.code}: ${msg.message}`);
    }
  }

  function onBinary(buf) {
    const dv = new DataView(buf);
    const kind = dv.getUint8(0), hlen = dv.getUint32(1);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 5, hlen)));
    const payload = new Uint8Array(buf, 5 + hlen);
    view.bytesReceived += buf.byteLength;
    if (kind === 1) {          // init segment: its frames' times start at first_frame_index / fps
      appendQueue.push({ data: payload, offset: header.first_frame_index / view.started.fps });
    } else if (kind === 2) {   // one frame's moof + mdat
      view.framesReceived++;
      if (view.lastIndex >= 0 && header.i > view.lastIndex + 1) view.frameGaps += header.i - view.lastIndex - 1;
      view.lastIndex = header.i;
      const at = spokenAt(header.i / view.started.fps);
      if (at !== null) {
        view.speechToPageCount++;
        s2pSum += performance.now() - at;
        view.speechToPageMeanMs = s2pSum / view.speechToPageCount;
      }
      appendQueue.push({ data: payload });
    } else if (kind === 3) {   // one block's audio
      queueAudio(header, payload);
      return;
    }
    drainAppends();
  }

  function resetMedia() {
    if (mediaSource && video.src) URL.revokeObjectURL(video.src);
    mediaSource = null; sb = null; codec = ""; appendQueue = [];
    pendingAudio = []; scheduled = []; mapOffset = null;
    if (audioOut) { audioOut.close().catch(() => {}); audioOut = null; }
  }

  async function start() {
    if (ws) return;
    resetMedia();
    Object.assign(view, { error: null, end: null, started: null, framesReceived: 0, frameGaps: 0, lastIndex: -1,
                          audioBlocks: 0, audioSecondsScheduled: 0, speechSecondsScheduled: 0, sentSeconds: 0,
                          speechToScreenMs: null, speechToScreenMeanMs: null, speechToScreenCount: 0,
                          speechToPageMeanMs: null, speechToPageCount: 0 });
    sentSamples = 0; sendLog = []; speechMap = []; s2sSum = 0; s2pSum = 0;
    setState("connecting", "connecting...");
    $("start").disabled = true;
    try {
      // WebAudio output is created inside the click (autoplay policies).
      audioOut = new AudioContext();
      gain = audioOut.createGain();
      gain.connect(audioOut.destination);
      audioOut.resume().catch(() => {});
      if (!view.info || view.info.error) view.info = await (await fetch("api/info")).json();
      const face = params.get("avatar") ? "avatar" : params.get("face") ? "url"
        : document.querySelector("input[name=face]:checked").value;
      const startMsg = { type: "start", utterance_id: "view" };
      if (face === "avatar") {
        const id = params.get("avatar") || $("avatar-id").value.trim();
        if (!id) throw new Error("type a registered avatar id");
        startMsg.avatar_id = id;
      } else if (face === "upload") {
        const f = $("face-file").files[0];
        if (!f) throw new Error("choose an image file for the face");
        startMsg.image = b64(new Uint8Array(await f.arrayBuffer()));
      } else {
        startMsg.image = b64(await fetchBytes(params.get("face") || "assets/reference_face.png"));
      }
      const speech = params.get("wav") ? "url" : params.get("speech")
        || document.querySelector("input[name=speech]:checked").value;
      if (speech === "mic") {
        capture = await openMicrophone();
        view.source = "microphone";
        view.sampleRate = capture.rate;
        view.startSpeech = null;   // the microphone streams as soon as the socket is open
      } else {
        let bytes;
        if (speech === "wav") {
          const f = $("wav-file").files[0];
          if (!f) throw new Error("choose a WAV file for the speech");
          bytes = new Uint8Array(await f.arrayBuffer());
          view.source = f.name;
        } else {
          const url = params.get("wav") || "assets/speech_16k.wav";
          bytes = await fetchBytes(url);
          view.source = url;
        }
        const wav = await loadWav(bytes);
        view.sampleRate = wav.rate;
        view.startSpeech = () => streamSamples(wav);
      }
      startMsg.sample_rate = view.sampleRate;
      const url = new URL("ws", location.href);
      url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
      ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => ws.send(JSON.stringify(startMsg));
      ws.onmessage = (e) => (typeof e.data === "string" ? onText(JSON.parse(e.data)) : onBinary(e.data));
      ws.onclose = (e) => {
        if (view.state === "connecting" || view.state === "live")
          fail(`the connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
        ws = null;
        $("start").disabled = false;
        $("interrupt").disabled = $("stop").disabled = true;
      };
      $("interrupt").disabled = $("stop").disabled = false;
      if (!ticker) ticker = setInterval(() => { manageVideo(); pumpAudio(); render(); }, 100);
    } catch (e) {
      fail(e.message || String(e));
    }
  }

  // Stops sending; `keepPlaying` lets what was received play out.
  function teardown(keepPlaying) {
    if (sender) { clearInterval(sender); sender = null; }
    if (capture) {
      capture.stream.getTracks().forEach((t) => t.stop());
      capture.ctx.close();
      capture = null;
    }
    if (ws) { const w = ws; ws = null; w.close(); }
    if (!keepPlaying) {
      video.pause();
      if (audioOut) { unschedule(); pendingAudio = []; }
    }
    $("start").disabled = false;
    $("interrupt").disabled = $("stop").disabled = true;
    render();
  }

  // ---------------------------------------------------------------- the stats table
  function render() {
    const st = view.started || {}, ss = view.serverStats || {};
    const b = video.buffered;
    const buffered = b.length ? b.end(b.length - 1) - video.currentTime : 0;
    const q = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : {};
    const rate = st.audio_sample_rate_hz || view.sampleRate || 1;
    const rows = [
      ["state", view.state],
      ["session", st.session_id ? `${st.session_id} (${st.node_id || "-"})` : "-"],
      ["video", st.width ? `${st.width}x${st.height} @ ${st.fps} fps, ${st.codec}` : "-"],
      ["latency (server)", st.latency_ms !== undefined ? `${st.latency_ms.toFixed(0)} ms (look-ahead ${st.lookahead_ms.toFixed(0)} ms)` : "-"],
      ["speech to screen", view.speechToScreenMs === null ? "-" : `${view.speechToScreenMs.toFixed(0)} ms (mean ${view.speechToScreenMeanMs.toFixed(0)} ms over ${view.speechToScreenCount} frames; expected ${(st.latency_ms + buffered * 1000).toFixed(0)} ms)`],
      ["speech to page", view.speechToPageMeanMs === null ? "-" : `${view.speechToPageMeanMs.toFixed(0)} ms mean (frames received; the rest is the page's buffer)`],
      ["frames received", `${view.framesReceived} (${view.frameGaps} missing)`],
      ["frames decoded", q.totalVideoFrames !== undefined ? `${q.totalVideoFrames} (${q.droppedVideoFrames} dropped)` : "-"],
      ["video time", `${video.currentTime.toFixed(2)} s`],
      ["buffered", `${buffered.toFixed(2)} s`],
      ["speech sent", `${view.sentSeconds.toFixed(2)} s (${view.source || "-"}, ${view.sampleRate || "-"} Hz)`],
      ["audio played", `${view.audioSecondsScheduled.toFixed(2)} s, speech ${view.speechSecondsScheduled.toFixed(2)} s, ${view.audioBlocksLate} late blocks`],
      ["a/v clock jitter", view.avOffsetMs === null ? "-" : `${view.avOffsetMs.toFixed(1)} ms`],
      ["server: frames sent", ss.frames_sent !== undefined ? `${ss.frames_sent} (${ss.frames_dropped} dropped, queue ${ss.queue_depth})` : "-"],
      ["server: audio in", ss.audio_samples_received !== undefined ? `${(ss.audio_samples_received / rate).toFixed(2)} s (${(ss.silence_samples_inserted / rate).toFixed(2)} s silence inserted)` : "-"],
      ["server: anchor similarity", ss.anchor_similarity !== undefined ? ss.anchor_similarity.toFixed(3) : "-"],
      ["end", view.end ? `${view.end.reason} ${view.end.message || ""}` : view.error || "-"],
    ];
    const table = $("stats");
    table.replaceChildren(...rows.map(([k, v]) => {
      const tr = document.createElement("tr");
      for (const text of [k, v]) { const td = document.createElement("td"); td.textContent = text; tr.appendChild(td); }
      return tr;
    }));
  }

  $("start").addEventListener("click", start);
  // Autoplay policies may hold the audio until the person interacts with the page.
  document.addEventListener("click", () => { if (audioOut && audioOut.state === "suspended") audioOut.resume(); });
  $("stop").addEventListener("click", () => { setState("stopped", "stopped"); teardown(false); });
  $("interrupt").addEventListener("click", () => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "interrupt" }));
    if (sender) { clearInterval(sender); sender = null; }
  });
  view.start = start;
  fetch("api/info").then((r) => r.json()).then((info) => {
    view.info = info;
    if (info.error && view.state === "idle")
      setState("idle", `the server does not answer yet: ${info.error.code}: ${info.error.message}`, true);
  }).catch(() => {});
  if (params.get("speech")) {
    const r = document.querySelector(`input[name=speech][value=${params.get("speech")}]`);
    if (r) r.checked = true;
  }
  render();
  if (params.get("autostart") === "1") start();
})();
