import type { CDPSession, Page } from '@playwright/test';
import { expect, logBrowserErrors, openApp, startTask, taskItem, test } from './helpers';

// How the page is served: under a Content-Security-Policy that lets it
// hydrate and refuses anything else, with compressed, content-hashed assets
// that a second visit takes from the browser's cache.

test.beforeEach(async ({ page }) => {
  logBrowserErrors(page);
});

interface Fetched {
  url: string;
  status: number;
  fromCache: boolean;
  encoding: string;
  cacheControl: string;
  bytes: number;
}

/** Records every request of `page` through the DevTools protocol. */
async function recordNetwork(page: Page): Promise<{ cdp: CDPSession; fetched: Map<string, Fetched> }> {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Network.enable');
  const fetched = new Map<string, Fetched>();
  const entry = (id: string): Fetched => {
    let f = fetched.get(id);
    if (!f) {
      f = { url: '', status: 0, fromCache: false, encoding: '', cacheControl: '', bytes: 0 };
      fetched.set(id, f);
    }
    return f;
  };
  cdp.on('Network.requestWillBeSent', (e) => {
    entry(e.requestId).url = e.request.url;
  });
  cdp.on('Network.requestServedFromCache', (e) => {
    entry(e.requestId).fromCache = true;
  });
  cdp.on('Network.responseReceived', (e) => {
    const f = entry(e.requestId);
    const h = Object.fromEntries(
      Object.entries(e.response.headers).map(([k, v]) => [k.toLowerCase(), String(v)]),
    );
    f.url = e.response.url;
    f.status = e.response.status;
    f.fromCache ||= Boolean(e.response.fromDiskCache || e.response.fromPrefetchCache);
    f.encoding = h['content-encoding'] ?? '';
    f.cacheControl = h['cache-control'] ?? '';
  });
  cdp.on('Network.loadingFinished', (e) => {
    entry(e.requestId).bytes = e.encodedDataLength;
  });
  return { cdp, fetched };
}

/** The recorded requests for the site's /pkg/ assets. */
function assets(fetched: Map<string, Fetched>): Fetched[] {
  return [...fetched.values()].filter((f) => f.url !== '' && new URL(f.url).pathname.startsWith('/pkg/'));
}

test('the page hydrates and works under its CSP, which refuses an injected script', async ({
  page,
}) => {
  const response = await page.goto('/');
  const csp = response?.headers()['content-security-policy'] ?? '';
  expect(csp).toContain("'wasm-unsafe-eval'");
  expect(csp).toMatch(/script-src 'nonce-[A-Za-z0-9_-]{16,}'/);
  expect(csp).not.toContain('unsafe-inline');
  await openApp(page);
  // The page's own work: a task runs to the end (the fixture fails the test
  // on any CSP violation meanwhile).
  const id = await startTask(page, { durationMs: 600, steps: 3 });
  await expect(taskItem(page, id)).toHaveAttribute('data-state', 'succeeded');
  await expect(taskItem(page, id).locator('.fill')).toHaveClass(/\bp100\b/);
});

test.describe('a script the page did not bring', () => {
  test.use({ allowCspViolations: true });

  test('is refused and reported', async ({ page, cspViolations }) => {
    await openApp(page);
    await page.evaluate(() => {
      const s = document.createElement('script');
      s.textContent = 'window.__injected = true;';
      document.head.appendChild(s);
    });
    await expect.poll(() => cspViolations.length).toBeGreaterThan(0);
    expect(await page.evaluate(() => (window as unknown as { __injected?: boolean }).__injected)).toBe(
      undefined,
    );
    expect(cspViolations.join('\n')).toMatch(/script-src/);
  });
});

test('assets go out brotli-compressed and immutable; a second visit fetches none again', async ({
  page,
}) => {
  const { fetched } = await recordNetwork(page);
  await openApp(page);
  const first = assets(fetched);
  const kinds = first.map((f) => f.url.split('.').pop());
  expect(new Set(kinds)).toEqual(new Set(['js', 'wasm', 'css']));
  for (const f of first) {
    expect(f.encoding, `${f.url} compressed`).toBe('br');
    expect(f.cacheControl, `${f.url} cached for good`).toBe('public, max-age=31536000, immutable');
    // Content-hashed: taskwire.<hash>.<ext>.
    expect(new URL(f.url).pathname).toMatch(/^\/pkg\/taskwire\.[A-Za-z0-9_-]{8,}\.(js|wasm|css)$/);
  }
  const total = [...fetched.values()].reduce((n, f) => n + f.bytes, 0);
  console.log(
    `first visit: ${total} bytes on the wire (${[...fetched.values()]
      .filter((f) => f.url !== '')
      .map((f) => `${new URL(f.url).pathname} ${f.bytes}`)
      .join(', ')})`,
  );

  fetched.clear();
  await page.goto('/');
  await expect(page.locator('main[data-hydrated="true"]')).toHaveCount(1, { timeout: 30_000 });
  await expect(page.locator('#conn')).toHaveAttribute('data-state', 'connected');
  const second = assets(fetched);
  expect(second.length, 'the assets were asked for again').toBeGreaterThan(0);
  for (const f of second) {
    expect(f.fromCache || f.status === 304, `${f.url} came from the cache`).toBe(true);
  }
});
