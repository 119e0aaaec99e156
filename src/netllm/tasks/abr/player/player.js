// A dash.js 5 player whose ABR decisions come from `netllm serve` (one request per chunk),
// with BBA in the page when the server does not answer. Query parameters:
//   mode=netllm|bba|dashjs   who picks the levels (dashjs: its own default rules)
//   abr=URL                  netllm serve (mode=netllm)
//   policy_chunks=48         the video length the policy is told ("chunks left" offset for clips)
// Every chunk's level, bytes, download time, stall and buffer are logged; at the end the
// log is posted to /log on this origin.
(function () {
  'use strict';
  const params = new URLSearchParams(location.search);
  const mode = params.get('mode') || 'netllm';
  const abrUrl = params.get('abr') || 'http://127.0.0.1:8333';
  const policyChunks = parseInt(params.get('policy_chunks') || '48', 10);
  const statusEl = document.getElementById('status');
  const BITRATES_KBPS = [300, 750, 1200, 1850, 2850, 4300];

  function syncJson(method, url, body) {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url, false);  // the rules loop is synchronous: so is this request
    if (body !== undefined) xhr.setRequestHeader('Content-Type', 'application/json');
    xhr.send(body === undefined ? null : JSON.stringify(body));
    if (xhr.status < 200 || xhr.status >= 300) {
      const err = new Error('HTTP ' + xhr.status + ' ' + xhr.responseText);
      err.status = xhr.status;
      throw err;
    }
    return xhr.responseText ? JSON.parse(xhr.responseText) : null;
  }

  const sizes = syncJson('GET', '/video/sizes.json').sizes_bytes;  // [level][chunk]
  const numChunks = sizes[0].length;
  const chunks = [];      // one entry per downloaded media segment, in order
  const decisions = [];   // decisions[i]: how chunk i's level was chosen
  const errors = [];
  let session = null;
  let stallMs = 0, stallSince = performance.now(), stalledBefore = 0;  // start-up counts as a stall

  function bba(bufferS) {
    if (bufferS < 5) return 0;
    if (bufferS >= 15) return 5;
    return Math.floor(5 * (bufferS - 5) / 10);
  }

  function stallNow() {
    return stallMs + (stallSince === null ? 0 : performance.now() - stallSince);
  }

  function openSession() {
    session = syncJson('POST', abrUrl + '/v1/abr/sessions').session_id;
  }

  // the level of chunk `index` (>= 1), from the measurements of chunk index - 1
  function decide(index, bufferS) {
    const last = chunks[index - 1];
    if (mode === 'bba') return {level: bba(bufferS), source: 'bba'};
    const obs = {
      last_level: last.level, buffer_s: bufferS, rebuffer_s: last.stall_s,
      last_chunk_bytes: last.bytes, download_ms: Math.max(last.download_ms, 0.001),
      next_chunk_bytes: sizes.map(function (s) { return s[Math.min(index, numChunks - 1)]; }),
      chunks_left: Math.max(policyChunks - index, 0),
    };
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        if (session === null) openSession();
        const r = syncJson('POST', abrUrl + '/v1/abr/sessions/' + session + '/decide', obs);
        return {level: r.level, source: r.source, latency_ms: r.latency_ms};
      } catch (e) {
        errors.push({chunk: index, error: String(e.message || e)});
        if (e.status === 404) { session = null; continue; }  // the server restarted: a new session
        session = e.status ? session : null;
        break;
      }
    }
    return {level: bba(bufferS), source: 'page-fallback'};
  }

  const player = dashjs.MediaPlayer().create();
  const settings = {streaming: {
    buffer: {bufferTimeDefault: 60, bufferTimeAtTopQuality: 60, bufferTimeAtTopQualityLongForm: 60,
             fastSwitchEnabled: false},
    abr: {initialBitrate: {video: 300}, autoSwitchBitrate: {video: true}},
  }};
  if (mode !== 'dashjs') {
    settings.streaming.abr.rules = {
      throughputRule: {active: false}, bolaRule: {active: false}, insufficientBufferRule: {active: false},
      switchHistoryRule: {active: false}, droppedFramesRule: {active: false},
      abandonRequestsRule: {active: false}, l2ARule: {active: false}, loLPRule: {active: false},
    };
  }
  player.updateSettings(settings);

  if (mode !== 'dashjs') {
    const NetLLMRule = function () {
      const context = this.context;
      const SwitchRequest = dashjs.FactoryMaker.getClassFactoryByName('SwitchRequest');
      function getSwitchRequest(rulesContext) {
        try {
          return switchRequest(rulesContext);
        } catch (e) {
          errors.push({error: 'rule: ' + String(e && e.stack || e)});
          return SwitchRequest(context).create();
        }
      }
      function switchRequest(rulesContext) {
        const request = SwitchRequest(context).create();
        const mediaInfo = rulesContext.getMediaInfo();
        if (!mediaInfo || mediaInfo.type !== 'video') return request;
        const index = chunks.length;  // the chunk about to be requested
        if (decisions[index] === undefined) {
          if (index === 0) {
            decisions[0] = {level: 0, source: 'start'};  // as the simulator: chunk 0 at the lowest level
          } else {
            const bufferS = player.getDashMetrics().getCurrentBufferLevel('video') || 0;
            decisions[index] = Object.assign(decide(index, bufferS), {buffer_s: bufferS});
          }
        }
        const reps = rulesContext.getAbrController().getPossibleVoRepresentations(mediaInfo, true);
        const wanted = decisions[index].level;
        request.representation = reps.find(function (r) { return String(r.id) === String(wanted); }) ||
          reps[Math.min(wanted, reps.length - 1)];
        request.priority = SwitchRequest.PRIORITY.STRONG;
        request.reason = {rule: 'NetLLMRule', source: decisions[index].source};
        return request;
      }
      return {getSwitchRequest: getSwitchRequest, reset: function () {}};
    };
    NetLLMRule.__dashjs_factory_name = 'NetLLMRule';
    player.addABRCustomRule('qualitySwitchRules', 'NetLLMRule', dashjs.FactoryMaker.getClassFactory(NetLLMRule));
  }

  const E = dashjs.MediaPlayer.events;
  player.on(E.FRAGMENT_LOADING_COMPLETED, function (e) {
    const r = e.request || {};
    if (r.mediaType !== 'video' || r.type !== 'MediaSegment') return;
    const rep = r.representation || {};
    const id = rep.id !== undefined ? rep.id : r.representationId;
    let level = BITRATES_KBPS.indexOf(Math.round((rep.bandwidth || 0) / 1000));
    if (id !== undefined && !isNaN(parseInt(id, 10))) level = parseInt(id, 10);
    const start = r.startDate ? new Date(r.startDate).getTime() : NaN;
    const end = r.endDate ? new Date(r.endDate).getTime() : NaN;
    const stall = stallNow();
    chunks.push({index: chunks.length, segment: r.index, level: level, bytes: r.bytesLoaded || 0,
                 download_ms: end - start, stall_s: (stall - stalledBefore) / 1000,
                 buffer_s: player.getDashMetrics().getCurrentBufferLevel('video') || 0,
                 t_ms: performance.now()});
    stalledBefore = stall;
    statusEl.textContent = 'chunks ' + chunks.length + '/' + numChunks;
  });
  player.on(E.PLAYBACK_WAITING, function () { if (stallSince === null) stallSince = performance.now(); });
  player.on(E.PLAYBACK_PLAYING, function () {
    if (stallSince !== null) { stallMs += performance.now() - stallSince; stallSince = null; }
  });
  let done = false;
  function finish(reason) {
    if (done) return;
    done = true;
    const body = {mode: mode, reason: reason, chunks: chunks, decisions: decisions, errors: errors,
                  num_chunks: numChunks, stall_s: stallNow() / 1000, user_agent: navigator.userAgent};
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/log', false);
    xhr.setRequestHeader('Content-Type', 'application/json');
    xhr.send(JSON.stringify(body));
    statusEl.textContent = 'done: ' + reason;
  }
  player.on(E.PLAYBACK_ENDED, function () { finish('ended'); });
  player.on(E.ERROR, function (e) { errors.push({error: 'player: ' + JSON.stringify(e.error || e)}); });
  player.initialize(document.getElementById('video'), '/video/manifest.mpd', true);
  player.setMute(true);
})();
