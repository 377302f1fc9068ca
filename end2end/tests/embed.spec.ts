import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import path from 'node:path';
import type { Locator, Page, WebSocket as PwWebSocket } from '@playwright/test';
import {
  OwnServer,
  REPO_ROOT,
  expectNoAxeViolations,
  freePort,
  installAxe,
  logBrowserErrors,
  scratchDir,
  expect,
  test,
} from './helpers';

// The drop-in element `/embed.js` (docs/embedding.md) on another origin's
// page, against a real taskwire: a taskwire of the test's own with an API
// key and token secrets (--config), the host's origin allowed
// (--allowed-origins), and a tiny host backend in Node (another port, so
// another origin) that serves a page embedding <taskwire-progress> and
// `/token`, which asks taskwire's `POST /api/v1/tokens` for the logged-in
// user's owner token, as a real host app would. Tasks are started over
// `POST /api/v1/tasks` with the API key (contract section 3).
//
// The element's shadow DOM (open; Playwright's CSS selectors pierce it):
//   [part~=status][data-state][data-transport]   connecting | connected | reconnecting | unauthorized
//   li[part~=task][data-task-id][data-state]
//     [part~=kind] [part~=state] [part~=label]
//     [part~=bar][role=progressbar][aria-valuenow][aria-valuetext] > [part~=fill]
//     [part~=message] [part~=eta] button[part~=cancel]

const API_KEY = `tw-e2e-${randomBytes(16).toString('hex')}`;

function configFile(): string {
  const dir = scratchDir('taskwire-e2e-embed-');
  const file = path.join(dir, 'taskwire.toml');
  const sha = createHash('sha256').update(API_KEY).digest('hex');
  // No [[backend]] and no [[kind]]: the embedded simulator and its `simulate`.
  writeFileSync(
    file,
    `
[[api_key]]
name = "host-e2e"
sha256 = "${sha}"

[tokens]
secrets = ["${randomBytes(32).toString('hex')}"]
default_ttl_s = 3600
`,
  );
  return file;
}

interface Task {
  id: string;
  kind: string;
  state: string;
  done: number;
  total: number | null;
  seq: number;
}

/** The host app: its page (a strict CSP) and its token route. */
class HostApp {
  readonly tokenRequests: { owner: string; ttl: string | null; cancel: boolean }[] = [];
  private server: Server | null = null;
  port = 0;

  constructor(private readonly tw: string) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async start(): Promise<void> {
    this.server = createServer((req, res) => {
      this.handle(req, res).catch((err) => {
        res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(String(err));
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    const addr = this.server.address();
    this.port = typeof addr === 'object' && addr ? addr.port : 0;
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise((resolve) => this.server?.close(resolve));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', this.url);
    if (url.pathname === '/') {
      // `?user=` logs the browser in (a cookie, as a host's session would);
      // the other parameters become the element's attributes.
      const user = url.searchParams.get('user') ?? '';
      const tokenUrl = new URL('/token', this.url);
      for (const k of ['ttl', 'cancel']) {
        const v = url.searchParams.get(k);
        if (v !== null) tokenUrl.searchParams.set(k, v);
      }
      const attrs = ['transport', 'fallback', 'cancelable']
        .filter((k) => url.searchParams.has(k))
        .map((k) => ` ${k}="${url.searchParams.get(k)}"`)
        .join('');
      // `?token=` gives the element a fixed token instead of `token-url`.
      const fixed = url.searchParams.get('token');
      const source = fixed
        ? `token="${fixed}"`
        : `token-url="${tokenUrl.pathname}${tokenUrl.search}"`;
      const tw = new URL(this.tw);
      res.writeHead(200, {
        'content-type': 'text/html; charset=utf-8',
        'set-cookie': `user=${user}; Path=/; HttpOnly; SameSite=Lax`,
        // As strict as a careful host: no inline script or style at all.
        'content-security-policy':
          `default-src 'none'; script-src ${this.tw}/embed.js; style-src 'none'; ` +
          `connect-src 'self' ${this.tw} ws://${tw.host}; base-uri 'none'; form-action 'none'`,
      });
      res.end(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Host app</title>
<script src="${this.tw}/embed.js" defer></script></head>
<body><main><h1>Your exports</h1>
<taskwire-progress server="${this.tw}" ${source}${attrs}></taskwire-progress>
</main></body></html>`);
      return;
    }
    if (url.pathname === '/token') {
      const owner = /(?:^|;\s*)user=([^;]*)/.exec(req.headers.cookie ?? '')?.[1] ?? '';
      if (!owner) {
        res.writeHead(401, { 'content-type': 'application/json' });
        res.end('{"error":"not logged in"}');
        return;
      }
      const ttl = url.searchParams.get('ttl');
      const cancel = url.searchParams.get('cancel') === '1';
      this.tokenRequests.push({ owner, ttl, cancel });
      const body: Record<string, unknown> = { owner };
      if (ttl) body.ttl_s = Number(ttl);
      if (cancel) body.cancel = true;
      const answer = await fetch(`${this.tw}/api/v1/tokens`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      const text = await answer.text();
      // Passed through: {"watch_token", "expires_ms"}.
      res.writeHead(answer.status === 201 ? 200 : answer.status, {
        'content-type': 'application/json',
        'cache-control': 'no-store',
      });
      res.end(text);
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found');
  }
}

let server: OwnServer | null = null;
let host: HostApp | null = null;

test.beforeAll(async () => {
  const twPort = await freePort();
  host = new HostApp(`http://127.0.0.1:${twPort}`);
  await host.start();
  server = new OwnServer(twPort, [
    '--config',
    configFile(),
    '--allowed-origins',
    host.url,
  ]);
  await server.start();
});

test.afterAll(async () => {
  await server?.stop();
  await host?.stop();
});

test.beforeEach(async ({ page }) => {
  logBrowserErrors(page);
  // Every event the element dispatches (they bubble and are composed).
  await page.addInitScript(() => {
    const log = { states: [] as unknown[], tasks: [] as unknown[] };
    (window as unknown as { __tw: typeof log }).__tw = log;
    document.addEventListener('taskwire-state', (e) => log.states.push((e as CustomEvent).detail));
    document.addEventListener('taskwire-task', (e) => log.tasks.push((e as CustomEvent).detail));
  });
});

/** `POST /api/v1/tokens` with the API key: `{watch_token, expires_ms}`. */
async function newToken(body: Record<string, unknown>): Promise<{ watch_token: string; expires_ms: number }> {
  const res = await fetch(`${server!.url}/api/v1/tokens`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  expect(res.status, `POST /api/v1/tokens: ${text}`).toBe(201);
  return JSON.parse(text);
}

/** `POST /api/v1/tasks` with the API key: the new task and its watch token. */
async function startTaskWithToken(
  owner: string,
  durationMs: number,
  steps: number,
): Promise<{ task: Task; token: string }> {
  const res = await fetch(`${server!.url}/api/v1/tasks`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ kind: 'simulate', params: { duration_ms: durationMs, steps }, owner }),
  });
  const text = await res.text();
  expect(res.status, `POST /api/v1/tasks: ${text}`).toBe(201);
  const body = JSON.parse(text);
  expect(typeof body.watch_token).toBe('string');
  return { task: body.task as Task, token: body.watch_token };
}

async function startTask(owner: string, durationMs: number, steps: number): Promise<Task> {
  return (await startTaskWithToken(owner, durationMs, steps)).task;
}

function element(page: Page): Locator {
  return page.locator('taskwire-progress');
}

function status(page: Page): Locator {
  return element(page).locator('[part~="status"]');
}

function taskOf(page: Page, id: string): Locator {
  return element(page).locator(`li[part~="task"][data-task-id="${id}"]`);
}

async function events(page: Page): Promise<{ states: Record<string, unknown>[]; tasks: Task[] }> {
  return page.evaluate(() => (window as unknown as { __tw: never }).__tw);
}

/** Opens the host page logged in as `user` and waits until the element is connected. */
async function openHost(page: Page, user: string, query = ''): Promise<void> {
  await page.goto(`${host!.url}/?user=${user}${query}`);
  await expect(status(page)).toHaveAttribute('data-state', 'connected', { timeout: 20_000 });
}

/**
 * Watches one task's bar until it is 100 % and `succeeded`; returns every
 * percentage seen on the way (each must be >= the one before).
 */
async function watchToTheEnd(page: Page, id: string): Promise<number[]> {
  const item = taskOf(page, id);
  await expect(item).toHaveCount(1, { timeout: 10_000 });
  const bar = item.locator('[part~="bar"]');
  const seen: number[] = [];
  await expect
    .poll(
      async () => {
        const now = await bar.getAttribute('aria-valuenow');
        if (now !== null) {
          const n = Number(now);
          if (seen.length === 0 || seen[seen.length - 1] !== n) seen.push(n);
        }
        return `${await item.getAttribute('data-state')} ${now}`;
      },
      { timeout: 30_000, intervals: [100] },
    )
    .toBe('succeeded 100');
  for (let i = 1; i < seen.length; i++) {
    expect(seen[i], `the bar never goes back: ${JSON.stringify(seen)}`).toBeGreaterThanOrEqual(
      seen[i - 1],
    );
  }
  await expect(bar).toHaveAttribute('role', 'progressbar');
  await expect(bar).toHaveAttribute('aria-valuemin', '0');
  await expect(bar).toHaveAttribute('aria-valuemax', '100');
  await expect(bar).toHaveAttribute('aria-valuetext', '100 %');
  await expect(item.locator('[part~="state"]')).toHaveText('succeeded');
  await expect(item.locator('[part~="label"]')).toHaveText('100 %');
  await expect(item.locator('[part~="kind"]')).toHaveText('simulate');
  return seen;
}

/** The element's `taskwire-task` events of one task: `seq` only goes up. */
function expectSeqRises(tasks: Task[], id: string): void {
  const seqs = tasks.filter((t) => t.id === id).map((t) => t.seq);
  expect(seqs.length).toBeGreaterThan(0);
  for (let i = 1; i < seqs.length; i++) {
    expect(seqs[i], `seq of ${id}: ${JSON.stringify(seqs)}`).toBeGreaterThan(seqs[i - 1]);
  }
}

test('/embed.js is served, and is at most 10 KB gzipped', async () => {
  const source = readFileSync(path.join(REPO_ROOT, 'public', 'embed.js'));
  const gz = gzipSync(source, { level: 9 }).length;
  console.log(`embed.js: ${source.length} bytes, ${gz} bytes gzip -9`);
  expect(gz).toBeLessThanOrEqual(10 * 1024);

  const res = await fetch(`${server!.url}/embed.js`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/javascript/);
  expect(Buffer.from(await res.arrayBuffer()).equals(source), 'the built site has this embed.js').toBe(
    true,
  );
});

test('a task started over the API rises to 100 % and succeeded in the owner\'s element (WebSocket)', async ({
  page,
}) => {
  await installAxe(page);
  const sockets: PwWebSocket[] = [];
  page.on('websocket', (ws) => sockets.push(ws));
  await openHost(page, 'alice');
  await expect(status(page)).toHaveAttribute('data-transport', 'ws');
  expect(host!.tokenRequests.filter((r) => r.owner === 'alice').length).toBeGreaterThan(0);

  const task = await startTask('alice', 5_000, 50);
  const item = taskOf(page, task.id);
  // New tasks of the owner appear by themselves (an owner token).
  await expect(item).toHaveCount(1, { timeout: 10_000 });
  // While it runs: a percentage in words and an ETA from the observed rate.
  await expect(item.locator('[part~="bar"]')).toHaveAttribute('aria-valuetext', /^\d+ %$/);
  await expect(item.locator('[part~="eta"]')).toHaveText(/^about \d+ s left$/, { timeout: 4_000 });

  const seen = await watchToTheEnd(page, task.id);
  expect(
    seen.some((p) => p > 0 && p < 100),
    `progress seen on the way: ${JSON.stringify(seen)}`,
  ).toBe(true);
  await expect(item.locator('[part~="eta"]')).toHaveText('');

  const log = await events(page);
  expectSeqRises(log.tasks, task.id);
  expect(log.states).toContainEqual(expect.objectContaining({ state: 'connected', transport: 'ws' }));
  expect(log.states.filter((s) => s.transport === 'sse')).toEqual([]);
  expect(sockets.length, 'one WebSocket').toBe(1);
  expect(sockets[0].url()).toContain(`${server!.url.replace('http', 'ws')}/ws?token=`);

  // The list's accessibility, shadow DOM included (default colours).
  await expectNoAxeViolations(page, 'the embedded element with a finished task');
  await element(page).evaluate((el) => el.setAttribute('theme', 'dark'));
  await expectNoAxeViolations(page, 'the embedded element, theme="dark"');
});

test('with WebSockets blocked the element falls back to Server-Sent Events and still reaches 100 %', async ({
  page,
}) => {
  let blocked = 0;
  await page.routeWebSocket(/\/ws\?token=/, (ws) => {
    blocked++;
    ws.close();
  });
  await openHost(page, 'alice');
  await expect(status(page)).toHaveAttribute('data-transport', 'sse');
  expect(blocked, 'it tried the WebSocket twice first').toBe(2);

  const task = await startTask('alice', 3_000, 30);
  await watchToTheEnd(page, task.id);
  const log = await events(page);
  expectSeqRises(log.tasks, task.id);
  expect(log.states).toContainEqual(expect.objectContaining({ state: 'connected', transport: 'sse' }));
  expect(blocked).toBe(2);
});

test('transport="sse" uses Server-Sent Events from the start', async ({ page }) => {
  const sockets: PwWebSocket[] = [];
  page.on('websocket', (ws) => sockets.push(ws));
  await openHost(page, 'alice', '&transport=sse');
  await expect(status(page)).toHaveAttribute('data-transport', 'sse');
  const task = await startTask('alice', 2_000, 10);
  await watchToTheEnd(page, task.id);
  expect(sockets, 'no WebSocket at all').toEqual([]);
});

test("a task of bob never appears in alice's element", async ({ page, browser }) => {
  await openHost(page, 'alice');
  const bobs = await startTask('bob', 1_500, 10);
  const alices = await startTask('alice', 2_500, 10);
  await watchToTheEnd(page, alices.id);
  // Bob's task finished earlier; its updates would have arrived by now.
  const res = await fetch(`${server!.url}/api/v1/tasks/${bobs.id}`, {
    headers: { authorization: `Bearer ${API_KEY}` },
  });
  expect((await res.json()).state).toBe('succeeded');
  await expect(taskOf(page, bobs.id)).toHaveCount(0);
  expect((await events(page)).tasks.map((t) => t.id)).not.toContain(bobs.id);

  // A fresh welcome (a reload) lists alice's finished tasks, never bob's.
  await openHost(page, 'alice');
  await expect(taskOf(page, alices.id)).toHaveAttribute('data-state', 'succeeded');
  await expect(taskOf(page, bobs.id)).toHaveCount(0);

  // Bob's own element does show it.
  const bobPage = await (await browser.newContext()).newPage();
  await openHost(bobPage, 'bob');
  await expect(taskOf(bobPage, bobs.id)).toHaveAttribute('data-state', 'succeeded');
  await expect(taskOf(bobPage, alices.id)).toHaveCount(0);
  await bobPage.context().close();
});

test('a short-lived token is renewed from token-url and handed over in-band, on one WebSocket', async ({
  page,
}) => {
  const sockets: PwWebSocket[] = [];
  const refreshes: string[] = [];
  page.on('websocket', (ws) => {
    sockets.push(ws);
    ws.on('framesent', (f) => {
      const text = typeof f.payload === 'string' ? f.payload : f.payload.toString();
      if (text.includes('"refresh"')) refreshes.push(text);
    });
  });
  const before = host!.tokenRequests.length;
  // A 4 s token, renewed at 80 % of its life; the task outlives three of them.
  await openHost(page, 'alice', '&ttl=4');
  const task = await startTask('alice', 11_000, 20);
  await watchToTheEnd(page, task.id);

  const fetched = host!.tokenRequests.slice(before);
  expect(fetched.length, 'tokens fetched from token-url').toBeGreaterThanOrEqual(3);
  expect(fetched.every((r) => r.owner === 'alice' && r.ttl === '4')).toBe(true);
  expect(refreshes.length, 'refresh frames sent').toBeGreaterThanOrEqual(2);
  for (const r of refreshes) {
    const msg = JSON.parse(r);
    expect(msg.type).toBe('refresh');
    expect(typeof msg.token).toBe('string');
  }
  expect(sockets.length, 'the same WebSocket all along').toBe(1);
  const log = await events(page);
  expect(log.states.filter((s) => s.state === 'reconnecting')).toEqual([]);
  expect(log.tasks.filter((t) => t.id === task.id).length).toBeGreaterThan(0);
});

test('cancel: allowed by a token with `cancel`, refused (forbidden) by one without', async ({
  page,
}) => {
  // Without the permission: the button is there, the server says no.
  await openHost(page, 'alice', '&cancelable=');
  const first = await startTask('alice', 60_000, 100);
  const item = taskOf(page, first.id);
  await item.locator('button[part~="cancel"]').click();
  await expect(item.locator('[part~="message"]')).toHaveText('Cancelling is not allowed.');
  await expect(item).toHaveAttribute('data-state', 'running');

  // With it: cancelled, and the button goes.
  await openHost(page, 'alice', '&cancelable=&cancel=1');
  await taskOf(page, first.id).getByRole('button', { name: 'Cancel simulate' }).click();
  await expect(taskOf(page, first.id)).toHaveAttribute('data-state', 'cancelled');
  await expect(taskOf(page, first.id).locator('button[part~="cancel"]')).toHaveCount(0);
  await expect(taskOf(page, first.id).locator('[part~="state"]')).toHaveText('cancelled');
});

test('a fixed task token shows that one task; when it expires the element waits for a new `token`', async ({
  page,
}) => {
  const { task, token } = await startTaskWithToken('alice', 1_500, 10);
  await openHost(page, 'alice', `&token=${encodeURIComponent(token)}`);
  await watchToTheEnd(page, task.id);
  // Another task of the same owner is outside a task token's scope.
  const other = await startTask('alice', 1_000, 10);
  await page.waitForTimeout(1_500);
  await expect(taskOf(page, other.id)).toHaveCount(0);
  await expect(element(page).locator('li[part~="task"]')).toHaveCount(1);

  // A 2 s token, never renewed: the server says `unauthorized` and closes
  // (1008); a fixed token cannot be renewed by the element, so it waits.
  const short = await newToken({ task: other.id, ttl_s: 2 });
  const tokenRequests = host!.tokenRequests.length;
  await openHost(page, 'alice', `&token=${encodeURIComponent(short.watch_token)}`);
  await expect(taskOf(page, other.id)).toHaveAttribute('data-state', 'succeeded');
  await expect(status(page)).toHaveAttribute('data-state', 'unauthorized', { timeout: 10_000 });
  await expect(status(page)).toHaveText('Not authorised to watch these tasks.');
  expect(host!.tokenRequests.length, 'no token-url to ask').toBe(tokenRequests);

  // The host hands it a new token: connected again, the same task listed.
  const fresh = await newToken({ task: other.id });
  await element(page).evaluate((el, t) => el.setAttribute('token', t), fresh.watch_token);
  await expect(status(page)).toHaveAttribute('data-state', 'connected');
  await expect(taskOf(page, other.id)).toHaveAttribute('data-state', 'succeeded');
});

test('over Server-Sent Events too, an expired fixed token ends in `unauthorized`', async ({ page }) => {
  const task = await startTask('alice', 1_000, 10);
  const short = await newToken({ task: task.id, ttl_s: 2 });
  await openHost(page, 'alice', `&transport=sse&token=${encodeURIComponent(short.watch_token)}`);
  await expect(status(page)).toHaveAttribute('data-transport', 'sse');
  await expect(taskOf(page, task.id)).toHaveCount(1);
  await expect(status(page)).toHaveAttribute('data-state', 'unauthorized', { timeout: 10_000 });
  const log = await events(page);
  expect(log.states.filter((s) => s.state === 'reconnecting')).toEqual([]);
});

// Last: it restarts the server.
test('the element reconnects (backoff with jitter) after the server restarts, and the task still reaches 100 %', async ({
  page,
}) => {
  await openHost(page, 'alice');
  const task = await startTask('alice', 8_000, 40);
  const bar = taskOf(page, task.id).locator('[part~="bar"]');
  await expect(bar).toHaveAttribute('aria-valuenow', /^[1-9]\d?$/, { timeout: 10_000 });

  await server!.stop();
  await expect(status(page)).toHaveAttribute('data-state', 'reconnecting');
  await expect(status(page)).toHaveText('Connection lost, reconnecting…');
  await server!.start();
  await expect(status(page)).toHaveAttribute('data-state', 'connected', { timeout: 40_000 });
  await watchToTheEnd(page, task.id);

  const log = await events(page);
  const waits = log.states.filter((s) => s.state === 'reconnecting');
  expect(waits.length).toBeGreaterThan(0);
  for (const w of waits) {
    expect(w.delay_ms as number).toBeGreaterThanOrEqual(0);
    expect(w.delay_ms as number).toBeLessThanOrEqual(30_000);
  }
  expectSeqRises(log.tasks, task.id);
});
