/*! taskwire <taskwire-progress>: live task progress for any page. docs/embedding.md */
// No framework, no build step. Speaks the client protocol of
// docs/protocol.md (sections 1 and 3) with a watch token: WebSocket
// `/ws?token=`, falling back to Server-Sent Events `/sse?token=`.
(() => {
  'use strict';
  const TAG = 'taskwire-progress';
  if (customElements.get(TAG)) return;

  // The server this script came from: the default of the `server` attribute.
  const SCRIPT_ORIGIN = (() => {
    try {
      return new URL(document.currentScript.src).origin;
    } catch {
      return location.origin;
    }
  })();

  const FINAL = ['succeeded', 'failed', 'cancelled'];
  // A server frame's JSON, or null when it is not JSON (ignored).
  const parseMsg = (data) => {
    try {
      return JSON.parse(data);
    } catch {
      return null;
    }
  };
  const isFinal = (t) => FINAL.includes(t.state);
  const CAP_MS = 30000; // reconnect backoff cap
  const BASE_MS = 1000; // first backoff cap
  const GOOD_MS = 5000; // a connection this long resets the backoff
  const WELCOME_MS = 10000; // an open socket without `welcome` this long failed
  const MAX_TIMER = 2147483647;

  const CSS = `
:host{display:block;--_bg:var(--tw-bg,#fff);--_fg:var(--tw-fg,#1f2328);--_muted:var(--tw-muted,#57606a);
--_accent:var(--tw-accent,#0a58ca);--_track:var(--tw-track,#e6e9ee);--_border:var(--tw-border,#8c959f);
--_ok:var(--tw-ok,#1a7f37);--_err:var(--tw-err,#c11f1b);--_radius:var(--tw-radius,6px);--_gap:var(--tw-gap,.5rem);
font:var(--tw-font,inherit);color:var(--_fg)}
:host([hidden]){display:none}
:host([theme=dark]){--_bg:var(--tw-bg,#16191d);--_fg:var(--tw-fg,#e6edf3);--_muted:var(--tw-muted,#a4aeb9);
--_accent:var(--tw-accent,#5aa2ff);--_track:var(--tw-track,#30363d);--_border:var(--tw-border,#6e7681);
--_ok:var(--tw-ok,#4ac26b);--_err:var(--tw-err,#ff8a80)}
@media (prefers-color-scheme:dark){:host([theme=auto]){--_bg:var(--tw-bg,#16191d);--_fg:var(--tw-fg,#e6edf3);
--_muted:var(--tw-muted,#a4aeb9);--_accent:var(--tw-accent,#5aa2ff);--_track:var(--tw-track,#30363d);
--_border:var(--tw-border,#6e7681);--_ok:var(--tw-ok,#4ac26b);--_err:var(--tw-err,#ff8a80)}}
.list{list-style:none;margin:0;padding:0;display:grid;gap:var(--_gap)}
.task{background:var(--_bg);color:var(--_fg);border:1px solid var(--_border);border-radius:var(--_radius);
padding:.6em .75em;display:grid;gap:.35em}
.head,.foot{display:flex;flex-wrap:wrap;gap:.25em .75em;align-items:baseline}
.kind{font-weight:600}
.state{color:var(--_muted)}
.task[data-state=succeeded] .state{color:var(--_ok)}
.task[data-state=failed] .state,.task[data-state=failed] .message{color:var(--_err)}
.label{margin-left:auto;font-variant-numeric:tabular-nums}
.bar{height:.5em;border-radius:var(--_radius);background:var(--_track);overflow:hidden;
outline:1px solid var(--_border);outline-offset:-1px}
.fill{height:100%;width:0;background:var(--_accent);transition:width .3s ease}
.task[data-state=succeeded] .fill{background:var(--_ok)}
.task[data-state=failed] .fill{background:var(--_err)}
.bar.unknown .fill{width:30%;animation:tw-slide 1.4s ease-in-out infinite alternate}
@keyframes tw-slide{from{transform:translateX(-10%)}to{transform:translateX(243%)}}
.message{overflow-wrap:anywhere}
.message,.eta,.status,.empty{color:var(--_muted);font-size:.9em}
.task[data-state=failed] .message{font-size:1em}
.eta{margin-left:auto;font-variant-numeric:tabular-nums}
.status:empty,.empty:empty,.eta:empty,.message:empty{display:none}
.status,.empty{margin:0 0 var(--_gap);background:var(--_bg);border-radius:var(--_radius);padding:.2em .4em}
.cancel{font:inherit;font-size:.9em;color:var(--_fg);background:var(--_bg);border:1px solid var(--_border);
border-radius:var(--_radius);padding:.1em .6em;cursor:pointer;justify-self:start}
.cancel:focus-visible{outline:2px solid var(--_accent);outline-offset:2px}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
@media (prefers-reduced-motion:reduce){.fill{transition:none}.bar.unknown .fill{animation:none;width:100%;opacity:.4}}`;

  let sheet = null;
  try {
    sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
  } catch {
    sheet = null; // no constructable stylesheets: a <style> below
  }

  const el = (tag, part, cls) => {
    const e = document.createElement(tag);
    if (part) e.setAttribute('part', part);
    e.className = cls || part || '';
    return e;
  };
  const setText = (e, s) => {
    if (e.textContent !== s) e.textContent = s;
  };
  const setAttr = (e, k, v) => {
    if (v === null) e.removeAttribute(k);
    else if (e.getAttribute(k) !== v) e.setAttribute(k, v);
  };

  /** Whole percent, or null while the total is unknown. */
  const percentOf = (t) => {
    if (typeof t.total === 'number' && t.total > 0) {
      return Math.max(0, Math.min(100, Math.floor((Math.min(t.done, t.total) * 100) / t.total)));
    }
    return t.state === 'succeeded' ? 100 : t.total === 0 ? 0 : null;
  };

  const duration = (ms) => {
    const s = Math.max(1, Math.round(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.round(s / 60);
    return m < 60 ? `${m} min` : `${Math.floor(m / 60)} h ${m % 60} min`;
  };

  class TaskwireProgress extends HTMLElement {
    static get observedAttributes() {
      return ['server', 'token', 'token-url', 'transport', 'fallback'];
    }

    constructor() {
      super();
      const root = this.attachShadow({ mode: 'open' });
      if (sheet) root.adoptedStyleSheets = [sheet];
      else {
        const style = document.createElement('style');
        style.textContent = CSS;
        root.append(style);
      }
      this._status = el('p', 'status');
      this._status.setAttribute('role', 'status');
      this._empty = el('p', 'empty');
      this._list = el('ul', 'list');
      this._live = el('p', null, 'sr');
      this._live.setAttribute('aria-live', 'polite');
      root.append(this._status, this._empty, this._list, this._live);
      this._tasks = new Map(); // id -> {task, node, samples, at}
      this._gen = 0; // bumps on every (re)connect: stale callbacks see a newer one
      this._attempt = 0;
      this._wsFails = 0;
      this._useSse = false;
      this._state = 'idle';
      this._transport = null;
      this._refs = 0;
      this._cancels = new Map(); // ref -> task id
      this._renderEmpty();
    }

    /** The tasks shown, newest view of each. */
    get tasks() {
      return [...this._tasks.values()].map((e) => e.task);
    }
    /** connecting | connected | reconnecting | unauthorized | idle */
    get connectionState() {
      return this._state;
    }
    get transport() {
      return this._transport;
    }

    connectedCallback() {
      this._onOnline = () => {
        if (this._state === 'reconnecting') this._connect();
      };
      addEventListener('online', this._onOnline);
      this._tick = setInterval(() => this._renderEtas(), 1000);
      this._started = true;
      this._restart(true);
    }

    disconnectedCallback() {
      this._started = false;
      removeEventListener('online', this._onOnline);
      clearInterval(this._tick);
      this._stop();
      this._setState('idle');
    }

    attributeChangedCallback(name, old, value) {
      if (!this._started || old === value) return;
      // A new fixed token on an open WebSocket is handed over in-band.
      if (name === 'token' && value && !this.hasAttribute('token-url') && this._sendRefresh(value)) {
        this._token = value;
        return;
      }
      this._restart(true);
    }

    _restart(freshToken) {
      this._stop();
      this._attempt = 0;
      this._wsFails = 0;
      this._useSse = false;
      this._needToken = false;
      if (freshToken) this._token = null;
      this._connect();
    }

    _stop() {
      this._gen++;
      clearTimeout(this._retryTimer);
      clearTimeout(this._refreshTimer);
      clearTimeout(this._watchdog);
      if (this._ws) {
        this._ws.onclose = this._ws.onmessage = this._ws.onerror = this._ws.onopen = null;
        try {
          this._ws.close(1000);
        } catch {}
      }
      if (this._es) this._es.close();
      this._ws = this._es = null;
    }

    _base() {
      const s = (this.getAttribute('server') || SCRIPT_ORIGIN).replace(/\/+$/, '');
      return new URL(s + '/', location.href);
    }

    _mode() {
      const t = (this.getAttribute('transport') || '').toLowerCase();
      const f = (this.getAttribute('fallback') || '').toLowerCase();
      if (t === 'sse' || f === 'sse') return 'sse';
      if (t === 'ws' || t === 'websocket' || f === 'none') return 'ws';
      return 'auto';
    }

    _setState(state, extra) {
      const transport = this._transport;
      const changed = state !== this._state;
      this._state = state;
      setAttr(this._status, 'data-state', state);
      setAttr(this._status, 'data-transport', transport);
      const texts = {
        connecting: 'Connecting…',
        reconnecting: 'Connection lost, reconnecting…',
        unauthorized: 'Not authorised to watch these tasks.',
      };
      setText(this._status, texts[state] || '');
      this._renderEmpty();
      if (changed || extra) {
        this._emit('taskwire-state', { state, transport, ...extra });
      }
    }

    _emit(type, detail) {
      this.dispatchEvent(new CustomEvent(type, { detail, bubbles: true, composed: true }));
    }

    // ----- tokens ------------------------------------------------------

    async _fetchToken(gen) {
      const url = this.getAttribute('token-url');
      const res = await fetch(url, {
        credentials: 'same-origin',
        cache: 'no-store',
        headers: { accept: 'application/json' },
      });
      if (!res.ok) throw new Error(`token-url answered ${res.status}`);
      const body = await res.json();
      if (typeof body.watch_token !== 'string') throw new Error('token-url: no watch_token');
      if (gen !== this._gen) return false;
      this._token = body.watch_token;
      this._expires = Number(body.expires_ms) || 0;
      this._scheduleRefresh();
      return true;
    }

    _scheduleRefresh() {
      clearTimeout(this._refreshTimer);
      if (!this._expires || !this.hasAttribute('token-url')) return;
      // At 80 % of the lifetime left, at least 2 s from now.
      const wait = Math.min(MAX_TIMER, Math.max(2000, 0.8 * (this._expires - Date.now())));
      const gen = this._gen;
      this._refreshTimer = setTimeout(async () => {
        if (gen !== this._gen) return;
        try {
          if (!(await this._fetchToken(gen))) return;
        } catch {
          // Try again soon; if it expires first the server closes (1008)
          // and the reconnect fetches one.
          this._refreshTimer = setTimeout(() => this._scheduleRefresh(), 5000);
          return;
        }
        if (this._sendRefresh(this._token)) return;
        // Server-Sent Events cannot be told: reopen with the new token (a
        // fresh `welcome` replaces the list).
        if (this._es && this._state === 'connected') {
          this._stopKeepToken();
          this._connect();
        }
      }, wait);
    }

    /** Sends `refresh` on an open, welcomed WebSocket; false when there is none. */
    _sendRefresh(token) {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1 || this._state !== 'connected') return false;
      ws.send(JSON.stringify({ type: 'refresh', token }));
      return true;
    }

    _stopKeepToken() {
      const { _token, _expires } = this;
      this._stop();
      this._token = _token;
      this._expires = _expires;
    }

    _tokenStale() {
      return !this._token || (this._expires && Date.now() > this._expires - 5000);
    }

    // ----- connecting -----------------------------------------------------

    async _connect() {
      this._stopKeepToken();
      const gen = this._gen;
      const tokenUrl = this.hasAttribute('token-url');
      if (!tokenUrl) this._token = this.getAttribute('token');
      if (!this._token && !tokenUrl) return this._setState('idle');
      if (this._state !== 'reconnecting') this._setState('connecting');
      if (tokenUrl && (this._needToken || this._tokenStale() || this._attempt >= 3)) {
        try {
          if (!(await this._fetchToken(gen))) return;
          this._needToken = false;
        } catch (err) {
          if (gen === this._gen) this._retry(false, String(err.message || err));
          return;
        }
      }
      const mode = this._mode();
      const sse = mode === 'sse' || (mode === 'auto' && this._useSse);
      if (sse && typeof EventSource !== 'function') return this._retry(false, 'no EventSource');
      this._transport = sse ? 'sse' : 'ws';
      let url;
      try {
        url = new URL(sse ? 'sse' : 'ws', this._base());
      } catch {
        return this._setState('idle', { reason: 'bad server attribute' });
      }
      url.searchParams.set('token', this._token);
      if (sse) this._openSse(url, gen);
      else {
        url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
        this._openWs(url, gen);
      }
    }

    _openWs(url, gen) {
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (err) {
        return this._retry(false, String(err.message || err));
      }
      this._ws = ws;
      let welcomedAt = 0;
      // Some proxies accept the upgrade and pass nothing: that failed too.
      this._watchdog = setTimeout(() => ws.close(1000), WELCOME_MS);
      ws.onmessage = (e) => {
        if (gen !== this._gen) return;
        const msg = parseMsg(e.data);
        if (!msg) return;
        if (msg.type === 'welcome' && !welcomedAt) {
          welcomedAt = Date.now();
          clearTimeout(this._watchdog);
          this._wsFails = 0;
        }
        this._onMessage(msg);
      };
      ws.onclose = (e) => {
        if (gen !== this._gen) return;
        clearTimeout(this._watchdog);
        this._ws = null;
        if (e.code === 1008) this._needToken = true;
        if (!welcomedAt && ++this._wsFails >= 2 && this._mode() === 'auto') this._useSse = true;
        this._retry(welcomedAt && Date.now() - welcomedAt >= GOOD_MS, `closed (${e.code})`);
      };
    }

    _openSse(url, gen) {
      const es = new EventSource(url);
      this._es = es;
      let welcomedAt = 0;
      const on = (type) =>
        es.addEventListener(type, (e) => {
          if (gen !== this._gen) return;
          let msg = parseMsg(e.data);
          if (!msg) return;
          if (!msg.type) msg = type === 'task' && !msg.task ? { type, task: msg } : { type, ...msg };
          if (msg.type === 'welcome') welcomedAt = welcomedAt || Date.now();
          this._onMessage(msg);
        });
      on('welcome');
      on('task');
      on('error'); // a server-sent `event: error`, if any (an Event without data otherwise)
      es.onerror = () => {
        if (gen !== this._gen) return;
        // Our own backoff, not EventSource's: it would retry with the same token.
        es.close();
        this._es = null;
        // Failed before any welcome: the server may be down rather than the
        // WebSocket blocked, so the next try is a WebSocket again.
        if (!welcomedAt && this._mode() === 'auto') {
          this._useSse = false;
          this._wsFails = 0;
        }
        this._retry(welcomedAt && Date.now() - welcomedAt >= GOOD_MS, 'event stream failed');
      };
    }

    /** Reconnects after a delay: full jitter, uniform over [0, cap], cap doubling to 30 s. */
    _retry(wasGood, reason) {
      this._stopKeepToken();
      if (wasGood) this._attempt = 0;
      if (this._needToken && !this.hasAttribute('token-url')) {
        // A fixed token cannot be renewed here: wait for a new `token` attribute.
        return this._setState('unauthorized', { reason });
      }
      const cap = Math.min(CAP_MS, BASE_MS * 2 ** this._attempt);
      const delay = Math.floor(Math.random() * cap);
      this._attempt++;
      this._setState('reconnecting', { delay_ms: delay, attempt: this._attempt, reason });
      const gen = this._gen;
      this._retryTimer = setTimeout(() => {
        if (gen === this._gen) this._connect();
      }, delay);
    }

    // ----- messages -------------------------------------------------------

    _onMessage(msg) {
      switch (msg.type) {
        case 'welcome':
          this._setState('connected');
          this._replace(Array.isArray(msg.tasks) ? msg.tasks : []);
          break;
        case 'task':
        case 'accepted':
          if (msg.task) this._upsert(msg.task);
          break;
        case 'error':
          if (msg.code === 'unauthorized') {
            // Expiry (the server then closes: 1008, or the end of the event
            // stream) or a refused refresh: with a token-url, reconnect with
            // a fresh token at once.
            this._needToken = true;
            if (this._ws && this.hasAttribute('token-url')) this._ws.close(1000);
          }
          if (msg.ref && msg.ref.startsWith('tw-cancel-')) this._cancelRefused(msg);
          this._emit('taskwire-error', { code: msg.code, message: msg.message, ref: msg.ref ?? null });
          break;
      }
    }

    /** `welcome`: the list becomes the snapshot; a task's `seq` never goes back. */
    _replace(tasks) {
      const ids = new Set();
      for (const t of tasks) {
        if (t && t.id) {
          ids.add(t.id);
          this._upsert(t, true);
        }
      }
      for (const [id, e] of this._tasks) {
        if (!ids.has(id)) {
          e.node.remove();
          this._tasks.delete(id);
        }
      }
      this._order();
      this._renderEmpty();
    }

    _upsert(task, batch) {
      const entry = this._tasks.get(task.id);
      if (entry && task.seq <= entry.task.seq) return;
      const now = Date.now();
      if (!entry) {
        const node = this._build(task);
        const e = { task, node, samples: [], at: now };
        this._tasks.set(task.id, e);
        this._sample(e, task, now);
        this._render(e);
        this._list.append(node);
      } else {
        const was = entry.task;
        entry.task = task;
        entry.at = now;
        this._sample(entry, task, now);
        this._render(entry);
        if (!isFinal(was) && isFinal(task)) {
          setText(this._live, `${task.kind} ${task.state}`);
        }
      }
      this._emit('taskwire-task', task);
      if (!batch) {
        this._order();
        this._renderEmpty();
      }
    }

    /** Progress samples for the rate: the backend's times (`updated_ms`) when it gives them. */
    _sample(e, t, now) {
      if (t.state !== 'running' || typeof t.total !== 'number') {
        e.samples = [];
        return;
      }
      const at = typeof t.updated_ms === 'number' && t.updated_ms > 0 ? t.updated_ms : now;
      const s = e.samples;
      let last = s[s.length - 1];
      if (last && (t.done < last.done || at < last.at)) s.length = last = 0;
      if (!last || t.done !== last.done) s.push({ at, now, done: t.done });
      // The last minute, at most 20 samples.
      while (s.length > 20 || (s.length > 2 && s[s.length - 1].now - s[0].now > 60000)) s.shift();
    }

    _eta(e) {
      const t = e.task;
      const s = e.samples;
      if (t.state !== 'running' || s.length < 2 || !(t.total > t.done)) return '';
      const first = s[0];
      const last = s[s.length - 1];
      // Per ms, by the backend's clock; by ours if it gave no distinct times.
      const rate = (last.done - first.done) / (last.at - first.at || last.now - first.now);
      if (!(rate > 0)) return '';
      const left = (t.total - last.done) / rate - (Date.now() - e.at);
      return `about ${duration(Math.max(0, left))} left`;
    }

    _order() {
      const rank = (t) => (isFinal(t) ? 1 : 0);
      const sorted = [...this._tasks.values()].sort(
        (a, b) =>
          rank(a.task) - rank(b.task) ||
          (b.task.created_ms || 0) - (a.task.created_ms || 0) ||
          (a.task.id < b.task.id ? -1 : 1),
      );
      const nodes = this._list.children;
      sorted.forEach((e, i) => {
        if (nodes[i] !== e.node) this._list.insertBefore(e.node, nodes[i] || null);
      });
    }

    _renderEmpty() {
      setText(this._empty, !this._tasks.size && this._state === 'connected' ? 'No tasks yet.' : '');
    }

    _build(task) {
      const li = el('li', 'task');
      const head = el('div', null, 'head');
      const kind = el('span', 'kind');
      const state = el('span', 'state');
      const label = el('span', 'label');
      head.append(kind, state, label);
      const bar = el('div', 'bar');
      bar.setAttribute('role', 'progressbar');
      bar.setAttribute('aria-valuemin', '0');
      bar.setAttribute('aria-valuemax', '100');
      const fill = el('div', 'fill');
      bar.append(fill);
      const foot = el('div', null, 'foot');
      const message = el('span', 'message');
      const eta = el('span', 'eta');
      foot.append(message, eta);
      li.append(head, bar, foot);
      li._tw = { kind, state, label, bar, fill, message, eta };
      li.dataset.taskId = task.id;
      return li;
    }

    _render(e) {
      const t = e.task;
      const li = e.node;
      const r = li._tw;
      setAttr(li, 'data-state', t.state);
      setText(r.kind, t.kind || 'task');
      setText(r.state, t.state);
      const pct = percentOf(t);
      const unknown = pct === null;
      setText(r.label, unknown ? (t.done ? String(t.done) : '') : `${pct} %`);
      setAttr(r.bar, 'aria-valuenow', unknown ? null : String(pct));
      setAttr(r.bar, 'aria-valuetext', unknown ? t.state : `${pct} %`);
      setAttr(r.bar, 'aria-label', `${t.kind || 'task'} progress`);
      r.bar.classList.toggle('unknown', unknown && !isFinal(t));
      // CSSOM, not a style attribute: allowed under a strict style-src.
      r.fill.style.width = unknown ? '' : `${pct}%`;
      setText(r.message, (t.state === 'failed' && t.error) || t.message || t.error || '');
      setText(r.eta, this._eta(e));
      this._renderCancel(e);
    }

    _renderEtas() {
      for (const e of this._tasks.values()) {
        if (e.task.state === 'running') setText(e.node._tw.eta, this._eta(e));
      }
    }

    // ----- cancel (attribute `cancelable`, WebSocket only, if the token allows it) ----

    _renderCancel(e) {
      const r = e.node._tw;
      const want = this.hasAttribute('cancelable') && !isFinal(e.task);
      if (want && !r.cancel) {
        r.cancel = el('button', 'cancel');
        r.cancel.type = 'button';
        r.cancel.textContent = 'Cancel';
        r.cancel.setAttribute('aria-label', `Cancel ${e.task.kind || 'task'}`);
        r.cancel.addEventListener('click', () => this.cancel(e.task.id));
        e.node.append(r.cancel);
      } else if (!want && r.cancel) {
        r.cancel.remove();
        r.cancel = null;
      }
    }

    /** Asks the server to cancel a task (needs a token with `cancel`, over the WebSocket). */
    cancel(id) {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1) return false;
      const ref = `tw-cancel-${++this._refs}`;
      this._cancels.set(ref, id);
      ws.send(JSON.stringify({ type: 'cancel', ref, task: id }));
      return true;
    }

    _cancelRefused(msg) {
      const e = this._tasks.get(this._cancels.get(msg.ref));
      if (e) setText(e.node._tw.message, msg.code === 'forbidden' ? 'Cancelling is not allowed.' : msg.message || msg.code);
    }
  }

  customElements.define(TAG, TaskwireProgress);
})();
